"""OpenAI's Responses API on the chat path: a request becomes a ``ChatCompletionRequest`` (its input
items become messages, its function tools chat tools, ``text.format`` a response format), runs as
a chat does, and its answer becomes output items (a message, function calls) and, streamed, the
documented event sequence. Finished responses are kept in a bounded in-memory store
(``ResponseStore``) for ``previous_response_id`` and ``GET /v1/responses/{id}``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationError, WithJsonSchema

from openai_api.bounds import TEMPERATURE, TOOL_NAME_PATTERN
from openai_api.errors import OpenAIError, invalid_value
from openai_api.ids import new_id
from openai_api.protocol import ChatCompletionRequest, TopLevelRequest

DEFAULT_STORE_SIZE, DEFAULT_STORE_BYTES = 1000, 128 * 2**20


def _item(kind: str, required: list[str], **properties) -> dict:
    return {"type": "object", "required": ["type", *required], "properties": {"type": {"const": kind}, **properties}}


_STRING = {"type": "string"}
# The published schema of what this server takes (validated as it is converted, with 400s naming the field).
INPUT_ITEM = {"anyOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"const": "message"}, "role": {"enum": ["user", "assistant", "system", "developer"]},
        "content": {"anyOf": [_STRING, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"enum": ["input_text", "output_text", "text"]}, "text": _STRING}}}]}}},
    _item("function_call", ["call_id", "name", "arguments"], call_id=_STRING, name=_STRING, arguments=_STRING),
    _item("function_call_output", ["call_id", "output"], call_id=_STRING, output=_STRING),
    _item("reasoning", [])]}
FUNCTION_TOOL = _item("function", ["name"], name={"type": "string", "pattern": TOOL_NAME_PATTERN},
                      description=_STRING, parameters={"type": "object"}, strict={"type": "boolean"})
TOOL_CHOICE = {"anyOf": [{"enum": ["none", "auto", "required"]}, _item("function", ["name"], name=_STRING)]}
# something to answer: instructions, or some input
HAS_INPUT = {"anyOf": [{"required": ["instructions"], "properties": {"instructions": {"type": "string", "minLength": 1}}},
                       {"required": ["input"], "properties": {"input": {"anyOf": [_STRING, {"type": "array", "minItems": 1}]}}}]}
TOOL_CHOICE_SHAPES = '"none", "auto", "required" or {"type": "function", "name": ...}'


class ResponsesRequest(TopLevelRequest):
    model_config = ConfigDict(extra="ignore", json_schema_extra=HAS_INPUT)

    model: str
    input: Annotated[str | list[dict], WithJsonSchema({"anyOf": [_STRING, {"type": "array", "items": INPUT_ITEM}]})] = \
        Field(default_factory=list)
    instructions: str | None = None
    tools: Annotated[list[dict] | None, WithJsonSchema({"type": "array", "items": FUNCTION_TOOL})] = None
    tool_choice: Annotated[str | dict | None, WithJsonSchema(TOOL_CHOICE)] = None
    parallel_tool_calls: bool = True
    text: dict | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: Annotated[float | None, WithJsonSchema(TEMPERATURE)] = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict | None = None
    user: str | None = None


class ResponseStore:
    """Finished responses, with the messages that led to them, each for the API key that made it:
    ``owner`` is (tenant, key), (None, None) without keys. Each tenant's last ``size`` within ``max_bytes``
    of JSON are kept, its oldest dropped first: one tenant's responses never push out another's. Another
    key's response is not found."""

    def __init__(self, size: int = DEFAULT_STORE_SIZE, max_bytes: int = DEFAULT_STORE_BYTES):
        self.size, self.max_bytes = size, max_bytes
        # tenant -> its responses by id, oldest first: (key, response, messages, bytes); and its bytes held
        self._kept: dict[str | None, OrderedDict[str, tuple[str | None, dict, list[dict], int]]] = {}
        self._bytes: dict[str | None, int] = {}
        self._lock = threading.Lock()

    def put(self, response: dict, messages: list[dict], owner: tuple[str | None, str | None]) -> None:
        if self.size <= 0:
            return
        size = len(json.dumps(response)) + len(json.dumps(messages))
        if size > self.max_bytes:
            return
        tenant, key = owner
        with self._lock:
            kept = self._kept.setdefault(tenant, OrderedDict())
            kept[response["id"]] = (key, response, messages, size)
            self._bytes[tenant] = self._bytes.get(tenant, 0) + size
            while len(kept) > self.size or self._bytes[tenant] > self.max_bytes:
                self._bytes[tenant] -= kept.popitem(last=False)[1][3]

    def get(self, response_id: str, owner: tuple[str | None, str | None]) -> tuple[dict, list[dict]]:
        tenant, key = owner
        with self._lock:
            found = self._kept.get(tenant, {}).get(response_id)
        if found is None or found[0] != key:
            raise OpenAIError(404, f"Response with id '{response_id}' not found. This server keeps the last "
                                   f"{self.size} responses ({self.max_bytes // 2**20} MiB) of each tenant in "
                                   "memory, each for the API key that made it.", param="response_id",
                              code="response_not_found")
        return found[1], found[2]


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text", "text"):
                raise invalid_value(f"{param}[{i}]", f"is of type {kind!r}; this model takes text only")
            parts.append(part.get("text") or "")
        return "".join(parts)
    raise invalid_value(param, "must be text or a list of text parts")


