"""Conversation templates: how a chat becomes the prompt token ids a model was trained on.

A model's template is resolved in this order (``resolve_chat_format``):

1. the template named by ``template:`` in ``bentochat.yaml`` (a built-in name, or ``tokenizer``);
2. the tokenizer's own Jinja ``chat_template`` (``tokenizer_config.json``);
3. a built-in template chosen from the model's name (served id, store name, import source) or
   architecture (``config.json``);
4. the ``generic`` "Role: text" fallback, logged, because it is not the authors' format.

A built-in template builds a list of segments: text, encoded on its own and with special-token
splitting on (so text that looks like ``<|im_start|>`` stays text), and :class:`Special` tokens,
placed by id: the tokenizer's BOS/EOS, a named special token such as ``<|im_start|>``, or an id
from ``generation_config.json`` such as Baichuan's ``user_token_id``. Each template also names the
stop tokens or strings that end an answer.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("bentochat.templates")


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Special:
    """A token placed by id: ``bos``/``eos`` (the tokenizer's), a ``*_token_id`` key of
    ``generation_config.json``, or a special token of the tokenizer by its text."""

    name: str


BOS, EOS = Special("bos"), Special("eos")
Segment = str | Special
Turn = tuple[str, str]  # (user | assistant, text)


@dataclass(frozen=True)
class Template:
    name: str
    doc: str  # whose format, and where its authors document it
    build: Callable[[str, list[Turn]], list[Segment]]  # (system, turns) -> segments, ending in the assistant's turn
    default_system: str = ""
    stop: tuple[Segment, ...] = ()  # besides the model's EOS

    def segments(self, messages: list[dict]) -> list[Segment]:
        system, turns = split_messages(messages)
        return [s for s in self.build(system or self.default_system, turns) if s != ""]

    def render_text(self, messages: list[dict], names: dict[str, str] | None = None) -> str:
        """The prompt as text, each Special shown by ``names`` (default: ``<s>``, ``</s>``, or its own name)."""
        shown = {"bos": "<s>", "eos": "</s>", **(names or {})}
        return "".join(s if isinstance(s, str) else shown.get(s.name, f"<{s.name}>" if s.name.endswith("_id") else s.name)
                       for s in self.segments(messages))


def split_messages(messages: list[dict]) -> tuple[str, list[Turn]]:
    """System messages join into one system prompt; every other message is a user or assistant turn
    (a tool result is shown to the model as the user's)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [("assistant" if m["role"] == "assistant" else "user", m["content"]) for m in messages
             if m["role"] != "system"]
    return system, turns


def pairs(turns: list[Turn]) -> list[tuple[str, str | None]]:
    """(user, answer) rounds; the last round's answer is None: the one the model is to write."""
    rounds: list[list] = []
    for role, text in turns:
        if role == "user" or not rounds or rounds[-1][1] is not None:
            rounds.append([text if role == "user" else "", None if role == "user" else text])
        else:
            rounds[-1][1] = text
    if not rounds or rounds[-1][1] is not None:
        rounds.append(["", None])
    return [(u, a) for u, a in rounds]


# --- the built-in templates -------------------------------------------------------------------

def _reserved_ids(system: str, turns: list[Turn]) -> list[Segment]:
    # Baichuan's generation_utils.build_chat_input: system text, then each message after its role id,
    # every text encoded on its own, and the assistant's id last.
    out: list[Segment] = [system]
    for role, text in turns:
        out += [Special("user_token_id" if role == "user" else "assistant_token_id"), text]
    return out + [Special("assistant_token_id")]


def _chatglm3(system: str, turns: list[Turn]) -> list[Segment]:
    # ChatGLM3's tokenizer.build_chat_input: [gMASK] sop, then <|role|> "\n" text per message.
    out: list[Segment] = [Special("[gMASK]"), Special("sop")]
    for role, text in ([("system", system)] if system else []) + turns:
        out += [Special(f"<|{role}|>"), "\n", text]
    return out + [Special("<|assistant|>")]


IM_START, IM_END = Special("<|im_start|>"), Special("<|im_end|>")


def _chatml(system: str, turns: list[Turn]) -> list[Segment]:
    # Qwen-7B-Chat's qwen_generation_utils.make_context: <|im_start|>role "\n" text <|im_end|>, "\n" between.
    out: list[Segment] = []
    for role, text in ([("system", system)] if system else []) + turns:
        out += [IM_START, role, "\n", text, IM_END, "\n"]
    return out + [IM_START, "assistant", "\n"]


def _llama2(system: str, turns: list[Turn]) -> list[Segment]:
    # Meta's llama/generation.py chat_completion: the system prompt inside the first [INST] between
    # <<SYS>> markers; each answered round is BOS "[INST] q [/INST] a " EOS.
    out: list[Segment] = []
    for i, (user, answer) in enumerate(pairs(turns)):
        if i == 0 and system:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        if answer is None:
            out += [BOS, f"[INST] {user.strip()} [/INST]"]
        else:
            out += [BOS, f"[INST] {user.strip()} [/INST] {answer.strip()} ", EOS]
    return out


def _mistral(system: str, turns: list[Turn]) -> list[Segment]:
    # Mistral-7B-Instruct's model card: <s>[INST] Instruction [/INST] Model answer</s>[INST] Follow-up [/INST].
    # It has no system role; a system prompt goes before the first instruction.
    out: list[Segment] = [BOS]
    for i, (user, answer) in enumerate(pairs(turns)):
        if i == 0 and system:
            user = f"{system}\n\n{user}"
        out.append(f"[INST] {user} [/INST]")
        if answer is not None:
            out += [f" {answer}", EOS]
    return out


def _vicuna(system: str, turns: list[Turn]) -> list[Segment]:
    # FastChat's Vicuna v1.1 format: "{system} USER: q ASSISTANT: a</s>USER: q ASSISTANT:".
    out: list[Segment] = [BOS]
    text = system + " "
    for user, answer in pairs(turns):
        text += f"USER: {user} ASSISTANT:"
        if answer is not None:
            out += [f"{text} {answer}", EOS]
            text = ""
    return out + [text]


def _alpaca(system: str, turns: list[Turn]) -> list[Segment]:
    # Stanford Alpaca's prompt: "{preamble}\n\n### Instruction:\n{q}\n\n### Response:" and the answer, EOS.
    out: list[Segment] = [BOS]
    text = system
    for user, answer in pairs(turns):
        text += f"\n\n### Instruction:\n{user}\n\n### Response:"
        if answer is not None:
            out += [text + answer, EOS]
            text = ""
    return out + [text]


def _plain(system: str, turns: list[Turn]) -> list[Segment]:
    # No roles: the texts one after another, for base models used as completers.
    return [BOS, "\n".join([system] * bool(system) + [text for _, text in turns])]


def _generic(system: str, turns: list[Turn]) -> list[Segment]:
    lines = ([f"System: {system}\n"] if system else []) + [f"{role.capitalize()}: {text}\n" for role, text in turns]
    return [BOS, "".join(lines) + "Assistant:"]


BUILTIN: dict[str, Template] = {t.name: t for t in [
    Template("baichuan", "Baichuan-13B-Chat: role ids user_token_id/assistant_token_id from generation_config.json",
             _reserved_ids, stop=(Special("user_token_id"),)),
    Template("baichuan2", "Baichuan2-*-Chat: the same reserved role ids as Baichuan-13B-Chat",
             _reserved_ids, stop=(Special("user_token_id"),)),
    Template("chatglm3", "ChatGLM3-6B: [gMASK]sop<|system|>\\n..<|user|>\\n..<|assistant|>",
             _chatglm3, stop=(Special("<|user|>"), Special("<|observation|>"))),
    Template("qwen-7b-chat", "Qwen-7B-Chat: ChatML, system 'You are a helpful assistant.'", _chatml,
             default_system="You are a helpful assistant.", stop=(IM_END, Special("<|endoftext|>"))),
    Template("chatml", "ChatML without a default system prompt", _chatml, stop=(IM_END,)),
    Template("llama-2-chat", "Llama-2-*-chat: [INST] <<SYS>> .. <</SYS>> .. [/INST]", _llama2),
    Template("vicuna_v1.1", "Vicuna v1.1: 'USER: .. ASSISTANT: ..</s>'", _vicuna,
             default_system="A chat between a curious user and an artificial intelligence assistant. The assistant "
                            "gives helpful, detailed, and polite answers to the user's questions.",
             stop=("USER:",)),
    Template("mistral-instruct", "Mistral-7B-Instruct: [INST] .. [/INST] ..</s>", _mistral),
    Template("alpaca", "Stanford Alpaca: ### Instruction: / ### Response:", _alpaca,
             default_system="Below is an instruction that describes a task. Write a response that appropriately "
                            "completes the request.",
             stop=("### Instruction:",)),
    Template("plain", "no roles: the texts joined by newlines, for base models", _plain),
    Template("generic", "fallback: 'Role: text' lines ending in 'Assistant:'", _generic, stop=("\nUser:",)),
]}
FALLBACK = "generic"
TOKENIZER = "tokenizer"  # the tokenizer's own Jinja chat_template
TEMPLATE_NAMES = (TOKENIZER, *BUILTIN)

# Chosen from a model's name or architecture, first match wins (Baichuan2 and Baichuan share an architecture).
MATCH: list[tuple[str, str]] = [
    ("baichuan2", r"baichuan-?2"),
    ("baichuan", r"baichuan"),
    ("chatglm3", r"chatglm3"),
    ("qwen-7b-chat", r"qwen(-\d+b)?-chat|qwenlmheadmodel"),
    ("llama-2-chat", r"llama-?2.*chat"),
    ("vicuna_v1.1", r"vicuna"),
    ("mistral-instruct", r"mistral.*instruct"),
    ("alpaca", r"alpaca"),
]


# --- a template bound to one model's tokenizer ---------------------------------------------------

@dataclass
class ChatFormat:
    """How one served model renders chats: the template's name, why it was chosen, and its stops.
    ``render(messages, tools)`` takes ``tools`` only when ``takes_tools`` (a Jinja template that renders
    them); for other templates the tools are described in the messages first (``describe_tools``)."""

    name: str
    source: str  # config | tokenizer | name | architecture | fallback
    render: Callable[..., list[int]]
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    template_text: str | None = None  # a Jinja template's source
    takes_tools: bool = False


TOOLS_PROMPT = """You may call functions to answer. They are described in JSON Schema within <tools></tools>:
<tools>
{tools}
</tools>
To call functions, answer with one <tool_call></tool_call> block per call, each holding a JSON object with \
the function's name and its arguments:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments>}}}}
</tool_call>
Otherwise answer in plain text."""


def describe_tools(messages: list[dict], tools: list[dict], call_text: Callable[[str, str], str]) -> list[dict]:
    """Messages for a template that knows nothing of tools: the tools described at the end of the
    system prompt (``TOOLS_PROMPT``), earlier calls written into the assistant's turns with
    ``call_text(name, arguments)``, and tool results as the user's turns in ``<tool_response>``."""
    out = [dict(m) for m in messages]
    if tools:
        described = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools))
        if out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{described}"
        else:
            out.insert(0, {"role": "system", "content": described})
    for m in out:
        calls = m.pop("tool_calls", None) or []
        if calls:
            written = [call_text(c["function"]["name"], json.dumps(c["function"]["arguments"], ensure_ascii=False)
                                 if not isinstance(c["function"]["arguments"], str) else c["function"]["arguments"])
                       for c in calls]
            m["content"] = "\n".join(([m["content"]] if m["content"] else []) + written)
        if m["role"] == "tool":
            m["role"], m["content"] = "user", f"<tool_response>\n{m['content']}\n</tool_response>"
            m.pop("tool_call_id", None)
            m.pop("name", None)
    return out


