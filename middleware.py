"""ASGI middleware around the whole gateway: the API at ``/v1``, the chat UI at ``/ui`` and BentoML's
own routes (``/metrics``, ``/docs.json``, ``/``). Added to the gateway service in this order, the
first outermost:

- ``RequestIds``: every response carries ``x-request-id`` (the client's, if it sent a usable one),
  and every BentoChat log line written while handling the request names it.
- ``Readiness``: ``/readyz`` and ``/readyz/<model>``, the gateway's readiness: every configured model,
  or the one named, has a ready runner. Outside ``ApiKeys``: probes need no key.
- ``ApiKeys``: with API keys configured, everything but the health probes needs
  ``Authorization: Bearer <key>``; the chat UI signs in with a key instead (Gradio's own sign-in).
  ``/metrics`` (every tenant's counters) needs an admin key, or none with ``public_metrics``. A client
  that keeps sending wrong keys, or wrong UI passwords, is refused with 429 for a while
  (``FailedAttempts``). The accepted key is the scope's ``API_KEY`` entry, its tenant and weight
  ``ids.TENANT``, and the request's ``quotas.Account`` ``ids.ACCOUNT``, closed once it is answered.
- ``BodyLimit``: a body over the configured size is refused with 413 before it is read.

``runners.draining.Draining`` goes right inside ``RequestIds`` (and around each runner service): after
SIGTERM it answers new requests 503 while those in flight finish.

CORS (Starlette's middleware, configured from ``cors:``) goes outside all four, so that browsers'
preflight requests, which carry no key, are answered.

``UiSignIn`` goes around the chat UI's Gradio app when keys are set (``ui.chat.chat_ui_app``).
``label_metrics_by_route`` keeps BentoML's request metrics to one series per route, those of unknown
paths there from the start: BentoML labels them with the path, so every unknown path a scanner tries
would add series.
"""

from __future__ import annotations

import functools
import logging
import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.responses import JSONResponse

from models.tenants import TenantConfig, key_digest, key_id
from openai_api.errors import OpenAIError, admin_only, model_not_found
from openai_api.ids import ACCOUNT, API_KEY, REQUEST_ID, TENANT
from quotas import Quotas, Sessions

logger = logging.getLogger("bentochat.http")

PROBES = ("/readyz", "/livez", "/healthz")
_CLIENT_ID = re.compile(r"[!-~]{1,128}")  # visible ASCII, no spaces: safe in headers and log lines