def input_messages(req: ResponsesRequest) -> list[dict]:
    """The request's ``input`` as chat messages (without instructions or earlier responses)."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    messages: list[dict] = []
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid_value(f"input[{i}].role", "must be user, assistant, system or developer")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"input[{i}].content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # a reasoning item sent back: not shown to the model again
        else:
            raise invalid_value(f"input[{i}].type", f"{kind!r} items are not supported; send messages, "
                                                    "function_call and function_call_output items")
    return messages


def _chat_tools(tools: list[dict] | None) -> list[dict] | None:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            if tool.get("type") == "function":
                raise invalid_value(f"tools[{i}].name", "a function tool needs its name")
            raise invalid_value(f"tools[{i}].type", f"{tool.get('type')!r} tools are not supported; only `function` tools")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters", "strict")
                                                     if tool.get(k) is not None}})
    return out or None


def _chat_tool_choice(choice):
    """The Responses API's ``tool_choice`` in the chat shape (400 naming it, in its own shapes)."""
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None and choice not in ("none", "auto", "required"):
        raise invalid_value("tool_choice", f"must be {TOOL_CHOICE_SHAPES}")
    return choice


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise invalid_value("text.format", "must be an object with a `type`")
    if not fmt or fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"), "schema": fmt.get("schema"),
                                                   "strict": fmt.get("strict")}}


def to_chat_request(req: ResponsesRequest, history: list[dict]) -> tuple[ChatCompletionRequest, list[dict]]:
    """The chat request this response runs as, and the conversation it holds (for the store)."""
    conversation = history + input_messages(req)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    try:
        chat = ChatCompletionRequest.model_validate({
            "model": req.model, "messages": messages, "tools": _chat_tools(req.tools),
            "tool_choice": _chat_tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls,
            "response_format": _response_format(req.text), "max_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "stream": req.stream})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise invalid_value("input" if where.startswith("messages") else where or None,
                            err.get("msg", str(e)).removeprefix("Value error, ")) from e
    return chat, conversation


# --- the answer as a response -------------------------------------------------------------------

def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text or
            status == "completed" else []}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def response_object(req: ResponsesRequest, rid: str, created: float, status: str, output: list[dict],
                    usage: dict | None = None, finish_reason: str | None = None) -> dict:
    incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
    return {
        "id": rid, "object": "response", "created_at": created, "model": req.model,
        "status": "incomplete" if incomplete and status == "completed" else status,
        "error": None, "incomplete_details": incomplete, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {}, "output": output,
        "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": req.previous_response_id,
        "temperature": req.temperature, "top_p": req.top_p, "tools": req.tools or [],
        "tool_choice": req.tool_choice or "auto", "text": req.text or {"format": {"type": "text"}},
        "truncation": "disabled", "store": req.store, "user": req.user, "usage": usage,
    }


