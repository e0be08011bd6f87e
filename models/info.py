"""What the gateway knows of a served model (``ModelInfo``): its tokenizer, context length, sampling
defaults, chat template and tool-call format, and the tokens and strings that end an answer, read
from the model's files in the store (or from what a runner served elsewhere sends of them)."""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from models.config import DEFAULT_CONTEXT_LENGTH, ServedModel
from models.templates import ChatFormat, describe_tools, resolve_chat_format
from models.tool_formats import FORMATS, ToolFormat, format_for_template

# generation_config.json keys that become defaults for parameters a request leaves out.
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


def generation_defaults(raw: dict) -> dict:
    """Only what the model's authors wrote in ``generation_config.json``, not transformers' own defaults."""
    defaults = {k: raw[k] for k in GENERATION_DEFAULT_KEYS if raw.get(k) is not None}
    if raw.get("do_sample") is False:
        defaults["temperature"] = 0.0  # the authors asked for greedy decoding
    return defaults


def _source_name(meta: dict) -> str:
    """The imported directory's, file's or hub repository's own name: ``dir:/models/Baichuan-13B-Chat`` ->
    ``Baichuan-13B-Chat``."""
    source = str(meta.get("source", "")).split(":", 1)[-1]
    return Path(source).stem if source.endswith(".gguf") else Path(source).name


def _ids(*values) -> tuple[int, ...]:
    """Token ids from ints and lists of them, each once, in order."""
    ids = [i for v in values for i in ([v] if isinstance(v, int) else v or [])]
    return tuple(dict.fromkeys(ids))


@dataclass
class ModelInfo:
    """What the gateway knows of a served model: its tokenizer, context, sampling defaults, and the
    tokens and strings that end an answer (the template's folded in once, here)."""

    served: ServedModel
    tag: str  # the store tag of the model, here or on the runner elsewhere
    created: int
    context_length: int
    tokenizer: object
    defaults: dict = field(default_factory=dict)  # from generation_config.json, then bentochat.yaml's `defaults`
    eos_token_ids: tuple[int, ...] = ()  # what ends a text completion
    chat_format: ChatFormat | None = None  # chat models only
    stop_token_ids: tuple[int, ...] = ()  # what ends a chat answer: EOS and the template's stop tokens
    stop: tuple[str, ...] = ()  # and the template's stop strings
    tool_format: ToolFormat = FORMATS["builtin"]  # how its tool calls are written (chat models)

    @property
    def id(self) -> str:
        return self.served.id

    @property
    def kind(self) -> str:
        return self.served.kind

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @classmethod
    def load(cls, served: ServedModel) -> ModelInfo:
        """From the local model store (a runner in this ``bentoml serve``)."""
        import bentoml

        stored = bentoml.models.get(served.model)
        return cls.from_dir(served, Path(stored.path), str(stored.tag), stored.info.metadata,
                            int(stored.info.creation_time.timestamp()))

    @classmethod
    def from_description(cls, served: ServedModel, description: dict, into: Path) -> ModelInfo:
        """From what a runner served elsewhere sent (``describe``): its model's files but the weights."""
        for name, data in description["files"].items():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(data))
        return cls.from_dir(served, into, description["tag"], description["metadata"], description["created"])

    @classmethod
    def from_dir(cls, served: ServedModel, path: Path, tag: str, meta: dict, created: int) -> ModelInfo:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=served.trust_remote_code)
        raw_gen = path / "generation_config.json"
        gen = json.loads(raw_gen.read_text(encoding="utf-8")) if raw_gen.is_file() else {}
        eos = _ids(gen.get("eos_token_id"), tokenizer.eos_token_id)
        chat_format = None
        if served.kind == "chat":
            chat_format = resolve_chat_format(served.id, tokenizer, gen, configured=served.template,
                                              names=[served.store_name, _source_name(meta)],
                                              architecture=str(meta.get("architecture", "")))
        return cls(
            served=served,
            tag=tag,
            created=created,
            context_length=int(meta.get("context_length") or DEFAULT_CONTEXT_LENGTH),
            tokenizer=tokenizer,
            defaults={**generation_defaults(gen), **served.defaults.model_dump(exclude_none=True)},
            eos_token_ids=eos,
            chat_format=chat_format,
            stop_token_ids=_ids(eos, chat_format.stop_token_ids if chat_format else ()),
            stop=tuple(dict.fromkeys(chat_format.stop)) if chat_format else (),
            tool_format=FORMATS[served.tool_parser] if served.tool_parser else
            format_for_template(chat_format.template_text if chat_format else None),
        )

    @functools.cached_property
    def tool_marker_ids(self) -> frozenset[int]:
        """Special tokens of the tokenizer that are markers of its tool-call format (``[TOOL_CALLS]``,
        ``<|python_tag|>``): the detokenizer shows them to the tool-call parser."""
        special = set(self.tokenizer.all_special_ids) | {
            i for i, t in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if t.special}
        ids = {self.tokenizer.convert_tokens_to_ids(t): t for t in self.tool_format.triggers}
        return frozenset(i for i, t in ids.items() if i in special and self.tokenizer.convert_ids_to_tokens(i) == t)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids of a chat, with ``tools`` the model may call: rendered by its template when that
        takes tools, else described in the system prompt (``models.templates.describe_tools``)."""
        fmt = self.chat_format
        if fmt.takes_tools:
            return fmt.render(messages, tools)
        if tools or any("tool_calls" in m or m["role"] == "tool" for m in messages):
            messages = describe_tools(messages, tools or [], self.tool_format.call_text)
        return fmt.render(messages)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]