def special_id(special: Special, tokenizer, generation_config: dict) -> int | None:
    name = special.name
    if name in ("bos", "eos"):
        return getattr(tokenizer, f"{name}_token_id")
    if name.endswith("_token_id"):
        value = generation_config.get(name)
        return int(value) if isinstance(value, int) else None
    token_id = tokenizer.convert_tokens_to_ids(name)
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id


def encode_segments(segments: list[Segment], tokenizer, generation_config: dict) -> list[int]:
    ids: list[int] = []
    for seg in segments:
        if isinstance(seg, str):
            ids += tokenizer(seg, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            continue
        token_id = special_id(seg, tokenizer, generation_config)
        if token_id is None:
            if seg is BOS:  # tokenizers without a BOS token (Qwen, GPT-2 style) start without one
                continue
            raise TemplateError(f"the template needs token {seg.name!r}, which this model's tokenizer and "
                                "generation_config.json do not define")
        ids.append(token_id)
    return ids


def bind(template: Template, source: str, tokenizer, generation_config: dict) -> ChatFormat:
    stop_ids, stop_texts = [], []
    for s in template.stop:
        token_id = special_id(s, tokenizer, generation_config) if isinstance(s, Special) else None
        if token_id is not None:
            stop_ids.append(token_id)
        elif isinstance(s, str) or not s.name.endswith("_id"):
            stop_texts.append(s if isinstance(s, str) else s.name)
    # Fail at start, not on the first request, when the tokenizer lacks a token the template places.
    encode_segments(template.segments([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                       {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]),
                    tokenizer, generation_config)
    return ChatFormat(template.name, source, lambda messages: encode_segments(
        template.segments(messages), tokenizer, generation_config), stop_ids, stop_texts)


def _jinja(tokenizer) -> ChatFormat:
    def render(messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
        # The template writes BOS and role tokens itself; encoding must not add them again.
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
    return ChatFormat(TOKENIZER, "tokenizer", render, template_text=source,
                      takes_tools=bool(re.search(r"\btools\b", source)))


def match_builtin(names: list[str], architecture: str) -> tuple[str, str] | None:
    """(template name, "name" | "architecture") of the first rule a name or the architecture matches."""
    for source, candidates in (("name", names), ("architecture", [architecture])):
        for template, pattern in MATCH:
            if any(re.search(pattern, c.lower()) for c in candidates if c):
                return template, source
    return None


def resolve_chat_format(model_id: str, tokenizer, generation_config: dict, *, configured: str | None = None,
                        names: list[str] = (), architecture: str = "") -> ChatFormat:
    fmt, doc = _resolve(model_id, tokenizer, generation_config, configured, names, architecture)
    if fmt.source == "fallback":
        logger.warning("model %s has no chat template and matches no built-in one; using the generic 'Role: text' "
                       "fallback. Name one with `template:` in bentochat.yaml.", model_id)
    else:
        logger.info("model %s: conversation template %s (from %s): %s", model_id, fmt.name, fmt.source, doc)
    return fmt


def _resolve(model_id, tokenizer, generation_config, configured, names, architecture) -> tuple[ChatFormat, str]:
    has_jinja = bool(getattr(tokenizer, "chat_template", None))
    if configured == TOKENIZER and not has_jinja:
        raise TemplateError(f"model {model_id}: template 'tokenizer' is configured, but its tokenizer has no "
                            "chat_template")
    if configured == TOKENIZER or (has_jinja and not configured):
        return _jinja(tokenizer), "the tokenizer's own chat_template"
    if configured:
        name, source = configured, "config"
    else:
        name, source = match_builtin([model_id, *names], architecture) or (FALLBACK, "fallback")
    return bind(BUILTIN[name], source, tokenizer, generation_config), BUILTIN[name].doc
