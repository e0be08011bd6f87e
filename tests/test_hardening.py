"""End to end, on the session's `bentoml serve`: requests that used to stop a model or the gateway,
bursts, bodies and clients that go away, what proxies and operators see."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import statistics
import threading
import time
import uuid

import httpx
import openai
import pytest

from conftest import ARTIFACTS, CHAT, EMBED, LORA_BASE, ONE_SLOT, TINY, start_serving, stop, wait_ready

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a cat who learns to sail."}]


def post(server, route: str, body, timeout: float = 120) -> httpx.Response:
    return httpx.post(server.v1 + route, json=body, timeout=timeout)


HTTP = httpx.Client(timeout=10)  # shared: a new client costs ~0.1 s here, which polls and timings would count


def stats(server, model: str = CHAT) -> dict:
    return HTTP.get(server.v1 + "/stats").json()["data"][model]


def assert_answers(client, model=CHAT):
    r = client.chat.completions.create(model=model, messages=HELLO, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1


@pytest.mark.parametrize("extra, param", [
    ({"seed": 2**64}, "seed"),
    ({"temperature": 1e-40}, "temperature"),
    ({"temperature": 0.7, "repetition_penalty": 1e-40}, "repetition_penalty"),
    ({"min_tokens": 2, "stop_token_ids": [-100000]}, "stop_token_ids"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"),
])
def test_requests_that_stopped_the_engine_are_400_and_the_model_answers_after(server, client, extra, param):
    for route, body in (("/chat/completions", {"messages": HELLO}), ("/completions", {"prompt": "Hello"})):
        r = post(server, route, {"model": CHAT, "max_tokens": 4, **body, **extra})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
    assert_answers(client)


def test_schemas_too_large_to_compile_are_400_before_compiling(server, client):
    """A 280 kB schema, and a 33 kB one that becomes 500 kB of grammar: both cost seconds and tens of
    megabytes to compile, and the runner's cache would keep them."""
    enum = {"type": "string", "enum": [f"value-{i:05d}-{'x' * 16}" for i in range(10000)]}
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)}}
    before = stats(server)["grammars_compiled"]
    for schema in (enum, wide):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=4, response_format={
                "type": "json_schema", "json_schema": {"name": "big", "schema": schema}})
        assert e.value.body["param"] == "response_format.json_schema.schema"
        assert "at most 262,144" in e.value.body["message"]
    assert stats(server)["grammars_compiled"] == before
    assert_answers(client)


def test_empty_prompts_start_from_bos_or_are_400_and_stall_nothing(server, client, chat_tokenizer):
    r = client.completions.create(model=CHAT, prompt="", max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 1 and r.usage.completion_tokens == 3  # the BOS token alone, as OpenAI
    for prompt, param in (([[]], "prompt[0]"), ([], "prompt")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=CHAT, prompt=prompt, max_tokens=3)
        assert e.value.body["param"] == param
    assert_answers(client)
    assert stats(server)["waiting"] == 0


def test_200_concurrent_streams_get_only_200s_or_429s(server):
    """The default configuration (64 running, 256 waiting) serves a burst of 200 streams; before,
    the gateway's pool of 100 runner connections held the health polls back, the runner was marked
    down and 136 of them got 503."""
    async def run():
        statuses = collections.Counter()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(limits=limits, timeout=300) as http, \
                openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, http_client=http) as c:
            async def one(i):
                try:
                    stream = await c.chat.completions.create(
                        model=CHAT, stream=True, max_tokens=6, messages=[{"role": "user", "content": f"Count to {i}"}],
                        extra_body={"min_tokens": 6})
                    finish = [ch.choices[0].finish_reason async for ch in stream if ch.choices]
                    statuses[200 if finish[-1] == "length" else repr(finish)] += 1
                except openai.APIStatusError as e:
                    statuses[e.status_code] += 1
                except openai.APIError as e:  # an error inside a stream
                    statuses[repr(e)] += 1
            await asyncio.gather(*(one(i) for i in range(200)))
        # (a client of its own: a connection of the burst's pool, idle past the server's keep-alive while the
        # last streams ran, may be closed just as it is reused, a ReadError that has nothing to do with this)
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=300) as c:
            many = await c.completions.create(model=CHAT, prompt=[f"Hello {i}" for i in range(8)], n=14, max_tokens=3)
        return statuses, many

    statuses, many = asyncio.run(run())
    assert set(statuses) <= {200, 429} and statuses[200] > 0, statuses
    assert len(many.choices) == 112 and many.usage.completion_tokens > 0


