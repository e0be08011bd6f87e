"""BentoChat's entry service: the gateway with the OpenAI routes and the chat UI, and one runner
service per model.

Which models are served is read from bentochat.yaml (or $BENTOCHAT_CONFIG); models missing from
the BentoML model store that BentoChat embeds are imported on the first start.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path

import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer  # the configuration bentoml serve reads

from starlette.middleware.cors import CORSMiddleware

from controller import Model, Registry, Replica
from models.info import ModelInfo
from runner_client import unbounded
from middleware import (
    PROBES,
    ApiKeys,
    BodyLimit,
    FailedAttempts,
    Readiness,
    RequestIdFilter,
    RequestIds,
    label_metrics_by_route,
    one_span_per_request,
    route_label,
)
from ledger import Ledger
from models.config import ConfigError, ServedModel, load_config
from models.tenants import with_plain_keys
from models.embedded import ensure_available
from openai_api.responses import ResponseStore
from openai_api.routes import app
from quotas import Quotas, Sessions
from runners.chat import chat_runner
from runners.draining import Draining
from runners.embedding import embedding_runner
from runners.base import freeze_startup_heap
from runners.wire import REQUEST_TIMEOUT_S
from ui import build_chat_ui, chat_ui_app

logger = logging.getLogger("bentochat")
if not logger.handlers:  # BentoML configures its own loggers only: BentoChat's warnings must show too
    _handler = logging.StreamHandler()
    _handler.addFilter(RequestIdFilter())  # each line names the request it was written for, if any
    _handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] [%(request_id)s] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

CONFIG = load_config()
GATEWAY = CONFIG.gateway
# uvicorn takes the client's address from X-Forwarded-For (and the scheme from X-Forwarded-Proto) when the
# connection comes from an address in $FORWARDED_ALLOW_IPS, unset: 127.0.0.1, so that any local process
# could name itself any address. BentoML 1.4 passes uvicorn no such option, and its worker processes
# configure uvicorn after importing this service: bentochat.yaml's `forwarded_allow_ips` (none by
# default) sets the variable here.
os.environ["FORWARDED_ALLOW_IPS"] = ",".join(GATEWAY.forwarded_allow_ips)
ensure_available(CONFIG)
# One runner service per model served here; a model given by `urls` is served elsewhere.
# Each tenant's quotas; in the gateway's process, the usage ledger they are rebuilt from and recorded in.
QUOTAS = Quotas(with_plain_keys(GATEWAY.tenants, GATEWAY.api_keys))
RUNNERS = {m.id: chat_runner(m, GATEWAY.lora) if m.kind == "chat" else embedding_runner(m)
           for m in CONFIG.models if not m.remote}


class Gateway:
    def __init__(self) -> None:
        models = []
        for m in CONFIG.models:
            if m.remote:
                models.append(Model(m, [Replica(url) for url in m.urls]))
            else:
                local = Replica("local", client=unbounded(getattr(self, _attribute(m))))
                models.append(Model(m, [local], info=ModelInfo.load(m)))
        self.registry = Registry(models, GATEWAY.health)
        app.state.registry = self.registry
        app.state.responses = ResponseStore(GATEWAY.responses.store_size, int(GATEWAY.responses.store_mb * 2**20))
        app.state.runtime_lora = GATEWAY.lora.runtime_loading
        if CONFIG.keys:
            usage = GATEWAY.usage
            ledger_dir = usage.ledger_dir or os.path.join(os.environ.get("BENTOML_HOME", "~/bentoml"), "usage")
            QUOTAS.keep(Ledger(Path(ledger_dir).expanduser(), int(usage.rotate_mb * 2**20)))
            app.state.quotas = QUOTAS
        logger.info("serving %s", ", ".join(m.id for m in models))
        freeze_startup_heap()

    @bentoml.on_deployment
    def one_worker() -> None:
        """In `bentoml serve`'s own process, before any worker starts: the gateway runs one worker. The
        tenants' quotas (requests under way, reservations), the usage ledger's one writer, the stored
        responses and the chat page's sign-ins live in its process; a second worker would keep budgets
        of its own, and the two would rotate one ledger file (docs/teams.md, "One gateway process")."""
        config = BentoMLContainer.config.services.get().get(BentoChat.name) or {}  # what bentoml serve counts by
        workers = config.get("workers", 1)
        if workers != 1:
            raise ConfigError(f"the gateway (service bentochat) runs one worker, and BentoML's configuration "
                              f"asks for {workers!r} (services.bentochat.workers): its quotas, usage ledger and "
                              "stored responses live in its process. Remove that setting.")

    @bentoml.on_startup
    async def watch_runners(self) -> None:
        self.registry.start()
        # xgrammar (and the torch it loads) takes seconds to import: not on the first structured request.
        threading.Thread(target=importlib.import_module, args=("xgrammar",), name="import-xgrammar", daemon=True).start()


def _attribute(served: ServedModel) -> str:
    """The runner service's name as a Python name: ``runner_smollm2_135m_instruct``."""
    return served.runner_name.replace("-", "_")


