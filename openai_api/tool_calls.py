"""Tool calls in the text a model writes, in its family's format (``models.tool_formats``): the grammar
that makes a model write calls in it, and the parser that reads them back, streamed or not; and the
``<think>`` split of reasoning models.

The grammar (``tool_grammar``) lets a model write text until it starts a call (``auto``), or only
calls (``required``, a named function); a call, once started, is constrained to a given function's
name and its ``parameters`` schema. The parser (``ToolCallParser``) is the same code for a whole
answer and a stream, so a stream cut anywhere gives the same calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from models.tool_formats import ToolFormat
from openai_api.constraints import MAX_WHITESPACE, to_grammar

# Calls in one answer when tool_choice is `required` and parallel calls are allowed: a small model
# repeats a call for as long as the grammar lets it.
MAX_PARALLEL_CALLS = 8


def tool_grammar(fmt: ToolFormat, tools: list[dict], mode: str, parallel: bool, named: bool = False,
                 answer: str | None = None) -> str:
    """EBNF for ``mode`` (``auto``: text, then calls once one starts; ``required``: calls only, at most
    ``MAX_PARALLEL_CALLS``, or one of the ``named`` function) over ``tools`` (OpenAI function tools,
    already checked). ``answer``: with ``auto``, the grammar of a text answer (a response format):
    the model writes either calls or that."""
    from xgrammar.structural_tag import (ConstStringFormat, GrammarFormat, JSONSchemaFormat, OrFormat,
                                         RepeatFormat, SequenceFormat, StructuralTag, TagFormat,
                                         TriggeredTagsFormat)

    tags = [TagFormat(begin=f'{fmt.opening}{t["function"]["name"]}", "{fmt.arguments_key}": ',
                      content=JSONSchemaFormat(json_schema=parameters_of(t), max_whitespace_cnt=MAX_WHITESPACE),
                      end=fmt.closing) for t in tools]
    if mode == "required" or answer is not None:  # calls only, one per line; a named function once
        choice = OrFormat(elements=tags) if len(tags) > 1 else tags[0]
        more = MAX_PARALLEL_CALLS - 1 if parallel and not named else 0
        calls = SequenceFormat(elements=[choice, RepeatFormat(min=0, max=more, content=SequenceFormat(
            elements=[ConstStringFormat(value="\n"), choice]))]) if more else choice
        if answer is not None:
            calls = OrFormat(elements=[calls, GrammarFormat(grammar=answer)])
    else:
        calls = TriggeredTagsFormat(triggers=[fmt.triggers[0]], tags=tags, stop_after_first=not parallel)
    tag = StructuralTag(format=calls)
    return to_grammar("structural_tag", tag.model_dump(), "tools")


def check_tools(tools: list[dict]) -> None:
    """A 400 naming the first tool whose ``parameters`` is no JSON schema xgrammar can take."""
    for i, tool in enumerate(tools):
        to_grammar("json_schema", parameters_of(tool), f"tools[{i}].function.parameters")


def parameters_of(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def json_end(text: str, start: int) -> int | None:
    """The index just past the JSON object or array that opens at ``text[start]``, or None while it
    is incomplete."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


@dataclass
class ParsedCall:
    index: int
    id: str
    name: str | None = None
    arguments: str = ""
    named: bool = False  # the name has been reported (streams)
    done: bool = False


@dataclass
class ToolDelta:
    """What a piece of the answer added: text, and (index, id, name) of calls started and (index,
    fragment) of arguments written."""

    content: str = ""
    started: list[tuple[int, str, str]] = field(default_factory=list)
    arguments: list[tuple[int, str]] = field(default_factory=list)


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


