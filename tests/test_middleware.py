"""The gateway's ASGI middleware in-process, around a small app: API keys and the limit on wrong
ones, body size, request ids. (End to end they are exercised by test_hardening and test_controller.)"""

from __future__ import annotations

import asyncio
import hashlib
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from middleware import ApiKeys, BodyLimit, FailedAttempts, Readiness, RequestIds
from models.tenants import TenantConfig, key_table, with_plain_keys
from openai_api.ids import REQUEST_ID, TENANT
from quotas import Quotas


async def echo(request: Request):
    body = await request.body()
    return JSONResponse({"bytes": len(body), "request_id": REQUEST_ID.get(), "tenant": TENANT.get()})


def keyed(*api_keys: str, tenants: tuple[TenantConfig, ...] = ()) -> dict:
    """ApiKeys' options for plain ``api_keys`` and ``tenants``."""
    every = with_plain_keys(list(tenants), list(api_keys))
    return {"keys": key_table(every), "quotas": Quotas(every)}


def app_with(*layers) -> Starlette:
    app = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])
    for cls, options in reversed(layers):
        app.add_middleware(cls, **options)
    return app


def call(app, method: str, path: str, **kw) -> httpx.Response:
    async def run():
        transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            return await c.request(method, path, **kw)
    return asyncio.run(run())


