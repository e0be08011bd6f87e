"""The gateway as FastChat's controller, with runners in `bentoml serve` processes of their own on
loopback: routing to runner URLs, API keys, shortest-queue replicas, a runner's death and return."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest

from conftest import ARTIFACTS, CHAT, EMBED, _free_port, listed, signal_tree, start_serving, stop, wait_ready
from models.config import HealthConfig

pytestmark = pytest.mark.slow

KEY = "sk-bentochat-test"
ORIGIN = "https://chat.example.com"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEALTH = {"interval_s": 0.5, "timeout_s": 1.0, "failures": 2, "hold_s": 2.0}
BOUND_S = HealthConfig(**HEALTH).bound_s  # failures x (interval + timeout), as documented: a dead runner
SILENT_BOUND_S = BOUND_S + HEALTH["hold_s"] + HEALTH["interval_s"] + HEALTH["timeout_s"]  # a hung one, to one poll
LONG = 24  # tokens per request: about 1.5 s on the test machine, so requests wait behind each other
RUNNER_TARGET = "service:runner_" + CHAT.replace("-", "_")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, embedded_models):
    """Two runner processes serving the chat model (one running and eight waiting requests each), and
    a gateway process that knows them only by URL, as replicas of one model, with an API key."""
    tmp = tmp_path_factory.mktemp("deploy")
    runner_config = tmp / "runner.yaml"
    runner_config.write_text(f"models:\n  - {{id: {CHAT}, model: {CHAT}:latest, max_concurrency: 1, max_queue: 8}}\n")
    env = {"BENTOCHAT_CONFIG": str(runner_config)}
    runners = [start_serving(RUNNER_TARGET, ARTIFACTS / f"runner-{i}.log", env=env) for i in range(2)]
    gateway_config = tmp / "gateway.yaml"
    gateway_config.write_text(f"""models:
  - id: {CHAT}
    urls: [{runners[0].base_url}, {runners[1].base_url}]
health: {HEALTH}
api_keys: [{KEY}]
cors: {{allow_origins: ["{ORIGIN}"]}}
""")
    gateway = start_serving("service:BentoChat", ARTIFACTS / "gateway.log", env={"BENTOCHAT_CONFIG": str(gateway_config)})
    state = {"runners": runners, "gateway": gateway, "env": env}
    try:
        for r in runners:
            wait_ready(r)
        wait_ready(gateway, (CHAT,), headers=AUTH)
        yield state
    finally:
        for srv in [state["gateway"], *state["runners"]]:
            stop(srv)


def client_for(gateway, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=120)


def client(deployment, key=KEY) -> openai.OpenAI:
    return client_for(deployment["gateway"], key)


def test_every_v1_call_needs_a_configured_key(deployment):
    gateway = deployment["gateway"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(gateway.v1 + "/models", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(gateway.v1 + "/load_lora_adapter", headers=headers, json={"lora_name": "a", "lora_path": "/"})
        assert r.status_code == 401, headers  # adapters are loaded behind the keys too
    with pytest.raises(openai.AuthenticationError):
        client(deployment, "wrong").chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(gateway.v1 + "/models", headers=AUTH).status_code == 200
    for probe in ("/readyz", "/livez", "/healthz"):  # probes need no key
        assert httpx.get(gateway.base_url + probe).status_code == 200
    for path in ("/metrics", "/docs.json", "/"):  # BentoML's own routes do
        assert httpx.get(gateway.base_url + path).status_code == 401, path
        assert httpx.get(gateway.base_url + path, headers=AUTH).status_code == 200, path
    # Gradio leaves some routes of the page open; without a signed-in session they are closed too.
    assert httpx.get(gateway.base_url + "/ui/gradio_api/heartbeat/abc", timeout=5).status_code == 401
    assert httpx.get(gateway.base_url + "/ui/gradio_api/file=/tmp/chat.json", timeout=5).status_code == 401  # exports

    # The chat UI asks for a key at sign-in.
    with httpx.Client(base_url=gateway.base_url + "/ui") as ui:
        assert ui.get("/config").status_code == 401
        assert ui.post("/login", data={"username": "me", "password": "wrong"}).status_code == 400
        assert ui.post("/login", data={"username": "me", "password": KEY}).status_code == 200
        assert ui.get("/config").status_code == 200


def test_the_chat_page_signs_in_with_a_key_in_a_browser(deployment):
    """What the page needs before sign-in stays open; with the session it chats."""
    from playwright.sync_api import sync_playwright

    from test_ui import BOT, CHROMIUM, send, wait_until_still

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(deployment["gateway"].base_url + "/ui/")
            page.locator("input[type=password]").fill(KEY)
            page.locator("input[type=text]").fill("me")
            page.keyboard.press("Enter")
            send(page, "Hello")
            assert wait_until_still(page, BOT)
        finally:
            browser.close()


def test_browsers_on_allowed_origins_may_call_the_api(deployment):
    gateway = deployment["gateway"]
    preflight = httpx.options(gateway.v1 + "/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(gateway.v1 + "/models", headers={**AUTH, "Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"]
    other = httpx.options(gateway.v1 + "/chat/completions", headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers


def test_chat_through_the_gateway_streams_from_a_runner_elsewhere(deployment):
    c = client(deployment)
    model = {m.id: m for m in c.models.list().data}[CHAT]
    assert (model.model_extra["template"], model.model_extra["context_length"]) == ("tokenizer", 8192)  # from the runner
    full = c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "你好"}], max_tokens=12,
                                     temperature=0)
    streamed = c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "你好"}],
                                         max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == full.choices[0].message.content


def test_the_gateway_is_ready_once_every_configured_model_is_and_says_which_is_not(deployment, tmp_path):
    """A gateway that names the chat model's runner and an embedding runner not started yet: /readyz is
    503 and names the model that waits (it said 200 once any model was up, and chats then got 503 for
    seconds); /readyz/<model> answers for one model. With the embedding runner up, 200."""
    embed_port = _free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"""models:
  - {{id: {CHAT}, urls: [{deployment["runners"][0].base_url}]}}
  - {{id: {EMBED}, kind: embedding, urls: ["http://127.0.0.1:{embed_port}"]}}