def usage_of(prompt_tokens: int, output_tokens: int, cached_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


def output_items(parser, cut: bool = False) -> tuple[list[dict], list[dict]]:
    """(output items, the assistant's turn as chat messages) of a finished answer; ``cut``: by
    ``max_output_tokens``, which leaves its last item ``incomplete``, as OpenAI marks it."""
    items, turn = [], {"role": "assistant", "content": parser.content or None}
    if parser.reasoning_text:
        items.append(reasoning_item(new_id("rs_"), parser.reasoning_text))
    if parser.content or not parser.calls:
        items.append(message_item(new_id("msg_"), parser.content))
    for c in parser.calls:
        items.append(call_item(new_id("fc_"), c.id, c.name, c.arguments))
    if cut:
        items[-1]["status"] = "incomplete"
    if parser.calls:
        turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                              for c in parser.calls]
    return items, [turn]


async def events(req: ResponsesRequest, rid: str, run, finish: Callable[[dict, list[dict]], None]
                 ) -> AsyncIterator[dict]:
    """The streamed event sequence of one answer (``run``: an ``openai_api.chat.ChatRun`` with one
    choice). ``finish(response, turn)`` stores the finished response."""
    created = time.time()
    seq = iter(range(1 << 62))

    def event(kind: str, **fields) -> dict:
        return {"type": kind, "sequence_number": next(seq), **fields}

    yield event("response.created", response=response_object(req, rid, created, "in_progress", []))
    yield event("response.in_progress", response=response_object(req, rid, created, "in_progress", []))
    output: list[dict] = []
    message: dict | None = None
    text = ""
    calls: dict[int, dict] = {}  # parser call index -> its item
    reasoning_text = ""
    count, reason, cached = 0, None, 0

    def close_message(status: str = "completed"):
        nonlocal message
        if message is None:
            return []
        index = output.index(message)
        message.update(message_item(message["id"], text, status))
        part = message["content"][0]
        done = [event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                      text=text, logprobs=[]),
                event("response.content_part.done", item_id=message["id"], output_index=index, content_index=0,
                      part=part),
                event("response.output_item.done", output_index=index, item=message)]
        message = None
        return done

    async for _, ev, d in run.deltas():
        count, reason, cached = ev.completion_tokens, ev.finish_reason, ev.cached_tokens
        reasoning_text += d.reasoning
        if d.content and not (calls and not d.content.strip()):
            if message is None:
                message = message_item(new_id("msg_"), "", status="in_progress")
                output.append(message)
                yield event("response.output_item.added", output_index=len(output) - 1, item=dict(message))
                yield event("response.content_part.added", item_id=message["id"], output_index=len(output) - 1,
                            content_index=0, part={"type": "output_text", "text": "", "annotations": []})
            text += d.content
            yield event("response.output_text.delta", item_id=message["id"], output_index=output.index(message),
                        content_index=0, delta=d.content, logprobs=[])
        for c in d.calls:  # a call's start, then its arguments' fragments
            if c.id is not None:
                for done in close_message():
                    yield done
                calls[c.index] = call_item(new_id("fc_"), c.id, c.name, "", status="in_progress")
                output.append(calls[c.index])
                yield event("response.output_item.added", output_index=len(output) - 1, item=dict(calls[c.index]))
            if c.arguments:
                item = calls[c.index]
                item["arguments"] += c.arguments
                yield event("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=output.index(item), delta=c.arguments)
    cut = run.parsers[0].finish_reason(reason) == "length"  # max_output_tokens: the last item is incomplete
    for done in close_message("incomplete" if cut else "completed"):
        yield done
    for item in calls.values():
        item["status"] = "incomplete" if cut and item is output[-1] else "completed"
        i = output.index(item)
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=i, name=item["name"],
                    arguments=item["arguments"])
        yield event("response.output_item.done", output_index=i, item=item)
    if reasoning_text:  # last, so that the indices the events named stay right
        output.append(reasoning_item(new_id("rs_"), reasoning_text))
    usage = usage_of(len(run.prompt_ids), count, cached)
    response = response_object(req, rid, created, "completed", output, usage, "length" if cut else None)
    _, turn = output_items(run.parsers[0])
    finish(response, turn)
    yield event("response.incomplete" if cut else "response.completed", response=response)