class ToolCallParser:
    """Splits an answer, fed piece by piece, into text and tool calls in ``fmt``.

    Text that could be the start of a trigger is held back until it is not. Inside a call region
    (a call's JSON object, or an array of them), a call is reported with its id and name as soon as
    its name is complete, then its arguments' JSON text as it grows; the arguments are the model's own
    JSON text, so a stream and a whole answer give the same calls.
    """

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.buffer = ""  # text not yet reported as content or consumed by a call
        self.calls: list[ParsedCall] = []
        self.content = ""

    def feed(self, text: str) -> ToolDelta:
        self.buffer += text
        delta = ToolDelta()
        while self._step(delta):
            pass
        self.content += delta.content
        return delta

    def finish(self) -> ToolDelta:
        """The rest at the end of the answer: held-back text, the arguments of a call cut short."""
        delta = self.feed("")
        if self.calls and not self.calls[-1].done:
            self._report(self.calls[-1], self.buffer, delta, final=True)
        elif not self.calls or not self.fmt.closing[1:].strip().startswith(self.buffer.strip(" \n;,")):
            delta.content += self.buffer  # (not a closing tag cut short)
            self.content += self.buffer
        self.buffer = ""
        return delta

    def _step(self, delta: ToolDelta) -> bool:
        """Consume what can be consumed at the buffer's start; whether to go on."""
        if self.calls and not self.calls[-1].done:
            return self._in_call(delta)
        if self.calls:  # after a call: its closing text, separators, the next object of a sequence
            rest = re.sub(r"^[\s;,]*", "", self.buffer)
            closer = self.fmt.closing[1:].strip()
            if closer and rest.startswith(closer):
                rest = re.sub(r"^[\s;,]*", "", rest[len(closer):])
            elif closer and rest and closer.startswith(rest):
                return False  # the closing text is still coming
            self.buffer = rest
            if rest.startswith("{"):
                self.calls.append(ParsedCall(len(self.calls), new_call_id()))
                return True
            if not rest:
                return False
        found = sorted((i, t) for t in self.fmt.triggers if (i := self.buffer.find(t)) >= 0)
        if not found:
            hold = max((k for t in self.fmt.triggers for k in range(1, len(t)) if self.buffer.endswith(t[:k])),
                       default=0)
            cut = len(self.buffer) - hold
            delta.content += self.buffer[:cut]
            self.buffer = self.buffer[cut:]
            return False
        i, trigger = found[0]
        region = self.buffer[i:] if self.fmt.trigger_in_json and trigger.startswith("{") else \
            self.buffer[i + len(trigger):]
        region = region.lstrip()
        if region.startswith("["):
            region = region[1:].lstrip()
        if not region:
            delta.content += self.buffer[:i]
            self.buffer = self.buffer[i:]  # the call's first character is still coming
            return False
        delta.content += self.buffer[:i]
        self.buffer = region
        self.calls.append(ParsedCall(len(self.calls), new_call_id()))
        return True

    def _in_call(self, delta: ToolDelta) -> bool:
        """The current call's object is ``self.buffer``'s start: report what is new of it."""
        call = self.calls[-1]
        end = json_end(self.buffer, 0) if self.buffer.startswith("{") else None
        body = self.buffer[:end] if end else self.buffer
        self._report(call, body, delta, final=end is not None)
        if end is None:
            return False
        call.done = True
        self.buffer = self.buffer[end:]
        return True

    def _report(self, call: ParsedCall, body: str, delta: ToolDelta, final: bool) -> None:
        if call.name is None:
            m = _NAME.search(body)
            if m is None:
                if final:
                    call.name = ""
                else:
                    return
            else:
                call.name = json.loads(f'"{m.group(1)}"')
        if not call.named:
            call.named = True
            delta.started.append((call.index, call.id, call.name))
        key = re.search(rf'"(?:{self.fmt.arguments_key}|arguments|parameters)"\s*:\s*', body)
        if key is None:
            if final and not call.arguments:
                call.arguments = "{}"
                delta.arguments.append((call.index, "{}"))
            return
        raw = body[key.end():]
        end = json_end(raw, 0) if raw.startswith(("{", "[")) else None
        raw = raw[:end] if end else raw
        new = raw[len(call.arguments):]
        if new:
            call.arguments += new
            delta.arguments.append((call.index, new))


class ReasoningParser:
    """Splits ``<think>…</think>`` off an answer, fed piece by piece: (reasoning, content) per piece.
    ``thinking``: the prompt already opened the block (DeepSeek-R1 distills, Qwen3 in thinking mode)."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, thinking: bool = False):
        self.state = "thinking" if thinking else "start"
        self.buffer = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buffer += text
        reasoning = content = ""
        if self.state == "start":
            stripped = self.buffer.lstrip()
            if stripped.startswith(self.OPEN):
                self.state, self.buffer = "thinking", stripped[len(self.OPEN):]
            elif self.OPEN.startswith(stripped) and not final:
                return "", ""
            else:
                self.state = "answer"
        if self.state == "thinking":
            i = self.buffer.find(self.CLOSE)
            if i >= 0:
                reasoning, self.buffer, self.state = self.buffer[:i], self.buffer[i + len(self.CLOSE):], "after"
            else:
                hold = 0 if final else max((k for k in range(1, len(self.CLOSE)) if self.buffer.endswith(self.CLOSE[:k])),
                                           default=0)
                reasoning, self.buffer = self.buffer[:len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        if self.state == "after":  # the blank lines between thinking and answer are neither
            self.buffer = self.buffer.lstrip()
            if self.buffer:
                self.state = "answer"
        if self.state == "answer":
            content, self.buffer = self.buffer, ""
        return reasoning, content


@dataclass
class AnswerDelta(ToolDelta):
    reasoning: str = ""


class AnswerParser:
    """One choice's answer, fed piece by piece: reasoning (when the model reasons), then text and
    tool calls (when the request allows calls)."""

    def __init__(self, tool_format: ToolFormat | None, reasoning: bool = False, thinking: bool = False):
        self.reasoning = ReasoningParser(thinking) if reasoning else None
        self.tools = ToolCallParser(tool_format) if tool_format else None
        self.reasoning_text = ""
        self.plain = ""  # the content when no tool parser runs

    def feed(self, text: str, final: bool = False) -> AnswerDelta:
        reasoning, content = self.reasoning.feed(text, final) if self.reasoning else ("", text)
        self.reasoning_text += reasoning
        if self.tools is None:
            self.plain += content
            return AnswerDelta(content=content, reasoning=reasoning)
        parsed = self.tools.feed(content)
        if final:
            rest = self.tools.finish()
            parsed = ToolDelta(parsed.content + rest.content, parsed.started + rest.started,
                               parsed.arguments + rest.arguments)
        return AnswerDelta(parsed.content, parsed.started, parsed.arguments, reasoning)

    @property
    def content(self) -> str:
        return self.tools.content if self.tools else self.plain

    @property
    def calls(self) -> list[ParsedCall]:
        return self.tools.calls if self.tools else []

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.calls else reason