class RequestIdFilter(logging.Filter):
    """Gives every record a ``request_id`` (``-`` outside a request), for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestIds:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        request_id = given if given and _CLIENT_ID.fullmatch(given) else f"req-{uuid.uuid4().hex}"
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class FailedAttempts:
    """Wrong keys or passwords per client address: past ``limit`` within ``window_s`` seconds, the
    address is refused (429) until the oldest of those failures leaves the window; but a key already
    accepted from that address before still is, so that a guesser does not lock out the clients at
    work beside it. The client address is the connection's, or the one a trusted proxy forwards
    (``forwarded_allow_ips``). At most ``max_clients`` addresses with failures, and as many accepted
    address and key pairs, are remembered, the least recent forgotten first."""

    def __init__(self, limit: int = 10, window_s: float = 60.0, max_clients: int = 10_000):
        self.limit, self.window_s, self.max_clients = limit, window_s, max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()  # least recent failure first
        self._accepted: OrderedDict[tuple[str, str], None] = OrderedDict()  # least recent first

    def retry_after(self, client: str, key: str | None = None) -> int:
        """Seconds until ``client`` may try again (with ``key``); 0 when it may now."""
        failures, now = self._failures.get(client), time.monotonic()
        if not failures or len(failures) < self.limit or (client, key) in self._accepted:
            return 0
        wait = self.window_s - (now - failures[0])
        return int(wait) + 1 if wait > 0 else 0

    def failed(self, client: str) -> None:
        now = time.monotonic()
        failures = self._failures
        failures.setdefault(client, deque(maxlen=self.limit)).append(now)
        failures.move_to_end(client)
        while len(failures) > self.max_clients or now - next(iter(failures.values()))[-1] > self.window_s:
            failures.popitem(last=False)  # the least recent failure first

    def accepted(self, client: str, key: str) -> None:
        self._accepted[client, key] = None
        self._accepted.move_to_end((client, key))
        if len(self._accepted) > self.max_clients:
            self._accepted.popitem(last=False)


def too_many_failures(retry_after: int) -> OpenAIError:
    return OpenAIError(429, f"Too many failed sign-in attempts from this address; retry after {retry_after} s.",
                       code="too_many_failed_attempts", headers={"Retry-After": str(retry_after)})


def _client(scope) -> str:
    return (scope.get("client") or ("unknown",))[0]


class ApiKeys:
    """Needs a configured key on every path but the probes, the UI (it signs in with a key itself)
    and, with ``public_metrics``, ``/metrics``. Wrong keys count as failed attempts (missing ones
    do not: a client that forgot its key guesses nothing). ``keys``: the SHA-256 of each key -> its tenant."""

    def __init__(self, app, keys: dict[str, TenantConfig], quotas: Quotas, public_metrics: bool,
                 attempts: FailedAttempts, ui_path: str = "/ui"):
        self.app, self.keys, self.quotas, self.attempts, self.ui_path = app, keys, quotas, attempts, ui_path
        self.public_metrics = public_metrics

    def _open(self, path: str) -> bool:
        return path in PROBES or (self.public_metrics and path == "/metrics") or path == self.ui_path or \
            path.startswith(self.ui_path + "/")

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or not self.keys or self._open(scope["path"]):
            return await self.app(scope, receive, send)
        client = _client(scope)
        authorization = _header(scope, b"authorization")
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else ""
        wait = self.attempts.retry_after(client, key)
        if wait:
            return await too_many_failures(wait).response()(scope, receive, send)
        digest = key_digest(key)
        tenant = self.keys.get(digest)
        if tenant is None:
            if authorization is not None:  # a wrong key is a guess; a missing one is not
                self.attempts.failed(client)
            logger.info("refused %s %s from %s: no valid API key", scope.get("method", ""), scope["path"], client)
            response = OpenAIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` with a key "
                                        "this server accepts.", code="invalid_api_key").response()
            return await response(scope, receive, send)
        self.attempts.accepted(client, key)
        if scope["path"] == "/metrics" and not tenant.admin:
            return await admin_only("/metrics").response()(scope, receive, send)
        account = self.quotas.open(tenant, key_id(digest))
        status = 500  # unless a response starts

        async def send_with_limits(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), *account.headers]}
            await send(message)

        tokens = TENANT.set((tenant.name, tenant.weight)), ACCOUNT.set(account)
        try:
            await self.app({**scope, API_KEY: key}, receive, send_with_limits)
        finally:
            ACCOUNT.reset(tokens[1])
            TENANT.reset(tokens[0])
            self.quotas.close(account, status)


class Readiness:
    """Answers ``/readyz``: 200 when every configured model (chat and embedding; adapters loaded at
    run time are not configured) has a ready runner, else 503; and ``/readyz/<model>``: the same for
    one configured model id or served LoRA adapter, 404 for a name not served. The body says which
    models are ready, ``{"ready": ..., "models": {"<id>": true | false}}``, and, with a 503, why in
    OpenAI's ``error``. ``registry()`` is the gateway's ``controller.Registry`` (None until it exists)."""

    def __init__(self, app, registry: Callable[[], object | None], path: str = "/readyz"):
        self.app, self.registry, self.path = app, registry, path

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == self.path or path.startswith(self.path + "/")):
            return await self.app(scope, receive, send)
        registry, name = self.registry(), path[len(self.path) + 1:]
        models = {m.id: m.ready for m in registry.entries.values()} if registry is not None else {}
        if name in models:
            models = {name: models[name]}
        elif name:
            if registry is None or registry.adapter(name) is None:
                return await model_not_found(name).response()(scope, receive, send)
            models = {name: True}
        waiting = [model_id for model_id, ready in models.items() if not ready]
        body = {"ready": registry is not None and not waiting, "models": models}
        if not body["ready"]:
            message = f"No runner of {', '.join(f'`{m}`' for m in waiting)} is ready yet." if waiting else "Starting."
            body = {**OpenAIError(503, message, code="not_ready").body().model_dump(), **body}
        await JSONResponse(body, status_code=200 if body["ready"] else 503)(scope, receive, send)


class BodyLimit:
    """Refuses a body over ``max_bytes`` with 413: at once when ``Content-Length`` says so, else
    (a chunked body) as soon as the bytes received pass the limit, before the app sees any of it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> OpenAIError:
        return OpenAIError(413, f"The request body is larger than this server's limit of {self.max_bytes} bytes "
                                "(max_body_mb in bentochat.yaml).", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._too_large().response()(scope, receive, send)
            return await self.app(scope, receive, send)
        if _header(scope, b"transfer-encoding") is None:  # no body at all
            return await self.app(scope, receive, send)
        # A chunked body: read it all (up to the limit) first, then hand it to the app.
        body, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._too_large().response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # what follows the body: the disconnect

        await self.app(scope, replay, send)


UNKNOWN = "/{unknown}"


def route_label(api, api_prefix: str, ui_prefix: str, exact: set[str]) -> Callable[[str], str]:
    """The metric label of a path: itself for ``exact`` paths, the route template under
    ``api_prefix`` (``/v1/models/{model_id}``), ``ui_prefix`` for the whole UI, else ``/{unknown}``
    (``/v1/{unknown}`` under ``api_prefix``): the labels of unknown paths are the function's ``unknown``."""
    from starlette.routing import Match

    @functools.lru_cache(maxsize=4096)
    def label(path: str) -> str:
        if path in exact:
            return path
        if path == ui_prefix or path.startswith(ui_prefix + "/"):
            return ui_prefix
        if path.startswith(api_prefix + "/"):
            scope = {"type": "http", "path": path[len(api_prefix):], "method": "GET", "root_path": ""}
            for route in api.routes:
                if getattr(route, "name", "") != "unknown_route" and route.matches(scope)[0] is not Match.NONE:
                    return api_prefix + getattr(route, "path_format", route.path)
            return api_prefix + UNKNOWN
        return UNKNOWN

    label.unknown = (UNKNOWN, api_prefix + UNKNOWN)
    return label


def label_metrics_by_route(label: Callable[[str], str], unknown_codes: tuple[int, ...]) -> None:
    """Make BentoML's request metrics label each request with ``label(path)``, a route rather than
    the raw path; the series of ``label.unknown`` with ``unknown_codes`` (what unknown paths are
    answered) exist from the start, so that a scanner adds none. BentoML 1.4 builds its metrics
    middleware, outermost, from this module attribute when a server process sets up its app, so this
    must run at import of the service, before that."""
    from bentoml._internal.context import server_context
    from bentoml._internal.server.http import instruments

    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "bentochat_labels", False):
        return

    class RouteLabelledMetrics(base):
        bentochat_labels = True

        def __init__(self, app, **options):
            super().__init__(self._with_real_path, **options)
            self.inner = app

        def _setup(self):
            super()._setup()
            for endpoint in label.unknown:
                labels = {"endpoint": endpoint, "service_name": server_context.bento_name,
                          "service_version": server_context.bento_version, "runner_name": server_context.service_name}
                self.metrics_request_in_progress.labels(**labels)
                for code in unknown_codes:
                    self.metrics_request_total.labels(**labels, http_response_code=code)
                    self.metrics_request_duration.labels(**labels, http_response_code=code)

        async def _with_real_path(self, scope, receive, send):
            if "bentochat.path" in scope:
                scope = {**scope, "path": scope["bentochat.path"]}
            await self.inner(scope, receive, send)

        async def __call__(self, scope, receive, send):
            if scope["type"] in ("http", "websocket"):
                scope = {**scope, "bentochat.path": scope["path"], "path": label(scope["path"])}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = RouteLabelledMetrics


