"""The chat path that ``/chat/completions``, ``/responses`` and the chat page share: a chat request's
prompt ids and engine parameters (``prepare_chat``), its choices run on the model, each choice's text
split by its parser into reasoning, content and tool calls (``start_chat``, ``ChatRun``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from models.info import ModelInfo
from openai_api.protocol import ChatCompletionRequest, ChatMessage
from openai_api.streams import started, unless_disconnected
from openai_api.text_stream import Choice, TextEvent, collect, run_choices
from openai_api.tool_calls import AnswerDelta, AnswerParser
from runners.engine.sequence import SamplingParams


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as a template renders them (``developer`` is OpenAI's newer name for ``system``);
    with their tool calls (arguments as objects, as chat templates take them) and tool call ids."""
    out = []
    for m in messages:
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None and m.role == "tool":
            d["name"] = m.name
        out.append(d)
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def prepare_chat(info: ModelInfo, req: ChatCompletionRequest, fit_context: bool = False
                 ) -> tuple[list[int], SamplingParams]:
    """Prompt ids and engine parameters of a chat request, for the API and the chat page alike."""
    prompt_ids = info.render_chat(chat_messages(req.messages), req.active_tools)
    return prompt_ids, req.to_sampling_params(info, len(prompt_ids), fit_context=fit_context)


# Rendering and tokenizing a chat take CPU time that grows with its text (SmolLM2's template: 0.14 ms for a
# short question, 0.3 ms more a thousand characters), checking a JSON schema or grammar (xgrammar) and tool
# definitions more; a worker thread does it for a long or constrained chat. A short plain chat is prepared on
# the event loop: the hop to a thread and back took 5 to 12 ms of its time to first token on a busy 2-core box.
QUICK_CHARS = 2000
CONSTRAINING = frozenset({"tools", "response_format", "structured_outputs", "guided_json", "guided_regex",
                          "guided_choice", "guided_grammar"})


def quick_to_prepare(req: ChatCompletionRequest) -> bool:
    """Whether ``prepare_chat`` takes well under a millisecond for ``req``: a short chat, neither tools nor
    an output format given."""
    chars = sum(len(m.text) + sum(len(c.function.arguments) for c in m.tool_calls or ()) for m in req.messages)
    return chars <= QUICK_CHARS and all(getattr(req, name) is None for name in CONSTRAINING)


def answer_parser(info: ModelInfo, req: ChatCompletionRequest, prompt_ids: list[int]) -> AnswerParser:
    """What splits one choice's text: reasoning (a reasoning model), tool calls (tools allowed)."""
    thinking = info.served.reasoning and info.tokenizer.decode(prompt_ids[-4:]).rstrip().endswith("<think>")
    return AnswerParser(info.tool_format if req.tool_mode != "none" else None, info.served.reasoning, thinking)


@dataclass
class ChatRun:
    """A chat request under way: its prompt, and each choice's answer as its parser splits it."""

    info: ModelInfo
    prompt_ids: list[int]
    choices: AsyncIterator[tuple[int, TextEvent]]
    parsers: list[AnswerParser]

    async def deltas(self) -> AsyncIterator[tuple[int, TextEvent, AnswerDelta]]:
        async for i, ev in self.choices:
            yield i, ev, self.parsers[i].feed(ev.text, final=ev.finish_reason is not None)

    async def collect(self) -> list[Choice]:
        """Each choice's whole answer, its finish reason as its parser gives it (``tool_calls``); the
        parsers hold its content, reasoning and calls."""
        answers = await collect(((i, ev) async for i, ev, _ in self.deltas()), len(self.parsers))
        for answer, parser in zip(answers, self.parsers):
            answer.finish_reason = parser.finish_reason(answer.finish_reason)
        return answers


async def start_chat(registry, req: ChatCompletionRequest, request: Request) -> ChatRun:
    """Render, check and queue a chat request (chat completions and responses alike) on the model
    ``registry`` serves as ``req.model``; a stream's first token is awaited, so that what fails
    before it is the response's HTTP status."""
    model = registry.get(req.model, "chat")
    if quick_to_prepare(req):
        prompt_ids, params = prepare_chat(model.info, req)
    else:  # not to hold up the event loop's other streams
        prompt_ids, params = await asyncio.to_thread(prepare_chat, model.info, req)
    # A tool-call marker that is a special token (Mistral's [TOOL_CALLS]) must reach the parser.
    keep = model.info.tool_marker_ids if req.tool_mode != "none" else frozenset()
    parsers = [answer_parser(model.info, req, prompt_ids) for _ in range(req.n)]
    # A choice whose parser has what it needs (a tool call repeated) stops generating.
    choices = run_choices(model, [prompt_ids], params, req.n, keep, ended=lambda i: parsers[i].ended)
    if req.stream:
        choices = await unless_disconnected(request, started(choices))
    return ChatRun(model.info, prompt_ids, choices, parsers)
