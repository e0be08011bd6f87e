"""Stream plumbing: racing work against what makes it moot (a client that left, a runner gone silent),
waiting for a stream's first item, merging the choices of a request, and Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from openai_api.errors import OpenAIError, client_closed

logger = logging.getLogger("bentochat.api")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx must not buffer a stream


async def race(work: Awaitable, stop: Awaitable, stopped: Callable[[], BaseException]):
    """``work``'s result, unless ``stop`` completes first: then ``work`` is cancelled and ``stopped()``
    raised. Either way, what is left is cancelled and awaited (a stream's generator must be idle
    again before it is closed). ``stop`` is cancelled too: pass a shield of a future that others share."""
    work, stop = asyncio.ensure_future(work), asyncio.ensure_future(stop)
    try:
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise stopped()
    finally:
        for task in (work, stop):
            if not task.done():
                task.cancel()
        await asyncio.wait({work, stop})


async def client_gone(request: Request) -> None:
    """Returns once the client has closed its connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable):
    """``work``'s result, unless the client goes away first: then it is cancelled (which aborts its
    sequences in the engine) and the request ends with 499. For the work done before a response starts
    (a non-streamed answer, a stream's wait for its first token); once a stream runs, its response
    notices the disconnect itself."""
    def gone() -> OpenAIError:
        logger.info("client went away before the answer; its generation is aborted")
        return client_closed()

    return await race(work, client_gone(request), gone)


async def started(stream: AsyncIterator) -> AsyncIterator:
    """Wait for the stream's first item, so that what fails before it (a full queue, a runner that is
    down) becomes the HTTP status of a streamed response rather than an error inside it."""
    it = aiter(stream)
    try:
        first = await anext(it)
    except StopAsyncIteration:
        first = it = None

    async def replay():
        if it is not None:
            yield first
            async for item in it:
                yield item

    return replay()


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators, yielding ``(index, item)`` as items arrive; one stream is
    read directly, several each by a task of its own."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:  # leaving it early closes it, as cancelling a pump would
            async for item in stream:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, stream):
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except Exception as e:  # cancellation is not an item: it ends the pump quietly
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(events: AsyncIterator, data: Callable[[object], str], error: Callable[[OpenAIError], str],
        last: str = "") -> StreamingResponse:
    """``events`` as Server-Sent Events, each written by ``data``; an OpenAI error once the headers
    are sent is reported in-band (``error``), as OpenAI does; ``last`` closes the stream."""
    async def body():
        try:
            async for event in events:
                yield data(event)
        except OpenAIError as e:
            yield error(e)
        if last:
            yield last

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
