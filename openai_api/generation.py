"""One completion choice against a chat runner: token ids in, text events out."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from middleware import REQUEST_ID
from openai_api.errors import OpenAIError, queue_full, runner_unavailable
from openai_api.protocol import new_id
from openai_api.text_stream import IncrementalDetokenizer, StopStrings

logger = logging.getLogger("bentochat.api")
CONNECT_RETRIES = 2
_background: set[asyncio.Task] = set()


@dataclass
class TextEvent:
    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: list[dict] = field(default_factory=list)  # runner entries of the tokens since the last event


async def unless_disconnected(request, awaitable):
    """``awaitable``'s result, unless the client goes away first: then it is cancelled (which aborts
    its sequences in the engine) and the request ends with 499. For the work done before a response
    starts (a non-streamed answer, a stream's wait for its first token); once a stream runs, its
    response notices the disconnect itself."""
    async def client_gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(awaitable), asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        logger.info("client went away before the answer; its generation is aborted")
        raise OpenAIError(499, "The client closed the request.", code="client_closed_request")
    finally:
        for task in (work, gone):
            if not task.done():
                task.cancel()
        await asyncio.wait({work, gone})


def _runner_error(model_id: str, event: dict) -> OpenAIError:
    code = event.get("code")
    if code == "queue_full":
        return queue_full(model_id, event["retry_after"])
    if code == "invalid_request":  # what the API's own checks let through, the engine refused
        return OpenAIError(400, event["error"], code="invalid_value")
    if code == "engine_dead":
        return runner_unavailable(model_id, RuntimeError(event["error"]))
    return OpenAIError(500, f"Generation failed: {event['error']}", code="generation_failed")


async def _runner_events(runner, request_id: str, prompt_ids: list[int], params: dict) -> AsyncIterator[dict]:
    """The runner streams one JSON object a line; transport chunks may split or join lines."""
    stream = runner.generate(request_id=request_id, prompt_ids=prompt_ids, params=params)
    buffer = ""
    try:
        async for chunk in stream:
            buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                if line:
                    yield json.loads(line)
    finally:
        await stream.aclose()


def _abort_later(runner, request_id: str) -> None:
    """Tell the runner to drop a sequence nobody reads any more (client gone, stop string reached)."""
    async def abort():
        try:
            await runner.abort(request_id=request_id)
        except Exception as e:  # the runner may be gone too; nothing left to free then
            logger.debug("abort of %s failed: %s", request_id, e)

    task = asyncio.get_running_loop().create_task(abort())
    _background.add(task)
    task.add_done_callback(_background.discard)


async def generate_text(model, runner, prompt_ids: list[int], params: dict, stops: list[str]) -> AsyncIterator[TextEvent]:
    detokenizer = IncrementalDetokenizer(model.tokenizer, prompt_ids)
    stop_strings = StopStrings(stops)
    count, logprobs = 0, []
    for attempt in range(CONNECT_RETRIES + 1):
        # The sequence's id in the runner: the request's own (x-request-id), so that the runner's log
        # lines name it, and a suffix that keeps choices and retries apart.
        request_id, finished = f"{REQUEST_ID.get() or new_id('req')}-{uuid.uuid4().hex[:8]}", False
        try:
            async for event in _runner_events(runner, request_id, prompt_ids, params):
                if "error" in event:
                    finished = True  # the runner dropped the sequence itself, or never took it
                    raise _runner_error(model.id, event)
                count += 1
                if "logprob" in event:
                    logprobs.append(event)
                text, stopped = stop_strings.feed(detokenizer.step(event["token"]))
                reason = "stop" if stopped else event.get("finish_reason")
                if reason:
                    finished = event.get("finish_reason") is not None
                    yield TextEvent(text if stopped else text + stop_strings.flush(), reason, count, logprobs)
                    return
                if text:
                    yield TextEvent(text, None, count, logprobs)
                    logprobs = []
            return
        except OpenAIError:
            raise
        except Exception as e:
            # Nothing was generated yet: a pooled connection the runner had closed, or a replica that
            # died with the request in its queue. Retry, on another replica when there is one (the
            # finally below aborts the first attempt, should it have arrived).
            if count == 0 and attempt < CONNECT_RETRIES:
                logger.info("runner call for %s failed before the first token (%r); retrying", model.id, e)
                continue
            raise runner_unavailable(model.id, e) from e
        finally:
            if not finished:
                _abort_later(runner, request_id)


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
    """Interleave several async iterators, yielding ``(index, item)`` as items arrive."""
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
