"""BentoML service options for a runner: its name, resources and traffic limits from bentochat.yaml."""

from __future__ import annotations

import re

from models.config import ServedModel

REQUEST_TIMEOUT_S = 3600  # a long generation streams for minutes; BentoML's default of 60 s would cut it
# BentoML's client to a dependency closes its connection pool after 100 requests or 300 s by default,
# and with it every stream still running on it: the gateway would lose requests under load.
NEVER_RECYCLE = {"max_requests": 2**31 - 1, "max_age": 1e9}


def runner_name(served: ServedModel) -> str:
    return "runner-" + re.sub(r"[^a-z0-9]+", "-", served.id.lower()).strip("-")


def service_options(served: ServedModel, kind: str) -> dict:
    resources = {"gpu": len(served.gpus)} if served.gpus else {}
    traffic: dict = {"timeout": REQUEST_TIMEOUT_S}
    if kind == "embedding":  # chat engines bound their own queue (429) and must still take abort calls
        traffic["max_concurrency"] = served.max_concurrency + served.max_queue
    return {
        "name": runner_name(served),
        "description": f"BentoChat {kind} runner for {served.id} ({served.model})",
        "resources": resources,
        "traffic": traffic,
        "runner_connection": NEVER_RECYCLE,
        "workers": 1,  # one engine per model replica; scale with replicas, not workers
    }
