"""Tenants against a real `bentoml serve` with a tenants configuration: token budgets enforced to the
token (streams too) with OpenAI's 429s and x-ratelimit-* headers, the usage ledger and the budgets'
state kept across a restart, tenants kept apart (usage, stored responses and the store's room), a
tenant's models on every route, admin routes refused to user keys, prompt tokens from the prefix cache
reported, one gateway worker. The quotas' arithmetic in-process: the concurrency cap, a prompt budget,
per-model budgets."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
import uuid

import httpx
import openai
import pytest

from conftest import ARTIFACTS, TINY, start_serving, stop, wait_ready
from models.tenants import Budget, TenantConfig
from quotas import Quotas

ADMIN, ALPHA, BETA, GAMMA, DELTA = "sk-admin-0", "sk-alpha-1", "sk-beta-2", "sk-gamma-3", "sk-delta-4"
EPSILON = "sk-epsilon-5"
COMPLETION_BUDGET, PROMPT_BUDGET, MAX_TOKENS, STORE_SIZE = 20, 30, 4, 2


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def tenants_config(tmp_path_factory, tiny_in_store):
    """alpha: a day's completion budget, its key from the environment; beta: its key as a hash;
    gamma: a prompt budget; delta: a budget, for the chat page; epsilon: another model than the one
    served; the plain api_keys: the admin tenant `default`. Each tenant's store keeps two responses."""
    directory = tmp_path_factory.mktemp("tenants")
    config = directory / "bentochat.yaml"
    config.write_text(f"""models:
  - {{id: {TINY}, model: {TINY}:latest, kind: chat, trust_remote_code: true, max_tokens_default: 5}}
api_keys: [{ADMIN}]
tenants:
  - name: alpha
    keys_env: ALPHA_KEYS
    weight: 2
    requests_per_minute: 1000
    budgets: [{{period: day, completion_tokens: {COMPLETION_BUDGET}}}]
  - name: beta
    keys: ["sha256:{hashlib.sha256(BETA.encode()).hexdigest()}"]
  - name: gamma
    keys: [{GAMMA}]
    budgets: [{{period: month, prompt_tokens: {PROMPT_BUDGET}}}]
  - name: delta
    keys: [{DELTA}]
    budgets: [{{period: day, completion_tokens: 1000}}]
  - name: epsilon
    keys: [{EPSILON}]
    models: [smollm2-135m-instruct]
usage: {{ledger_dir: {directory / "ledger"}}}
responses: {{store_size: {STORE_SIZE}}}
lora: {{runtime_loading: true}}
""")
    return {"BENTOCHAT_CONFIG": str(config), "ALPHA_KEYS": ALPHA}, directory / "ledger"


def serve(env: dict):
    srv = start_serving("service:BentoChat", ARTIFACTS / "tenants.log", env=env)
    wait_ready(srv, (TINY,), headers=auth(ADMIN))
    return srv


@pytest.fixture(scope="module")
def tenants(tenants_config):
    env, _ = tenants_config
    srv = serve(env)
    try:
        yield srv
    finally:
        stop(srv)


def client(srv, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.v1, api_key=key, max_retries=0, timeout=120)


def usage(srv, key: str, **params) -> httpx.Response:
    return httpx.get(srv.v1 + "/usage", headers=auth(key), params=params, timeout=30)


def totals(page: dict) -> dict[str, dict]:
    """Per tenant: input and output tokens and requests over the page's buckets."""
    out: dict[str, dict] = {}
    for bucket in page["data"]:
        for r in bucket["results"]:
            t = out.setdefault(r["tenant"], {"input_tokens": 0, "output_tokens": 0, "num_model_requests": 0})
            for k in t:
                t[k] += r[k]
    return out


