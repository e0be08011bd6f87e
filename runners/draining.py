"""SIGTERM as Kubernetes means it, in each process of ``bentoml serve`` (the gateway and every runner
service): finish what is in flight, refuse what is new, then exit.

uvicorn, which serves each of them, stops listening at SIGTERM and then waits for what is in flight.
A runner would so stop answering the gateway's health polls at once, and the gateway would end every
stream on it as if the runner had died. ``Draining`` (ASGI middleware, added to every service) takes
SIGTERM over when the server starts: from the signal on, new requests get 503 (``shutting_down``) and
``/readyz`` says 503, while the requests in flight, the probes and the ``keep`` paths (a runner's health
polls and aborts; the chat page's heartbeats, which stay open as long as the page) are served as before
and not waited for. Once nothing is in flight, or ``grace_s`` after the signal, the signal goes on to
uvicorn, which shuts down; what still runs then is cut.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from openai_api.errors import OpenAIError

logger = logging.getLogger("bentochat.shutdown")

UNCOUNTED = ("/livez", "/healthz", "/metrics")  # served while draining, and never waited for


def shutting_down() -> OpenAIError:
    """Closing the connection too: a client's next try opens a new one, which a load balancer sends
    to another replica."""
    return OpenAIError(503, "The server is shutting down: it finishes the requests it has and takes no new "
                            "ones. Retry; another replica may answer.", code="shutting_down",
                       headers={"Connection": "close"})


class Draining:
    """Counts the requests in flight in this process; after SIGTERM, refuses new ones (503) until the
    count is 0 or ``grace_s`` has passed, then lets uvicorn shut down. One process, one drain: the
    state is the class's."""

    since: float | None = None  # when SIGTERM came
    busy = 0  # requests in flight, but those under the uncounted and ``keep`` paths
    task: asyncio.Task | None = None  # the drain (a task must be held to be sure to run)

    def __init__(self, app, grace_s: float, keep: tuple[str, ...] = ()):
        self.app, self.grace_s, self.keep = app, grace_s, UNCOUNTED + keep

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":  # the server starts: uvicorn has taken the signals by now
            self._take_sigterm()
        if scope["type"] != "http" or scope["path"].startswith(self.keep):
            return await self.app(scope, receive, send)
        if Draining.since is not None:
            return await shutting_down().response()(scope, receive, send)  # /readyz too: out of the balancer
        Draining.busy += 1
        try:
            await self.app(scope, receive, send)
        finally:
            Draining.busy -= 1

    def _take_sigterm(self) -> None:
        uvicorn_exit = signal.getsignal(signal.SIGTERM)  # uvicorn's Server.handle_exit
        if not callable(uvicorn_exit):  # not served by uvicorn from the main thread: SIGTERM as it was
            return
        loop = asyncio.get_running_loop()

        def drain(sig, frame):
            Draining.task = loop.create_task(self._drain(uvicorn_exit, sig, frame))

        def on_sigterm(sig, frame):
            if Draining.since is None:
                Draining.since = time.monotonic()
                loop.call_soon_threadsafe(drain, sig, frame)

        signal.signal(signal.SIGTERM, on_sigterm)

    async def _drain(self, uvicorn_exit, sig, frame) -> None:
        logger.warning("SIGTERM: finishing the %d requests in flight (at most %s s); new ones get 503",
                       Draining.busy, self.grace_s)
        while Draining.busy and time.monotonic() - Draining.since < self.grace_s:
            await asyncio.sleep(0.05)
        if Draining.busy:
            logger.warning("grace period over: the %d requests still in flight are cut", Draining.busy)
            server = getattr(uvicorn_exit, "__self__", None)  # uvicorn's Server: not to wait for them any longer
            if server is not None:
                server.config.timeout_graceful_shutdown = 0
        else:
            logger.info("nothing left in flight: shutting down")
        uvicorn_exit(sig, frame)
