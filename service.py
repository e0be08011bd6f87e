"""BentoChat's entry service: the gateway with the OpenAI routes and the chat UI, and one runner
service per model.

Which models are served is read from bentochat.yaml (or $BENTOCHAT_CONFIG); models missing from
the BentoML model store that BentoChat embeds are imported on the first start.
"""

from __future__ import annotations

import logging

import bentoml

from models.config import load_config
from models.embedded import ensure_available
from models.served import ServedModelInfo
from openai_api.errors import OpenAIError, model_not_found
from openai_api.routes import app
from runners.chat import chat_runner
from runners.embedding import embedding_runner
from runners.placement import REQUEST_TIMEOUT_S
from ui import build_chat_ui, chat_ui_app

logger = logging.getLogger("bentochat")

CONFIG = load_config()
ensure_available(CONFIG)
RUNNERS = {m.id: (chat_runner if m.kind == "chat" else embedding_runner)(m) for m in CONFIG.models}


class Registry:
    """FastChat's controller, in-process: model id -> (what the gateway knows of it, its runner)."""

    def __init__(self, entries: dict[str, tuple[ServedModelInfo, object]]):
        self.entries = entries

    def models(self) -> list[ServedModelInfo]:
        return [info for info, _ in self.entries.values()]

    def info(self, model_id: str) -> ServedModelInfo:
        if model_id not in self.entries:
            raise model_not_found(model_id)
        return self.entries[model_id][0]

    def get(self, model_id: str, kind: str):
        info = self.info(model_id)
        runner = self.entries[model_id][1]
        if info.kind != kind:
            raise OpenAIError(400, f"The model `{model_id}` is an {info.kind} model and does not support this "
                                   f"endpoint.", param="model", code="model_not_supported")
        return info, runner


class Gateway:
    def __init__(self) -> None:
        entries = {m.id: (ServedModelInfo.load(m), getattr(self, _dependency_name(m.id))) for m in CONFIG.models}
        app.state.registry = Registry(entries)
        logger.info("serving %s", ", ".join(entries))


def _dependency_name(model_id: str) -> str:
    return "runner_" + "".join(c if c.isalnum() else "_" for c in model_id)


for _id, _runner in RUNNERS.items():
    setattr(Gateway, _dependency_name(_id), bentoml.depends(_runner))

UI = build_chat_ui(lambda: app.state.registry, [m.id for m in CONFIG.models if m.kind == "chat"],
                   CONFIG.ui.model_list_mode)
Gateway = bentoml.asgi_app(app, path="/v1")(Gateway)
Gateway = bentoml.asgi_app(chat_ui_app(UI, "/ui"), path="/ui")(Gateway)
BentoChat = bentoml.service(name="bentochat", traffic={"timeout": REQUEST_TIMEOUT_S})(Gateway)