for _served in CONFIG.models:
    if _served.id in RUNNERS:
        # At SIGTERM a runner finishes its calls in flight, answering the gateway's health polls and aborts.
        RUNNERS[_served.id].add_asgi_middleware(Draining, grace_s=GATEWAY.shutdown_grace_s, keep=("/stats", "/abort"))
        setattr(Gateway, _attribute(_served), bentoml.depends(RUNNERS[_served.id]))
        # Each runner can also be served on its own, for a gateway elsewhere that names its URL:
        # `bentoml serve service:runner_<id>` (the id lowercased, other characters than letters and digits as `_`).
        globals()[_attribute(_served)] = RUNNERS[_served.id]

# Wrong API keys and wrong UI passwords count together, per client address; the chat page's answers
# count to the signed-in key's tenant.
SIGN_IN_ATTEMPTS = FailedAttempts()
UI_SESSIONS = Sessions(CONFIG.keys, QUOTAS) if CONFIG.keys else None
UI = build_chat_ui(lambda: app.state.registry,
                   [name for m in CONFIG.models if m.kind == "chat" for name in (m.id, *(a.name for a in m.adapters))],
                   GATEWAY.ui.model_list_mode, GATEWAY.ui.log_dir, UI_SESSIONS)
Gateway = bentoml.asgi_app(app, path="/v1")(Gateway)
Gateway = bentoml.asgi_app(chat_ui_app(UI, "/ui", set(CONFIG.keys), SIGN_IN_ATTEMPTS, UI_SESSIONS), path="/ui")(Gateway)
# Readiness is the registry's own (every configured model has a ready runner: the Readiness middleware
# answers /readyz), not BentoML's probe that every dependency is ready.
BentoChat = bentoml.service(name="bentochat", workers=1, traffic={"timeout": REQUEST_TIMEOUT_S},
                            runner_probe={"enabled": False})(Gateway)
# Around every route of the gateway, the first outermost (see middleware.py).
if GATEWAY.cors.allow_origins:
    BentoChat.add_asgi_middleware(CORSMiddleware, allow_origins=GATEWAY.cors.allow_origins, allow_methods=["*"],
                                  allow_headers=["*"], expose_headers=[
                                      "x-request-id", "retry-after",
                                      *(f"x-ratelimit-{what}-{of}" for what in ("limit", "remaining", "reset")
                                        for of in ("requests", "tokens"))])
BentoChat.add_asgi_middleware(RequestIds)
# At SIGTERM: streams in flight finish, new requests get 503; the chat page's heartbeats last as long as the page.
BentoChat.add_asgi_middleware(Draining, grace_s=GATEWAY.shutdown_grace_s, keep=("/ui/gradio_api/heartbeat/",))
BentoChat.add_asgi_middleware(Readiness, registry=lambda: getattr(app.state, "registry", None))
BentoChat.add_asgi_middleware(ApiKeys, keys=CONFIG.keys, quotas=QUOTAS, public_metrics=GATEWAY.public_metrics,
                              attempts=SIGN_IN_ATTEMPTS)
BentoChat.add_asgi_middleware(BodyLimit, max_bytes=int(GATEWAY.max_body_mb * 2**20))
# BentoML's request metrics, in this process and the runners', get one series per route, not per path;
# unknown paths are answered 404, or 401 without a key where keys are set.
label_metrics_by_route(route_label(app, "/v1", "/ui", exact={
    "/", "/docs.json", "/schema.json", "/metrics", *PROBES,
    *(method.route for runner in RUNNERS.values() for method in runner.apis.values())}),
    unknown_codes=(404, 401) if CONFIG.keys else (404,))
one_span_per_request()  # tracing: a span per request, not one per streamed token too (gateway and runners)
