"""BentoML service options for a runner: its name, resources and traffic limits from bentochat.yaml."""

from __future__ import annotations

import re

from models.config import ServedModel

REQUEST_TIMEOUT_S = 3600  # a long generation streams for minutes; BentoML's default of 60 s would cut it


def runner_name(served: ServedModel) -> str:
    return "runner-" + re.sub(r"[^a-z0-9]+", "-", served.id.lower()).strip("-")


def service_options(served: ServedModel, kind: str) -> dict:
    resources = {"gpu": len(served.gpus)} if served.gpus else {}
    return {
        "name": runner_name(served),
        "description": f"BentoChat {kind} runner for {served.id} ({served.model})",
        "resources": resources,
        "traffic": {"timeout": REQUEST_TIMEOUT_S, "max_concurrency": served.max_concurrency},
        "workers": 1,  # one engine per model replica; scale with replicas, not workers
    }
