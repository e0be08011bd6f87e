"""Tool calls in the text a model writes, in its family's format (``models.tool_formats``): the grammar
that makes a model write calls in it, and the parser that reads them back, streamed or not; and the
``<think>`` split of reasoning models.

The grammar (``tool_grammar``) lets a model write text until it starts a call (``auto``), or only
calls (``required``, a named function); a call, once started, is constrained to a given function's
name and its ``parameters`` schema. The parser (``ToolCallParser``) is the same code for a whole
answer and a stream, so a stream cut anywhere gives the same calls; it reads each character once,
so a long call costs no more per token than a short one; a call that repeats an earlier one ends
the answer.
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


class JsonScan:
    """Where a JSON object or array ends, read piece by piece: each character is read once, so a long
    call costs the same per token as a short one."""

    def __init__(self):
        self.depth, self.in_string, self.escaped = 0, False, False

    def feed(self, text: str) -> int | None:
        """The index in ``text`` just past the value's end, or None while it goes on."""
        for i, c in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


@dataclass
class ParsedCall:
    index: int
    id: str
    name: str | None = None
    arguments: str = ""
    done: bool = False  # its object is complete
    text: str = field(default="", repr=False)  # the call's object as written so far
    scan: JsonScan | None = field(default_factory=JsonScan, repr=False)  # None: no object; it ends with the answer
    args_at: int | None = field(default=None, repr=False)  # where its arguments' value starts in ``text``
    args_scan: JsonScan | None = field(default=None, repr=False)  # None: a value that is no object or array
    args_done: bool = field(default=False, repr=False)

    def same_as(self, other: ParsedCall) -> bool:
        try:
            return self.name == other.name and json.loads(self.arguments) == json.loads(other.arguments)
        except ValueError:
            return self.name == other.name and self.arguments == other.arguments


@dataclass
class CallDelta:
    """A piece of a streamed call: its start (``id`` and ``name``), or a fragment of its arguments."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass
class ToolDelta:
    """What a piece of the answer added: text, and the calls' starts and argument fragments, in order."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


class ToolCallParser:
    """Splits an answer, fed piece by piece, into text and tool calls in ``fmt``.

    Text that could be the start of a trigger is held back until it is not. Inside a call region
    (a call's JSON object, or an array of them), the first call is reported with its id and name as
    soon as its name is complete, then its arguments' JSON text as it grows (the model's own text,
    so a stream and a whole answer give the same calls). A later call is reported once it is
    complete: one that repeats an earlier call (same name and arguments, as small models do until
    ``max_tokens``) ends the answer instead (``repeated``), and one cut short by the end of the
    answer is dropped (``cut``). Each character is scanned once (``JsonScan``).
    """

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.buffer = ""  # text not yet reported as content or consumed by a call
        self.calls: list[ParsedCall] = []  # the calls reported
        self.current: ParsedCall | None = None  # the call being read
        self.content = ""
        self.repeated = self.cut = False
        self._key = re.compile(rf'"(?:{fmt.arguments_key}|arguments|parameters)"\s*:\s*')

    def feed(self, text: str) -> ToolDelta:
        delta = ToolDelta()
        if self.repeated:
            return delta
        self.buffer += text
        while self._step(delta):
            pass
        self.content += delta.content
        return delta

    def finish(self) -> ToolDelta:
        """The rest at the end of the answer: held-back text, the arguments of a call cut short."""
        delta = self.feed("")
        if self.repeated:
            return delta
        call = self.current
        if call is not None:
            self._read(call, delta, final=True)
            self.cut = call.index >= len(self.calls)  # a later call cut short: dropped
        elif not self.calls or not self.fmt.closing[1:].strip().startswith(self.buffer.strip(" \n;,")):
            delta.content += self.buffer  # (not a closing tag cut short)
            self.content += self.buffer
        self.buffer = ""
        return delta

    def _start(self) -> None:
        self.current = ParsedCall(len(self.calls), new_call_id(), scan=JsonScan() if self.buffer[0] == "{" else None)

    def _step(self, delta: ToolDelta) -> bool:
        """Consume what can be consumed at the buffer's start; whether to go on."""
        if self.current is not None:
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
                self._start()
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
        self._start()
        return True

    def _in_call(self, delta: ToolDelta) -> bool:
        """The current call's object goes on with ``self.buffer``: read what is new of it."""
        call = self.current
        found = call.scan.feed(self.buffer) if call.scan is not None else None
        end = len(self.buffer) if found is None else found
        call.text += self.buffer[:end]
        self.buffer = self.buffer[end:]
        call.done = found is not None
        self._read(call, delta, final=call.done)
        if not call.done:
            return False
        self.current = None
        if call.index == len(self.calls):  # a later call, held back until now
            if any(call.same_as(c) for c in self.calls):
                self.repeated, self.buffer = True, ""
                return False
            self._report(call, delta)
            if call.arguments:
                delta.calls.append(CallDelta(call.index, call.arguments))
        return True

    def _read(self, call: ParsedCall, delta: ToolDelta, final: bool) -> None:
        """Take the call's name and the new part of its arguments from its text; a live call (the first)
        reports them."""
        live = call.index < len(self.calls) or not self.calls
        if call.name is None:
            m = _NAME.search(call.text)
            if m is None and not final:
                return
            call.name = json.loads(f'"{m.group(1)}"') if m else ""
            if live:
                self._report(call, delta)
        if call.args_at is None:
            m = self._key.search(call.text)
            at = len(call.text) - len(call.text[m.end():].lstrip()) if m else len(call.text)
            if at < len(call.text):
                call.args_at = at
                call.args_scan = JsonScan() if call.text[at] in "{[" else None
            elif final:
                call.arguments = "{}"
                if live:
                    delta.calls.append(CallDelta(call.index, "{}"))
                return
            else:
                return
        if call.args_done:
            return
        new = call.text[call.args_at + len(call.arguments):]
        if call.args_scan is not None:
            end = call.args_scan.feed(new)
            if end is not None:
                new, call.args_done = new[:end], True
        elif final:  # a value that is no object: up to the end of the call's object
            new = new[:-1].rstrip() if call.done else new
        else:
            return
        call.arguments += new
        if new and live:
            delta.calls.append(CallDelta(call.index, new))

    def _report(self, call: ParsedCall, delta: ToolDelta) -> None:
        self.calls.append(call)
        delta.calls.append(CallDelta(call.index, id=call.id, name=call.name))


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
            parsed = ToolDelta(parsed.content + rest.content, parsed.calls + rest.calls)
        return AnswerDelta(parsed.content, parsed.calls, reasoning)

    @property
    def content(self) -> str:
        return self.tools.content if self.tools else self.plain

    @property
    def calls(self) -> list[ParsedCall]:
        return self.tools.calls if self.tools else []

    @property
    def ended(self) -> bool:
        """Whether the answer is over, whatever the model writes next (a call repeated)."""
        return self.tools is not None and self.tools.repeated

    def finish_reason(self, reason: str | None) -> str | None:
        """``tool_calls`` when the answer is calls: it stopped after them, or ``max_tokens`` cut a
        later call, which is dropped."""
        cut = reason == "length" and self.tools is not None and self.tools.cut
        return "tool_calls" if self.calls and (reason == "stop" or cut) else reason