def test_keys_guard_everything_but_probes_and_the_ui():
    app = app_with((ApiKeys, {**keyed("k1"), "public_metrics": False, "attempts": FailedAttempts()}))
    for path in ("/v1/models", "/metrics", "/docs.json", "/"):
        r = call(app, "GET", path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert call(app, "GET", path, headers={"Authorization": "Bearer k1"}).status_code == 200
    for path in ("/readyz", "/livez", "/healthz", "/ui/", "/ui/config"):  # the UI signs in by itself
        assert call(app, "GET", path).status_code == 200, path
    public = app_with((ApiKeys, {**keyed("k1"), "public_metrics": True, "attempts": FailedAttempts()}))
    assert call(public, "GET", "/metrics").status_code == 200
    assert call(public, "GET", "/v1/models").status_code == 401


def test_readiness_needs_every_configured_model_and_answers_per_model():
    from types import SimpleNamespace

    models = {"chat": SimpleNamespace(id="chat", ready=True), "embed": SimpleNamespace(id="embed", ready=False)}
    registry = SimpleNamespace(entries=models, adapter=lambda name: object() if name == "loaded-lora" else None)
    app = app_with((Readiness, {"registry": lambda: registry}))
    r = call(app, "GET", "/readyz")
    assert r.status_code == 503 and r.json()["models"] == {"chat": True, "embed": False}
    assert r.json()["error"]["code"] == "not_ready" and "`embed`" in r.json()["error"]["message"]
    assert [call(app, "GET", f"/readyz/{name}").status_code for name in ("chat", "embed", "loaded-lora", "nope")] \
        == [200, 503, 200, 404]
    models["embed"].ready = True
    assert call(app, "GET", "/readyz").json() == {"ready": True, "models": {"chat": True, "embed": True}}
    assert call(app, "GET", "/readyzz").status_code == 200  # another path: the app's
    starting = app_with((Readiness, {"registry": lambda: None}))
    assert call(starting, "GET", "/readyz").status_code == 503


def test_a_key_is_its_tenant_given_as_itself_its_hash_or_from_the_environment(monkeypatch):
    """Each request carries its tenant and weight (ids.TENANT, for the runner's fair sharing); the
    plain api_keys are the admin tenant `default`; /metrics, every tenant's counters, is for admins."""
    monkeypatch.setenv("TEAM_KEYS", "k3, sha256:" + hashlib.sha256(b"k4").hexdigest())
    team = TenantConfig(name="team", keys=["k2"], keys_env="TEAM_KEYS", weight=3)
    app = app_with((ApiKeys, {**keyed("k1", tenants=(team,)), "public_metrics": False, "attempts": FailedAttempts()}))
    for key in ("k2", "k3", "k4"):
        r = call(app, "GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.json()["tenant"] == ["team", 3], key
        denied = call(app, "GET", "/metrics", headers={"Authorization": f"Bearer {key}"})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_only"
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Bearer k1"}).json()["tenant"] == ["default", 1]
    assert call(app, "GET", "/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Bearer sha256:" + "0" * 64}).status_code == 401


def test_wrong_keys_are_limited_per_address_but_missing_ones_are_not():
    attempts = FailedAttempts(limit=3, window_s=60)
    app = app_with((ApiKeys, {**keyed("k1", "k2"), "public_metrics": False, "attempts": attempts}))
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
    for _ in range(5):
        assert call(app, "GET", "/v1/models").status_code == 401  # no key: not a guess
    assert [call(app, "GET", "/v1/models", headers={"Authorization": "Bearer bad"}).status_code
            for _ in range(4)] == [401, 401, 401, 429]
    # A key accepted from this address before keeps working; one never used from it waits.
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
    r = call(app, "GET", "/v1/models", headers={"Authorization": "Bearer k2"})
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 61
    assert call(app, "GET", "/readyz").status_code == 200


def test_failed_attempts_leave_the_window():
    attempts = FailedAttempts(limit=2, window_s=0.2)
    attempts.failed("a"), attempts.failed("a")
    assert attempts.retry_after("a") >= 1 and attempts.retry_after("b") == 0
    asyncio.run(asyncio.sleep(0.25))
    assert attempts.retry_after("a") == 0


def test_failed_attempts_of_many_addresses_stay_bounded_and_cheap():
    """Before, every failure past 10,000 addresses scanned them all, and none left while within the window."""
    attempts = FailedAttempts(limit=2, window_s=60, max_clients=1000)
    start = time.monotonic()
    for i in range(15_000):
        attempts.failed(f"10.0.{i // 256}.{i % 256}")
    assert time.monotonic() - start < 2
    assert len(attempts._failures) == 1000
    attempts.failed("10.0.58.151"), attempts.failed("10.0.58.151")  # the last of them: remembered
    assert attempts.retry_after("10.0.58.151") >= 1 and attempts.retry_after("10.0.0.0") == 0  # forgotten


def test_body_limit_by_length_and_by_counting_chunks():
    app = app_with((BodyLimit, {"max_bytes": 1000}))
    assert call(app, "POST", "/x", content=b"a" * 1000).json()["bytes"] == 1000
    r = call(app, "POST", "/x", content=b"a" * 1001)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    async def chunks(n):
        for _ in range(n):
            yield b"a" * 100

    assert call(app, "POST", "/x", content=chunks(10)).json()["bytes"] == 1000
    assert call(app, "POST", "/x", content=chunks(11)).status_code == 413


@pytest.mark.parametrize("given, kept", [("trace-42", True), ("has space", False), ("x" * 200, False)])
def test_request_ids_are_the_clients_when_usable(given, kept):
    app = app_with((RequestIds, {}))
    r = call(app, "GET", "/x", headers={"x-request-id": given})
    assert (r.headers["x-request-id"] == given) is kept
    assert r.json()["request_id"] == r.headers["x-request-id"]  # what the log lines name
    assert call(app, "GET", "/x").headers["x-request-id"].startswith("req-")


def test_tracing_opens_a_span_per_request_not_per_streamed_chunk():
    """What BentoML's OpenTelemetry middleware becomes once the service is imported: a streamed answer
    of many chunks (tokens) traces as one request, where it opened a span per chunk sent."""
    from opentelemetry.instrumentation import asgi
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from starlette.responses import StreamingResponse

    from middleware import one_span_per_request

    async def stream(request: Request):
        async def tokens():
            for i in range(20):
                yield f"data: {i}\n\n"
        return StreamingResponse(tokens(), media_type="text/event-stream")

    one_span_per_request()
    one_span_per_request()  # once is enough, twice changes nothing
    patched = asgi.OpenTelemetryMiddleware
    spans = {}
    for name, cls in (("before", patched.__mro__[1]), ("now", patched)):
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        app = cls(Starlette(routes=[Route("/s", stream)]), tracer_provider=provider)
        assert call(app, "GET", "/s").text.count("data:") == 20
        spans[name] = [span.name for span in exporter.get_finished_spans()]
    assert sum("send" in name for name in spans["before"]) >= 20
    assert not any("send" in name for name in spans["now"]) and spans["now"].count("GET /s") == 1
    assert len(spans["now"]) <= 4  # (and a span for each message received: the request, the disconnect)
    assert patched.__mro__[2] is not patched.__mro__[1]  # not wrapped twice
