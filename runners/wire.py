"""The runner wire protocol, both ends: the runner's ``generate`` writes it, the gateway's
``runner_client.RunnerStream`` reads it. Free of BentoML, torch and Prometheus, so that both import it.

``generate`` takes ``request_id``, ``prompt_ids``, ``params`` (``SamplingParams.to_dict()``), and
optionally ``adapter`` (a LoRA adapter's name), ``tenant`` and ``weight`` (who the request is served for
and that tenant's share of the batch, a positive number; the gateway sends them only where tenants are
configured: ``generate_args``). It streams one JSON object a line: ``{"token": id, "finish_reason": null|"stop"|"length"}``
(with ``"logprob"`` and ``"top_logprobs": [[id, logprob], ...]`` when asked for; the first line with
``"cached_tokens"``, how many of the prompt's tokens the prefix cache gave), or, as its last
line, ``{"error": "...", "code": ...}`` when the engine refused the request (``queue_full``, with
``"retry_after"`` seconds; ``invalid_request``), failed the sequence (``engine_error``) or is dead
(``engine_dead``: the runner then fails its health checks and must be restarted).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from runners.engine.sequence import TokenEvent

REQUEST_TIMEOUT_S = 3600  # a long generation streams for minutes; BentoML's default of 60 s would cut it
# BentoML's client to a dependency closes its connection pool after 100 requests or 300 s by default,
# and with it every stream still running on it: the gateway would lose requests under load.
NEVER_RECYCLE = {"max_requests": 2**31 - 1, "max_age": 1e9}

QUEUE_FULL, INVALID_REQUEST, ENGINE_ERROR, ENGINE_DEAD = "queue_full", "invalid_request", "engine_error", "engine_dead"


class RunnerRefused(Exception):
    """The runner ended a request with an error line instead of (more) tokens."""

    def __init__(self, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after


def generate_args(adapter: str | None, tenant: tuple[str, float] | None) -> dict:
    """``generate``'s optional arguments: the adapter's name and the tenant's, with its weight, each only
    when there is one, so a runner of an earlier version still takes a call without them."""
    args: dict = {"adapter": adapter} if adapter else {}
    if tenant is not None:
        args["tenant"], args["weight"] = tenant
    return args


def token_line(event: TokenEvent) -> str:
    line: dict = {"token": event.token_id, "finish_reason": event.finish_reason}
    if event.logprob is not None:
        line["logprob"], line["top_logprobs"] = event.logprob, event.top_logprobs
    if event.cached_tokens is not None:
        line["cached_tokens"] = event.cached_tokens
    return json.dumps(line) + "\n"


def error_line(code: str, message: str, retry_after: int | None = None) -> str:
    line: dict = {"error": message, "code": code}
    if retry_after is not None:
        line["retry_after"] = retry_after
    return json.dumps(line) + "\n"


async def read_events(chunks: AsyncIterator[str | bytes]) -> AsyncIterator[TokenEvent]:
    """The gateway's end: token events from the runner's stream, whose transport chunks may split or
    join lines; an error line raises :class:`RunnerRefused`."""
    buffer = ""
    async for chunk in chunks:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        *lines, buffer = buffer.split("\n")
        for line in filter(None, lines):
            event = json.loads(line)
            if "error" in event:
                raise RunnerRefused(event.get("code", ENGINE_ERROR), event["error"], event.get("retry_after"))
            top = event.get("top_logprobs")
            yield TokenEvent(event["token"], event["finish_reason"], event.get("logprob"),
                             [tuple(pair) for pair in top] if top is not None else None, event.get("cached_tokens"))