def test_embeddings_under_load_and_a_call_of_2048_inputs(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120) as c:
            singles = await asyncio.gather(*(c.embeddings.create(model=EMBED, input=f"text {i}") for i in range(64)))
            big = await c.embeddings.create(model=EMBED, input=[f"sentence number {i}" for i in range(2048)])
            return singles, big

    singles, big = asyncio.run(run())
    assert all(len(s.data[0].embedding) == 384 for s in singles)
    assert [d.index for d in big.data] == list(range(2048))
    start = time.monotonic()  # alone after the burst: encoded at once, not held back to wait for a batch
    one = HTTP.post(server.v1 + "/embeddings", json={"model": EMBED, "input": "sentence number 7"}).json()
    assert time.monotonic() - start < 2
    assert big.data[7].embedding == pytest.approx(one["data"][0]["embedding"], abs=1e-4)


def test_large_bodies_are_413_and_the_loop_stays_responsive(server):
    big = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "word " * 2_000_000}]}).encode()
    assert len(big) > 8 * 2**20
    r = httpx.post(server.v1 + "/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunks = (big[i:i + 2**16] for i in range(0, len(big), 2**16))  # no Content-Length: counted as it comes
    r = httpx.post(server.v1 + "/chat/completions", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413

    # Under the limit but far over the context: tokenizing it takes seconds, off the event loop.
    body = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "word " * 1_200_000}]}).encode()
    result = {}
    sender = threading.Thread(target=lambda: result.update(r=httpx.post(
        server.v1 + "/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=120)))
    sender.start()
    latencies = []
    while sender.is_alive():
        start = time.monotonic()
        HTTP.get(server.v1 + "/models")
        latencies.append(time.monotonic() - start)
        time.sleep(0.05)
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"
    assert len(latencies) >= 5 and statistics.median(latencies) < 0.1, latencies


def test_lone_surrogates_are_400_and_the_connection_stays_usable(server):
    bad = '"\\ud800"'
    with httpx.Client(base_url=server.v1, headers={"content-type": "application/json"}, timeout=60) as http:
        for route, body in (
            ("/chat/completions", f'{{"model": "{CHAT}", "messages": [{{"role": "user", "content": {bad}}}]}}'),
            ("/completions", f'{{"model": "{CHAT}", "prompt": {bad}}}'),
            ("/embeddings", f'{{"model": "{EMBED}", "input": [{bad}]}}'),
            ("/tokenize", f'{{"model": "{CHAT}", "prompt": {bad}}}'),
            ("/token_check", f'{{"prompts": [{{"model": "{CHAT}", "prompt": {bad}}}]}}'),
            ("/token_check", f'{{"prompts": [{{"model": "{CHAT}", "prompt": []}}]}}'),
        ):
            r = http.post(route, content=body)
            assert r.status_code == 400 and r.headers.get("connection") != "close", (route, r.text)
        assert http.get("/models").status_code == 200


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("route, body, param", [
    ("/embeddings", {"model": EMBED, "input": ""}, "input"),
    ("/embeddings", {"model": EMBED, "input": []}, "input"),
    ("/chat/completions", {"model": CHAT, "messages": HELLO, "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ("/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("/chat/completions", {"model": CHAT, "messages": HELLO, "tool_choice": "auto"}, "tool_choice"),
    ("/chat/completions", {"model": CHAT, "messages": HELLO, "tools": []}, "tools"),
    ("/chat/completions", {"model": CHAT, "messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, "response_format.json_schema.schema"),
    ("/chat/completions", {"model": CHAT, "messages": HELLO, "response_format": {"type": "yaml"}}, "response_format.type"),
    ("/chat/completions", {"model": CHAT, "messages": HELLO, "guided_regex": "("}, "guided_regex"),
    ("/chat/completions", {"model": CHAT, "messages": HELLO, "tools": [TOOL], "tool_choice": {
        "type": "function", "function": {"name": "nowhere"}}}, "tool_choice"),
    ("/chat/completions", {"model": CHAT, "messages": HELLO, "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ("/chat/completions", {"model": CHAT, "messages": HELLO, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 3}}}}}]},
     "tools[0].function.parameters"),
    ("/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content"),
    ("/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}, "messages[0].content"),
])
def test_meaningless_requests_are_400_naming_the_field(server, route, body, param):
    r = post(server, route, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_text_only_and_langchain_hints_in_messages(server):
    r = post(server, "/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    assert "text only" in r.json()["error"]["message"]
    r = post(server, "/embeddings", {"model": EMBED, "input": [[101, 2023]]})
    assert "check_embedding_ctx_length=False" in r.json()["error"]["message"]


def test_published_schema_says_400_and_routes_answer_in_openai_shape(server, client):
    for url, path in ((server.v1 + "/openapi.json", "/chat/completions"), (server.base_url + "/docs.json",
                                                                          "/v1/chat/completions")):
        responses = httpx.get(url).json()["paths"][path]["post"]["responses"]
        assert "422" not in responses and "400" in responses, url
    r = httpx.get(server.v1 + "/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.v1 + "/assistants", json={})
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "unknown_route"
    r = httpx.post(server.v1 + "/responses", json={})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert client.models.retrieve(CHAT).id == CHAT
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_a_non_streamed_request_stops_generating_when_its_client_leaves(server):
    before = stats(server)["tokens_generated"]
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/chat/completions", {"model": CHAT, "messages": STORY, "max_tokens": 400, "min_tokens": 400},
             timeout=1)
    left = time.monotonic()
    while stats(server)["running"] and time.monotonic() - left < 10:
        time.sleep(0.05)
    assert time.monotonic() - left < 1.0
    generated = stats(server)["tokens_generated"] - before
    time.sleep(0.5)
    assert stats(server)["tokens_generated"] - before == generated < 400


def test_a_queued_stream_whose_client_leaves_gives_up_its_place(server):
    long = {"model": ONE_SLOT, "messages": STORY, "max_tokens": 300, "min_tokens": 300, "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=long, timeout=60) as running:
        lines = running.iter_lines()  # (kept: the stream closes when its iterator goes)
        next(lines)  # it runs; the next one waits in the queue
        with pytest.raises(httpx.ReadTimeout):
            with httpx.stream("POST", server.v1 + "/chat/completions", json=long, timeout=1):
                pass
        left = time.monotonic()
        while stats(server, ONE_SLOT)["waiting"] and time.monotonic() - left < 10:
            time.sleep(0.05)
        assert stats(server, ONE_SLOT)["waiting"] == 0


def test_max_tokens_default_caps_requests_that_set_none(client):
    r = client.chat.completions.create(model=TINY, messages=HELLO, temperature=0, extra_body={"min_tokens": 5})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_streams_are_not_buffered_by_proxies_and_carry_request_ids(server):
    own = f"my-trace-{uuid.uuid4().hex[:8]}"
    body = {"model": CHAT, "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, headers={"x-request-id": own}) as r:
        r.read()
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    assert r.headers["x-request-id"] == own
    minted = httpx.get(server.v1 + "/models").headers["x-request-id"]
    assert minted.startswith("req-") and minted != own
    assert httpx.get(server.base_url + "/readyz").headers["x-request-id"]
    deadline = time.monotonic() + 10
    while not re.search(rf"\[bentochat\.runner\] .*request {own}-", server.log.read_text(errors="replace")):
        assert time.monotonic() < deadline, "the runner's log line names the request"
        time.sleep(0.2)
    assert httpx.get(server.v1 + "/models", headers={"x-request-id": "bad id"}).headers["x-request-id"] != "bad id"


def test_random_paths_add_no_metric_series(server):
    def series() -> set[str]:
        text = httpx.get(server.base_url + "/metrics").text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}

    for path in ("/", "/v1/", "/ui/"):  # the routes' own series exist first
        httpx.get(server.base_url + path + "warm-up")
    before = series()
    for _ in range(50):
        httpx.get(f"{server.base_url}/{uuid.uuid4().hex}")
        httpx.post(f"{server.v1}/{uuid.uuid4().hex}")
        httpx.get(f"{server.base_url}/ui/{uuid.uuid4().hex}")
    assert series() == before


def test_operator_metrics_exist_from_the_start(server, client):
    client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=2)
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("bentochat_rejected_requests_total", "bentochat_prompt_tokens_total",
                 "bentochat_prefix_cache_hit_tokens_total", "bentochat_kv_cache_usage_bytes"):
        assert f'{name}{{model="{TINY}"}}' in text, name  # a model no test here has rejected anything for
    kv = re.search(rf'bentochat_kv_cache_usage_bytes{{model="{CHAT}"}} ([0-9.e+]+)', text)
    assert float(kv.group(1)) > 0  # the prefix cache holds the prompt just answered


def test_adapters_loaded_at_run_time_add_no_metric_series(server, lora_adapters):
    """Their tokens count as their model's: before, every name loaded added series that unloading kept."""
    def tokens(text: str, model: str) -> float:
        found = re.search(rf'bentochat_generated_tokens_total{{model="{model}"}} ([0-9.e+]+)', text)
        return float(found.group(1)) if found else 0.0

    before = HTTP.get(server.base_url + "/metrics").text
    for i in range(3):
        r = post(server, "/load_lora_adapter", {"lora_name": f"series-{i}", "lora_path": str(lora_adapters["qv"]),
                                                "model": LORA_BASE})
        assert r.status_code == 200, r.text
    r = post(server, "/completions", {"model": "series-0", "prompt": "Hello", "max_tokens": 3, "min_tokens": 3})
    assert r.status_code == 200, r.text
    for i in range(3):
        assert post(server, "/unload_lora_adapter", {"lora_name": f"series-{i}"}).status_code == 200
    after = HTTP.get(server.base_url + "/metrics").text
    assert 'model="series-' not in after
    assert tokens(after, LORA_BASE) >= tokens(before, LORA_BASE) + 3


# --- a gateway with API keys, behind a proxy on 127.0.0.2 -----------------------------------------

KEYS = ("sk-hardening-a", "sk-hardening-b")
PROXY = "127.0.0.2"  # a loopback address of its own: the only one whose X-Forwarded-For is believed


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_in_store):
    config = tmp_path_factory.mktemp("keyed") / "bentochat.yaml"
    config.write_text(f"""models:
  - {{id: {TINY}, model: {TINY}:latest, kind: chat, trust_remote_code: true, max_tokens_default: 5}}
api_keys: [{", ".join(KEYS)}]
forwarded_allow_ips: [{PROXY}]
responses: {{store_mb: 1}}
""")
    srv = start_serving("service:BentoChat", ARTIFACTS / "keyed.log", env={"BENTOCHAT_CONFIG": str(config)})
    try:
        wait_ready(srv, (TINY,), headers=auth(KEYS[0]))
        yield srv
    finally:
        stop(srv)


def test_unknown_paths_have_their_metric_series_from_the_start(keyed):
    """Run first on its server: before, the first unknown path added a set of `/{unknown}` series."""
    def series() -> set[str]:
        text = httpx.get(keyed.base_url + "/metrics", headers=auth(KEYS[0])).text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}

    before = series()
    assert any('endpoint="/{unknown}"' in s for s in before) and any('endpoint="/v1/{unknown}"' in s for s in before)
    for headers in ({}, auth(KEYS[0])):
        assert httpx.get(f"{keyed.base_url}/{uuid.uuid4().hex}", headers=headers).status_code in (401, 404)
        assert httpx.post(f"{keyed.v1}/{uuid.uuid4().hex}", headers=headers).status_code in (401, 404)
    assert series() == before


def test_stored_responses_belong_to_their_key_and_the_store_is_bounded_by_bytes(keyed):
    a, b = (openai.OpenAI(base_url=keyed.v1, api_key=key, max_retries=0, timeout=120) for key in KEYS)
    r = a.responses.create(model=TINY, input="Hello", max_output_tokens=2)
    assert a.responses.retrieve(r.id).id == r.id
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.create(model=TINY, input="Go on", previous_response_id=r.id, max_output_tokens=2)
    # 400 KB of metadata each: the store (1 MiB here) keeps the last two.
    made = [a.responses.create(model=TINY, input="Hello", max_output_tokens=2, metadata={"note": "x" * 400_000})
            for _ in range(3)]
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(made[0].id)
    assert a.responses.retrieve(made[-1].id).metadata["note"] == "x" * 400_000


def test_forwarded_addresses_are_believed_only_from_the_configured_proxy(keyed):
    """Run last on its server: it locks 127.0.0.1 out for new keys. Before, uvicorn believed any
    X-Forwarded-For from 127.0.0.1 (a new address per wrong key: never 429), and none from elsewhere."""
    def codes(http: httpx.Client, key: str, forwarded_for) -> list[int]:
        return [http.get(keyed.v1 + "/models", headers={**auth(key), "X-Forwarded-For": f}).status_code
                for f in forwarded_for]

    rotating = [f"198.51.100.{i}" for i in range(12)]
    with httpx.Client(timeout=10) as direct:  # from 127.0.0.1: its forwarded addresses are not believed
        assert codes(direct, "wrong", rotating)[-2:] == [429, 429]
        assert codes(direct, KEYS[0], ["198.51.100.99"]) == [200]  # a key accepted from 127.0.0.1 before
    with httpx.Client(timeout=10, transport=httpx.HTTPTransport(local_address=PROXY)) as proxy:
        assert set(codes(proxy, "wrong", rotating)) == {401}  # a client each
        client = ["203.0.113.7"]
        assert codes(proxy, KEYS[0], client) == [200]
        assert codes(proxy, "wrong", client * 11)[-1] == 429
        assert codes(proxy, KEYS[0], client) == [200]  # accepted from it before: still
        assert codes(proxy, KEYS[1], client) == [429]  # never used from it: waits
        assert codes(proxy, KEYS[1], ["203.0.113.8"]) == [200]  # another client behind the proxy