health: {HEALTH}
""")
    runner_config = tmp_path / "embed.yaml"
    runner_config.write_text(f"models:\n  - {{id: {EMBED}, model: {EMBED}:latest, kind: embedding}}\n")
    gateway = start_serving("service:BentoChat", ARTIFACTS / "gateway-readiness.log", env={"BENTOCHAT_CONFIG": str(config)})
    embed = None
    try:
        deadline = time.monotonic() + 300
        while not _answers(gateway) or CHAT not in listed(gateway):
            assert time.monotonic() < deadline and gateway.process.poll() is None, gateway.log_text()[-3000:]
            time.sleep(0.5)
        r = httpx.get(gateway.base_url + "/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["ready"] is False and r.json()["models"] == {CHAT: True, EMBED: False}
        assert r.json()["error"]["code"] == "not_ready" and EMBED in r.json()["error"]["message"]
        one = httpx.get(f"{gateway.base_url}/readyz/{CHAT}")
        assert one.status_code == 200 and one.json() == {"ready": True, "models": {CHAT: True}}
        assert httpx.get(f"{gateway.base_url}/readyz/{EMBED}").status_code == 503
        unknown = httpx.get(gateway.base_url + "/readyz/no-such-model")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"

        embed = start_serving("service:runner_" + EMBED.replace("-", "_"), ARTIFACTS / "runner-embed.log",
                              env={"BENTOCHAT_CONFIG": str(runner_config)}, port=embed_port)
        wait_ready(gateway, timeout=300)
        assert httpx.get(gateway.base_url + "/readyz").json() == {"ready": True, "models": {CHAT: True, EMBED: True}}
    finally:
        for srv in (gateway, embed):
            if srv is not None:
                stop(srv)


def _answers(srv) -> bool:
    try:
        httpx.get(srv.base_url + "/livez", timeout=2)
        return True
    except httpx.HTTPError:
        return False


def _runner_stats(srv) -> dict:
    return httpx.post(srv.base_url + "/stats", json={}, timeout=2).json()  # the runner's own BentoML API


def _runner_generate(srv, request_id: str, firsts: list[str], **args) -> list[dict]:
    """The runner's own `generate` over HTTP, as the gateway calls it; its lines. ``firsts``: the
    request ids in the order their first lines came."""
    body = {"request_id": request_id, "prompt_ids": [1, 600, 700, 800],
            "params": {"max_tokens": LONG, "temperature": 0}, **args}
    lines = []
    with httpx.stream("POST", srv.base_url + "/generate", json=body, timeout=600) as r:  # (a queued one waits)
        for line in filter(None, r.iter_lines()):
            if not lines:
                firsts.append(request_id)
            lines.append(json.loads(line))
    return lines


def test_a_runner_serves_a_waiting_tenant_before_a_flooding_tenants_later_requests(deployment):
    """With `tenant` and `weight`, as the gateway sends them where tenants are configured: the runner's
    one slot busy with A's request and two more of A's waiting, B's request is served next; a weight
    that is no share is refused."""
    runner, firsts, results = deployment["runners"][0], [], {}

    def call(request_id: str, tenant: str):
        results[request_id] = _runner_generate(runner, request_id, firsts, tenant=tenant, weight=1.0)

    threads = [threading.Thread(target=call, args=(f"a{i}", "A")) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while (stats := _runner_stats(runner))["running"] != 1 or stats["waiting"] != 2:
        assert time.monotonic() < deadline, stats
        time.sleep(0.01)
    threads.append(threading.Thread(target=call, args=("b", "B")))
    threads[-1].start()
    for t in threads:
        t.join(600)
    assert sorted(results) == ["a0", "a1", "a2", "b"] and firsts[1] == "b", firsts  # first come, first served would have run A's two first
    assert all(len(lines) == LONG and lines[-1]["finish_reason"] == "length" for lines in results.values())
    refused = _runner_generate(runner, "w", [], tenant="B", weight=0)
    assert refused == [{"error": "weight: a tenant's weight must be a positive number", "code": "invalid_request"}]


def test_replicas_share_the_load_and_a_dying_one_loses_no_waiting_request(deployment):
    """Shortest queue spreads 8 requests over both replicas (one running, three waiting on each).
    Killing one then fails only the request it was running; those waiting on it go to the other."""
    runners = deployment["runners"]
    results: list[dict] = []

    def one():
        got = {"tokens": 0, "error": None, "finish": None}
        try:
            stream = client(deployment).chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "hello " * 5}], max_tokens=LONG, temperature=0,
                stream=True, extra_body={"min_tokens": LONG})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    got["tokens"] += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    got["finish"] = chunk.choices[0].finish_reason
        except openai.APIError as e:
            got["error"] = e
        results.append(got)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while True:  # both replicas busy, with requests waiting on each
        stats = [_runner_stats(r) for r in runners]
        if all(s["running"] == 1 and s["waiting"] >= 1 for s in stats):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.01)
    stop(runners[0], signal.SIGKILL)
    with pytest.raises(httpx.ConnectError):  # really gone
        httpx.get(runners[0].base_url + "/readyz")
    for t in threads:
        t.join(120)

    failed = [r for r in results if r["error"] is not None]
    assert len(results) == 8 and len(failed) <= 1, results
    assert all(r["tokens"] > 0 for r in failed), "a request that had not started was lost"
    assert all(r["finish"] == "length" and r["tokens"] == LONG for r in results if r["error"] is None)


def _gone_within_bound(gateway, since: float, bound: float = BOUND_S) -> None:
    while CHAT in listed(gateway, AUTH):
        assert time.monotonic() - since < bound + 1, "the model stayed listed past the documented bound"
        time.sleep(0.1)
    with pytest.raises(openai.InternalServerError) as e:  # 503
        client_for(gateway).chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503 and e.value.code == "model_unavailable"
    assert httpx.get(gateway.base_url + "/readyz").status_code == 503  # the chat model has no runner up


def _back_within_bound(gateway) -> None:
    back = time.monotonic()
    while CHAT not in listed(gateway, AUTH):
        assert time.monotonic() - back < BOUND_S + 1, "the runner answers but its model did not come back"
        time.sleep(0.1)
    r = client_for(gateway).chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(gateway.base_url + "/readyz").status_code == 200


def test_a_runner_that_hangs_past_the_hold_fails_its_running_request_leaves_and_comes_back(deployment):
    """The last replica stops answering (SIGSTOP: no reply, no closed connection) for longer than
    ``health.hold_s``. The request it was generating ends with a 503 once the polls give up on it, not
    at some TCP timeout. (tests/test_lifecycle.py: one stopped for less keeps its streams.)"""
    runner, gateway = deployment["runners"][1], deployment["gateway"]  # the other was killed before
    outcome: dict = {}
    first_token = threading.Event()

    def generate():
        try:
            for chunk in client_for(gateway).chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": "hello"}], max_tokens=200, stream=True,
                    extra_body={"min_tokens": 200}):
                first_token.set()
        except openai.APIError as e:
            outcome["error"], outcome["at"] = e, time.monotonic()

    thread = threading.Thread(target=generate)
    thread.start()
    assert first_token.wait(60)
    signal_tree(runner, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        thread.join(SILENT_BOUND_S + 5)
        assert "error" in outcome and "not available" in str(outcome["error"])
        assert outcome["at"] - stopped < SILENT_BOUND_S + 1
        _gone_within_bound(gateway, stopped, SILENT_BOUND_S)
    finally:
        signal_tree(runner, signal.SIGCONT)
    _back_within_bound(gateway)


def test_a_killed_runner_leaves_within_the_bound_and_a_restarted_one_returns(deployment):
    runners, gateway = deployment["runners"], deployment["gateway"]
    stop(runners[1], signal.SIGKILL)  # the other one is down since the replica test
    _gone_within_bound(gateway, time.monotonic())
    runners[1] = start_serving(RUNNER_TARGET, runners[1].log, env=deployment["env"],
                               port=int(runners[1].base_url.rsplit(":", 1)[1]))
    wait_ready(runners[1])
    _back_within_bound(gateway)
