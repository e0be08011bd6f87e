"""The gateway's transport to its runners: BentoML clients made for streams that run for minutes
(``connect``, ``unbounded``), and ``RunnerStream``, the token events of one call on a replica, which
ends with ``RunnerSilent`` as soon as the health polls give up on the replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import bentoml
import httpx
from bentoml.exceptions import BentoMLException

from runners.engine.sequence import TokenEvent
from runners.wire import NEVER_RECYCLE, REQUEST_TIMEOUT_S, read_events


class RunnerSilent(ConnectionError):
    """The health polls gave up on the replica (it refused them, or was silent for ``health.hold_s``)
    while a call on it was still waiting."""

    def __init__(self):
        super().__init__("the runner stopped answering the gateway's health polls")


def error_answer(exc: BaseException) -> dict | None:
    """What a runner answered a call that failed with ``exc``, in its API's own shape: ``{"error", "fault"}``,
    a fault of its own for a 5xx status (BentoML's clients raise an error status as a ``BentoMLException``);
    None when it gave no answer: a connection refused or cut, a timeout."""
    if not isinstance(exc, BentoMLException):
        return None
    return {"error": str(exc), "fault": int(exc.error_code) >= 500}


def unbounded(client):
    """A BentoML client whose connection pool has no size limit and is never recycled.

    Every stream holds a connection for as long as it runs. The clients' default pools of 100 made
    the 101st concurrent call wait for a free connection, health polls among them, so a runner under
    load looked silent and was marked down, cutting every stream on it. The engine bounds the work
    itself (its queue answers 429), so the transport must not. (A dependency's client would also
    recycle its pool after 100 calls or 300 s, closing the streams still running on the old one.)
    """
    inner = vars(client).get("_async", client)  # a dependency's RemoteProxy wraps an AsyncClient
    if "_session_manager" in vars(inner):  # a dependency in this bentoml serve: aiohttp underneath
        manager = inner._session_manager
        manager.max_requests, manager.max_age = NEVER_RECYCLE["max_requests"], NEVER_RECYCLE["max_age"]
        make = manager._make_client

        def make_unbounded():
            session = make()
            session.connector._limit = session.connector._limit_per_host = 0  # 0 is no limit in aiohttp
            return session

        manager._make_client = make_unbounded
    else:  # bentoml.AsyncHTTPClient on a runner's http(s) URL: httpx underneath
        def make_unbounded(client_cls, url, headers, timeout, app=None):
            return client_cls(base_url=url, headers=headers, timeout=timeout, follow_redirects=True,
                              limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))

        client._make_client = make_unbounded
    return client


async def connect(url: str):
    """An unbounded client of the runner served at ``url``, once it has read the runner's API schema."""
    client = unbounded(bentoml.AsyncHTTPClient(url, server_ready_timeout=0, timeout=REQUEST_TIMEOUT_S))
    try:
        await client.__aenter__()
    except BaseException:
        await client.close()
        raise
    return client


class RunnerStream:
    """The token events of one ``generate`` call on a replica, read from the transport by one task of
    its own. A call on a runner that hangs (no answer, no closed connection) would wait for ever: the
    stream ends with :class:`RunnerSilent` as soon as ``down`` is done (the health polls gave up on the
    replica). One reader task a stream; a token costs a queue's put and get."""

    _END = object()

    def __init__(self, chunks: AsyncIterator, down: asyncio.Future):
        self.chunks, self.down = chunks, down
        self.queue: asyncio.Queue = asyncio.Queue()
        down.add_done_callback(self._silent)
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        # No exception outlives this frame with its traceback: the traceback holds this frame, the frame
        # holds self, and self the task or queue that would hold the exception, a cycle that only the
        # garbage collector's full collections free (tens of milliseconds of the gateway's time, a few
        # a minute under load; docs/teams.md). So the error goes to the consumer without its traceback,
        # and close()'s cancellation, how most streams end, ends the task instead of being kept in it.
        try:
            async for event in read_events(self.chunks):
                self.queue.put_nowait(event)
            self.queue.put_nowait(self._END)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # the consumer raises it (RunnerRefused, a failed connection)
            self.queue.put_nowait(e.with_traceback(None))
        finally:
            await self.chunks.aclose()  # here, where it is read: never while another task is inside it

    def _silent(self, _) -> None:
        self.queue.put_nowait(RunnerSilent())

    def __aiter__(self) -> RunnerStream:
        return self

    async def __anext__(self) -> TokenEvent:
        item = await self.queue.get()
        if item is self._END:
            self.queue.put_nowait(item)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            try:
                raise item
            finally:
                del item  # or this frame, in the error's traceback, would hold the error: a cycle
        return item

    def close(self) -> None:
        """Stop reading; the reader closes the transport's stream. Nothing to await, so that it also
        runs in full in a task that is being cancelled (a client gone: a stream's task is cancelled
        again at every await)."""
        self.down.remove_done_callback(self._silent)
        self.reader.cancel()