def chat(srv, key: str, stream: bool) -> tuple[httpx.Response, dict | None]:
    """A chat request of MAX_TOKENS at most; the response and its usage (from the last chunk if streamed)."""
    body = {"model": TINY, "messages": [{"role": "user", "content": "Count"}], "max_tokens": MAX_TOKENS,
            "temperature": 1.0, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    r = httpx.post(srv.v1 + "/chat/completions", headers=auth(key), json=body, timeout=120)
    if r.status_code != 200:
        return r, None
    if not stream:
        return r, r.json()["usage"]
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return r, chunks[-1]["usage"]


def test_a_completion_budget_is_enforced_to_the_token_streams_included(tenants):
    """Admitted while some of the budget is left, each request holding its max_tokens until it ends:
    refused once used, and never passed by more than the last request's max_tokens. Before, every key
    was served without limit."""
    used, answered = 0, 0
    while True:
        r, u = chat(tenants, ALPHA, stream=answered % 2 == 1)
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        assert used < COMPLETION_BUDGET  # admitted: some was left
        h = r.headers
        assert h["x-ratelimit-limit-tokens"] == str(COMPLETION_BUDGET)
        assert h["x-ratelimit-remaining-tokens"] == str(max(0, COMPLETION_BUDGET - used - MAX_TOKENS))
        assert re.fullmatch(r"(\d+h)?(\d+m)?\d+s", h["x-ratelimit-reset-tokens"])
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("1000", str(999 - answered))
        used += u["completion_tokens"]
        answered += 1
        assert answered < 50
    assert COMPLETION_BUDGET <= used < COMPLETION_BUDGET + MAX_TOKENS
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert 0 < int(r.headers["retry-after"]) <= 86400 and r.headers["x-ratelimit-remaining-tokens"] == "0"
    streamed, _ = chat(tenants, ALPHA, stream=True)
    assert streamed.status_code == 429  # a stream is refused before it starts
    alpha = totals(usage(tenants, ALPHA).json())["alpha"]
    assert (alpha["output_tokens"], alpha["num_model_requests"]) == (used, answered)


def test_a_prompt_budget_refuses_the_prompt_that_would_pass_it(tenants):
    gamma = client(tenants, GAMMA)
    for _ in range(PROMPT_BUDGET // 10):
        assert gamma.completions.create(model=TINY, prompt=list(range(5, 15)), max_tokens=1).usage.prompt_tokens == 10
    with pytest.raises(openai.RateLimitError) as refused:
        gamma.completions.create(model=TINY, prompt=[5], max_tokens=1)
    assert refused.value.code == "insufficient_quota"


def test_tenants_never_see_each_others_usage_or_responses(tenants):
    alpha, beta = client(tenants, ALPHA), client(tenants, BETA)
    kept = beta.responses.create(model=TINY, input="Hello", max_output_tokens=2)
    assert beta.responses.retrieve(kept.id).id == kept.id
    with pytest.raises(openai.NotFoundError):
        alpha.responses.retrieve(kept.id)
    assert httpx.get(f"{tenants.v1}/responses/{kept.id}", headers=auth(GAMMA), timeout=30).status_code == 404
    page = usage(tenants, BETA, group_by=["model", "key_id"]).json()
    assert set(totals(page)) == {"beta"} and set(page["budgets"]) == {"beta"}
    result = next(r for b in page["data"] for r in b["results"])
    assert result["model"] == TINY and result["key_id"].startswith("key-") and BETA not in json.dumps(page)
    denied = usage(tenants, BETA, tenants=["alpha"])
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    everyone = usage(tenants, ADMIN).json()
    assert {"alpha", "beta", "gamma"} <= set(totals(everyone)) and {"alpha", "beta", "gamma"} <= set(everyone["budgets"])


def test_admin_routes_are_refused_to_user_keys(tenants):
    lora = {"lora_name": "x", "lora_path": "x"}
    for key in (ALPHA, BETA):
        for method, path, body in (("GET", "/v1/stats", None), ("POST", "/v1/load_lora_adapter", lora),
                                   ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}), ("GET", "/metrics", None)):
            r = httpx.request(method, tenants.base_url + path, headers=auth(key), json=body, timeout=30)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only", (key, path)
    assert httpx.get(tenants.v1 + "/stats", headers=auth(ADMIN), timeout=30).status_code == 200
    metrics = httpx.get(tenants.base_url + "/metrics", headers=auth(ADMIN), timeout=30).text
    assert re.search(r'bentochat_tenant_tokens_total\{[^}]*kind="completion"[^}]*tenant="alpha"', metrics)