def one_span_per_request() -> None:
    """Make BentoML's OpenTelemetry middleware open a span per request only, not also one per message
    a response sends: for a streamed answer that is a span per token, in the gateway and in the runner,
    whatever tracing is configured (opentelemetry's own ``exclude_spans``, which BentoML 1.4 does not
    set). BentoML imports the class when a server process sets up its app, so this must run at import
    of the service, before that."""
    from opentelemetry.instrumentation import asgi

    base = asgi.OpenTelemetryMiddleware
    if getattr(base, "bentochat_spans", False):
        return

    class OneSpanPerRequest(base):
        bentochat_spans = True

        def __init__(self, app, *args, exclude_spans=None, **options):
            super().__init__(app, *args, exclude_spans=exclude_spans or ["send"], **options)

    asgi.OpenTelemetryMiddleware = OneSpanPerRequest


class UiSignIn:
    """Around the Gradio app of the chat UI, when it signs in with API keys: counts failed sign-ins
    (as ``ApiKeys`` counts wrong keys), and lets only what the sign-in page itself needs through
    without a signed-in session. Gradio checks the session on its API routes, but not on all (its
    heartbeat, cancel, reset and stream routes answer anyone)."""

    OPEN = {"", "/", "/login", "/login/", "/logout", "/config", "/config/", "/theme.css", "/favicon.ico",
            "/manifest.json", "/robots.txt", "/gradio_api/theme.css"}
    OPEN_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")

    def __init__(self, app, gradio_app, attempts: FailedAttempts, sessions: Sessions | None = None):
        self.app, self.gradio, self.attempts, self.sessions = app, gradio_app, attempts, sessions

    def _signed_in(self, scope) -> bool:
        from http.cookies import SimpleCookie

        cookies = SimpleCookie()
        cookies.load(_header(scope, b"cookie") or "")
        cookie_id = self.gradio.cookie_id
        names = (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}")
        return any(name in cookies and cookies[name].value in self.gradio.tokens for name in names)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))  # the path within the page's app
        if path.rstrip("/") == "/login" and scope.get("method") == "POST":
            return await self._sign_in(scope, receive, send)
        if path in self.OPEN or path.startswith(self.OPEN_PREFIXES) or self._signed_in(scope):
            return await self.app(scope, receive, send)
        error = OpenAIError(401, "Sign in to the chat page first.", code="not_signed_in")
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await error.response()(scope, receive, send)

    async def _sign_in(self, scope, receive, send):
        client = _client(scope)
        wait = self.attempts.retry_after(client)
        if wait:
            return await too_many_failures(wait).response()(scope, receive, send)
        status, body, token = 0, b"", ""

        async def reading():
            nonlocal body
            message = await receive()
            body += message.get("body", b"")
            return message

        async def watch(message):
            nonlocal status, token
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    cookie = value.decode("latin-1") if name == b"set-cookie" else ""
                    if cookie.startswith(f"access-token-{self.gradio.cookie_id}="):
                        token = cookie.split("=", 1)[1].split(";", 1)[0]
            await send(message)

        await self.app(scope, reading, watch)
        if status != 200:
            self.attempts.failed(client)
        elif self.sessions is not None and token:  # the session's answers count to the key's tenant
            self.sessions.signed_in(token, parse_qs(body.decode(errors="replace")).get("password", [""])[0])
