"""Starting, stopping and pausing the real `bentoml serve`: ready only once every model is; with a tiny model so that it is quick: SIGTERM lets
the streams in flight finish (and answers new requests 503 meanwhile), and a runner that is stopped for
longer than a health blip keeps its streams and its model listed. Each test has a server of its own,
which it stops."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from conftest import ARTIFACTS, CHAT, EMBED, TINY_LONG, listed, process_tree, start_serving, stop, wait_ready
from models.config import HealthConfig

pytestmark = pytest.mark.slow

HEALTH = {"interval_s": 0.5, "timeout_s": 1.0, "failures": 2}  # a silent runner is noticed within 3 s
BLIP_S = HealthConfig(**HEALTH).bound_s
STREAMS, TOKENS = 4, 100  # two run at once, two wait: seconds of generation on a busy machine
PROMPT = [{"role": "user", "content": "Tell me a story about a cat"}]


@pytest.fixture
def tiny_server(tmp_path, tiny_long_in_store):
    config = tmp_path / "bentochat.yaml"
    config.write_text(f"""models:
  - {{id: {TINY_LONG}, model: {TINY_LONG}:latest, kind: chat, trust_remote_code: true, max_concurrency: 2}}
health: {HEALTH}
shutdown_grace_s: 120
""")
    srv = start_serving("service:BentoChat", ARTIFACTS / "lifecycle.log", env={"BENTOCHAT_CONFIG": str(config)})
    try:
        wait_ready(srv, (TINY_LONG,))
        yield srv
    finally:
        stop(srv, signal.SIGKILL)


def test_a_starting_server_is_ready_only_once_every_configured_model_is(tmp_path, embedded_models):
    """The embedded chat model's runner loads for longer than the embedding model's: /readyz said 200 as soon
    as the embedding runner was up, and chats got 503 for seconds after. At its first 200 now, both models
    are listed and both answer; before it, the 503's body names the model that waits."""
    config = tmp_path / "bentochat.yaml"
    config.write_text(f"models:\n  - {{id: {CHAT}, model: {CHAT}:latest}}\n"
                      f"  - {{id: {EMBED}, model: {EMBED}:latest, kind: embedding}}\nhealth: {HEALTH}\n")
    srv = start_serving("service:BentoChat", ARTIFACTS / "lifecycle-start.log", env={"BENTOCHAT_CONFIG": str(config)})
    try:
        deadline, waiting = time.monotonic() + 600, set()
        while True:
            assert srv.process.poll() is None and time.monotonic() < deadline, srv.log_text()[-3000:]
            try:
                r = httpx.get(srv.base_url + "/readyz", timeout=2)
            except httpx.HTTPError:  # not listening yet
                time.sleep(0.1)
                continue
            if r.status_code == 200:
                break
            waiting |= {m for m, ready in r.json()["models"].items() if not ready}
            time.sleep(0.1)
        assert listed(srv) == {CHAT, EMBED}
        assert client(srv).chat.completions.create(model=CHAT, messages=PROMPT, max_tokens=2).choices
        assert client(srv).embeddings.create(model=EMBED, input=["hello"]).data
        assert CHAT in waiting  # it was seen loading
    finally:
        stop(srv)


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0, timeout=120)


def reference(srv) -> str:
    answer = client(srv).chat.completions.create(model=TINY_LONG, messages=PROMPT, max_tokens=TOKENS, temperature=0,
                                                 extra_body={"min_tokens": TOKENS})
    assert answer.usage.completion_tokens == TOKENS
    return answer.choices[0].message.content


def open_streams(srv) -> tuple[list[threading.Thread], list[dict]]:
    """STREAMS streams of TOKENS tokens each, read on threads of their own; returns once the runner
    holds all of them (running or waiting)."""
    results: list[dict] = []

    def read():
        got = {"text": "", "finish": None, "tokens": None, "error": None}
        try:
            for chunk in client(srv).chat.completions.create(
                    model=TINY_LONG, messages=PROMPT, max_tokens=TOKENS, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"min_tokens": TOKENS}):
                if chunk.choices:
                    got["text"] += chunk.choices[0].delta.content or ""
                    got["finish"] = chunk.choices[0].finish_reason or got["finish"]
                elif chunk.usage:
                    got["tokens"] = chunk.usage.completion_tokens
        except openai.APIError as e:
            got["error"] = repr(e)
        results.append(got)

    threads = [threading.Thread(target=read) for _ in range(STREAMS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while True:
        stats = httpx.get(srv.v1 + "/stats", timeout=5).json()["data"].get(TINY_LONG, {})
        if stats.get("running", 0) + stats.get("waiting", 0) == STREAMS and stats.get("running"):
            return threads, results
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def assert_complete(threads, results, expected: str) -> None:
    for t in threads:
        t.join(180)
    assert len(results) == STREAMS
    for got in results:
        assert (got["error"], got["finish"], got["tokens"]) == (None, "length", TOKENS), got
        assert got["text"] == expected, got  # the last token too


def test_sigterm_lets_streams_in_flight_finish_and_refuses_new_requests(tiny_server):
    expected = reference(tiny_server)
    threads, results = open_streams(tiny_server)
    tiny_server.process.send_signal(signal.SIGTERM)  # to `bentoml serve`, as Kubernetes does
    deadline = time.monotonic() + 10
    while True:  # the signal reaches the gateway's process through `bentoml serve`
        try:
            client(tiny_server).chat.completions.create(model=TINY_LONG, messages=PROMPT, max_tokens=1)
        except openai.APIStatusError as e:
            assert e.status_code == 503 and e.body["code"] == "shutting_down", e
            assert e.response.json()["error"]["type"] == "service_unavailable"
            break
        assert time.monotonic() < deadline, "a new request was still served after SIGTERM"
        time.sleep(0.1)
    assert httpx.get(tiny_server.base_url + "/readyz", timeout=5).status_code == 503  # out of the load balancer
    assert_complete(threads, results, expected)
    assert tiny_server.process.wait(60) is not None  # and then it exits by itself


def runner_process(srv) -> list[psutil.Process]:
    """The runner's worker and its children."""
    runner = next(p for p in process_tree(srv) if "runner-" + TINY_LONG in " ".join(p.cmdline()))
    return [runner, *runner.children(recursive=True)]


def test_a_runner_stopped_longer_than_a_health_blip_keeps_its_streams_and_its_model(tiny_server):
    expected = reference(tiny_server)
    threads, results = open_streams(tiny_server)
    runner = runner_process(tiny_server)
    for p in runner:
        p.send_signal(signal.SIGSTOP)
    try:
        time.sleep(BLIP_S + 3)  # the polls found it silent seconds ago
        assert TINY_LONG in listed(tiny_server)
        assert all(t.is_alive() for t in threads), results
    finally:
        for p in runner:
            p.send_signal(signal.SIGCONT)
    assert_complete(threads, results, expected)