def test_the_chat_page_counts_to_the_signed_in_tenant_and_shows_its_budget(tenants):
    """Before, the page's answers were counted to no one (a user key's way around its budget)."""
    from gradio_client import Client

    page = Client(tenants.base_url + "/ui/", auth=("anyone", DELTA), verbose=False)
    assert page.predict(api_name="/budget")["value"].startswith(
        "Budget of `delta`: 1,000 of 1,000 completion tokens left this day (renews in ")
    history = page.predict(TINY, "", 0.7, 1.0, 16, [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                           api_name="/answer")
    tokens = int(re.search(r"· (\d+) tokens ·", history[-1]["content"][0]["text"]).group(1))
    assert tokens > 0
    assert f"{1000 - tokens:,} of 1,000" in page.predict(api_name="/budget")["value"]
    delta = totals(usage(tenants, DELTA).json())["delta"]
    assert (delta["output_tokens"], delta["num_model_requests"]) == (tokens, 1)


def ledger_of(ledger, tenant: str) -> list[dict]:
    return [r for r in map(json.loads, (ledger / "usage.jsonl").read_text().splitlines()) if r["tenant"] == tenant]


def written(ledger, tenant: str, count: int) -> list[dict]:
    """The tenant's records once there are ``count``: the gateway appends a request's record after
    its response has been sent."""
    deadline = time.monotonic() + 10
    while len(records := ledger_of(ledger, tenant)) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return records


def test_prompt_tokens_from_the_prefix_cache_are_reported_ledgered_and_summed(tenants, tenants_config):
    """The same prompt again: all of it but its last token comes from the runner's prefix cache, and
    usage (chat and text completions, streamed or not), the ledger and /v1/usage say so. Before, the
    gateway never learnt it: cached tokens were 0 everywhere."""
    _, ledger = tenants_config
    before = len(ledger_of(ledger, "beta"))
    beta = client(tenants, BETA)
    messages = [{"role": "user", "content": f"Remember the code word {uuid.uuid4().hex[:12]} and say it back."}]
    first = beta.chat.completions.create(model=TINY, messages=messages, max_tokens=2).usage
    again = beta.chat.completions.create(model=TINY, messages=messages, max_tokens=2).usage
    whole = again.prompt_tokens - 1  # all but the last token, whose logits are needed
    assert first.prompt_tokens_details.cached_tokens < whole == again.prompt_tokens_details.cached_tokens
    stream = beta.chat.completions.create(model=TINY, messages=messages, max_tokens=2, stream=True,
                                          stream_options={"include_usage": True})
    assert [c.usage for c in stream][-1].prompt_tokens_details.cached_tokens == whole
    prompt = list(range(50, 90))
    text = [beta.completions.create(model=TINY, prompt=prompt, max_tokens=1).usage for _ in range(2)]
    assert text[1].prompt_tokens_details.cached_tokens == len(prompt) - 1
    records = written(ledger, "beta", before + 5)[before:]  # (in the order the requests were closed)
    assert sorted(r["cached_tokens"] for r in records) == sorted([
        first.prompt_tokens_details.cached_tokens, whole, whole, text[0].prompt_tokens_details.cached_tokens,
        len(prompt) - 1])
    page = usage(tenants, BETA).json()
    cached = sum(r["input_cached_tokens"] for b in page["data"] for r in b["results"])
    assert cached == sum(r["cached_tokens"] for r in ledger_of(ledger, "beta")) >= 2 * whole + len(prompt) - 1


def test_a_tenant_gets_no_prompt_tokens_from_another_tenants_prompts(tenants):
    """The prefix cache is kept per tenant: the prompt beta just sent twice is no hit for delta (the
    cached tokens, and the speed, would tell delta what beta asked), and then is, for delta's own."""
    messages = [{"role": "user", "content": f"Keep the secret {uuid.uuid4().hex[:12]} to yourself."}]
    beta, delta = client(tenants, BETA), client(tenants, DELTA)
    usages = [beta.chat.completions.create(model=TINY, messages=messages, max_tokens=1).usage for _ in range(2)]
    whole = usages[1].prompt_tokens - 1
    assert usages[1].prompt_tokens_details.cached_tokens == whole
    theirs = [delta.chat.completions.create(model=TINY, messages=messages, max_tokens=1).usage for _ in range(2)]
    assert theirs[0].prompt_tokens_details.cached_tokens < whole == theirs[1].prompt_tokens_details.cached_tokens


def test_a_tenant_is_refused_a_model_it_may_not_use_alike_on_every_route(tenants):
    """epsilon may use another model than the one served: chat, /tokenize, /token_check and the model's
    card give the same 404, as for a model that does not exist. Before, /tokenize and /token_check
    answered it."""
    def error(method: str, route: str, body: dict | None = None) -> dict:
        r = httpx.request(method, tenants.v1 + route, headers=auth(EPSILON), json=body, timeout=60)
        assert r.status_code == 404, (route, r.text)
        return r.json()["error"]

    chat = error("POST", "/chat/completions", {"model": TINY, "messages": [{"role": "user", "content": "Hi"}]})
    assert (chat["code"], chat["param"]) == ("model_not_found", "model")
    assert error("POST", "/tokenize", {"model": TINY, "prompt": "Hi"}) == chat
    assert error("POST", "/token_check", {"prompts": [{"model": TINY, "prompt": "Hi", "max_tokens": 1}]}) == chat
    assert error("POST", "/completions", {"model": TINY, "prompt": "Hi"}) == chat
    assert error("GET", f"/models/{TINY}") == chat
    assert httpx.post(tenants.v1 + "/tokenize", headers=auth(BETA), json={"model": TINY, "prompt": "Hi"},
                      timeout=60).status_code == 200


def test_each_tenant_has_its_own_room_in_the_response_store_and_openai_ids(tenants):
    """The store keeps STORE_SIZE responses of each tenant: another tenant's responses push none of
    beta's out. Before, the room was shared: the admin's three responses evicted beta's. Ids are
    OpenAI's (resp_, msg_): they were resp-, msg-."""
    beta, admin = client(tenants, BETA), client(tenants, ADMIN)
    kept = beta.responses.create(model=TINY, input="Hello", max_output_tokens=2)
    assert kept.id.startswith("resp_") and all(item.id.startswith(("msg_", "fc_", "rs_")) for item in kept.output)
    made = [admin.responses.create(model=TINY, input="Hello", max_output_tokens=2) for _ in range(STORE_SIZE + 1)]
    assert beta.responses.retrieve(kept.id).id == kept.id
    assert admin.responses.retrieve(made[-1].id).id == made[-1].id
    with pytest.raises(openai.NotFoundError):  # the admin's own room is STORE_SIZE
        admin.responses.retrieve(made[0].id)


def test_the_gateway_refuses_to_start_with_more_than_one_worker(tenants_config):
    """Quotas, the ledger's writer and stored responses live in the gateway's process: BentoML's
    configuration asking for two workers of it stops `bentoml serve` before anything starts. Before,
    two workers started, each with budgets of its own."""
    env, _ = tenants_config
    srv = start_serving("service:BentoChat", ARTIFACTS / "tenants-workers.log",
                        env={**env, "BENTOML_CONFIG_OVERRIDES": json.dumps({"services": {"bentochat": {"workers": 2}}})})
    try:
        srv.process.wait(300)
    except subprocess.TimeoutExpired:
        pytest.fail("bentoml serve kept running with two gateway workers")
    finally:
        stop(srv)
    assert srv.process.returncode != 0 and "runs one worker" in srv.log_text()


def test_a_restart_keeps_the_ledger_and_the_budgets_state(tenants, tenants_config):
    """Run last on its server: it stops it. Before, quotas and usage lived in memory only."""
    env, ledger = tenants_config
    before = usage(tenants, ADMIN).json()
    records = [json.loads(line) for line in (ledger / "usage.jsonl").read_text().splitlines()]
    assert {r["tenant"] for r in records} >= {"alpha", "beta", "gamma", "delta"}
    assert not any(key in json.dumps(records) for key in (ADMIN, ALPHA, BETA, GAMMA, DELTA))
    stop(tenants)
    again = serve(env)
    try:
        after = usage(again, ADMIN).json()
        assert totals(after) == totals(before) and after["budgets"] == before["budgets"]
        r, _ = chat(again, ALPHA, stream=False)
        assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
        with pytest.raises(openai.RateLimitError):
            client(again, GAMMA).completions.create(model=TINY, prompt=[5], max_tokens=1)
    finally:
        stop(again)


# --- the quotas' arithmetic, in-process ------------------------------------------------------------

def test_the_concurrency_cap_and_per_model_budgets():
    team = TenantConfig(name="team", max_concurrency=2, models=["a"],
                        budgets=[Budget(period="minute", completion_tokens=10, models=["a"])])
    quotas = Quotas([team], clock=lambda: 1_000_000.0)
    first, second, third = (quotas.open(team, "key-x") for _ in range(3))
    first.admit("a", "a", 1, 6)
    second.admit("a", "a", 1, 6)  # 4 left when admitted: may pass the budget by its own max_tokens at most
    with pytest.raises(Exception) as capped:
        third.admit("a", "a", 1, 1)
    assert (capped.value.status, capped.value.code) == (429, "rate_limit_exceeded")
    first.generated(6)
    quotas.close(first, 200)
    with pytest.raises(Exception) as spent:  # 10 - 6 used - 6 reserved: none left
        third.admit("a", "a", 1, 1)
    assert spent.value.code == "insufficient_quota"
    with pytest.raises(Exception) as other:
        quotas.open(team, "key-x").admit("b", "b", 1, 1)
    assert other.value.code == "model_not_found"
    quotas.close(second, 200)  # it generated nothing: its reservation is released
    third.admit("a", "a", 1, 1)
    assert quotas.budgets("team")[0]["completion_tokens"] == {"limit": 10, "used": 6, "reserved": 1, "remaining": 3}
