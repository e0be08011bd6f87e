"""What the gateway knows of each served model: tokenizer, context length, sampling defaults."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import bentoml

from models.config import DEFAULT_CONTEXT_LENGTH, ServedModel
from models.templates import ChatFormat, resolve_chat_format

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


def _as_list(v) -> list[int]:
    return [v] if isinstance(v, int) else list(v or [])


@dataclass
class ServedModelInfo:
    served: ServedModel
    path: Path
    tag: str  # the store tag of the model, here or on the runner elsewhere
    created: int
    context_length: int
    tokenizer: object
    defaults: dict = field(default_factory=dict)
    eos_token_ids: list[int] = field(default_factory=list)
    chat_format: ChatFormat | None = None  # chat models only

    @property
    def id(self) -> str:
        return self.served.id

    @property
    def kind(self) -> str:
        return self.served.kind

    @classmethod
    def load(cls, served: ServedModel) -> ServedModelInfo:
        """From the local model store (a runner in this `bentoml serve`)."""
        stored = bentoml.models.get(served.model)
        return cls.from_dir(served, Path(stored.path), str(stored.tag), stored.info.metadata,
                            int(stored.info.creation_time.timestamp()))

    @classmethod
    def from_description(cls, served: ServedModel, description: dict, into: Path) -> ServedModelInfo:
        """From what a runner served elsewhere sent (``describe``): its model's files but the weights."""
        for name, data in description["files"].items():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(data))
        return cls.from_dir(served, into, description["tag"], description["metadata"], description["created"])

    @classmethod
    def from_dir(cls, served: ServedModel, path: Path, tag: str, meta: dict, created: int) -> ServedModelInfo:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=served.trust_remote_code)
        raw_gen = path / "generation_config.json"
        gen = json.loads(raw_gen.read_text(encoding="utf-8")) if raw_gen.is_file() else {}
        eos = _as_list(gen.get("eos_token_id")) + _as_list(tokenizer.eos_token_id)
        chat_format = None
        if served.kind == "chat":
            chat_format = resolve_chat_format(served.id, tokenizer, gen, configured=served.template,
                                              names=[served.store_name, _source_name(meta)],
                                              architecture=str(meta.get("architecture", "")))
        return cls(
            served=served,
            path=path,
            tag=tag,
            created=created,
            context_length=int(meta.get("context_length") or DEFAULT_CONTEXT_LENGTH),
            tokenizer=tokenizer,
            defaults=generation_defaults(gen),
            eos_token_ids=list(dict.fromkeys(eos)),
            chat_format=chat_format,
        )

    def render_chat(self, messages: list[dict]) -> list[int]:
        return self.chat_format.render(messages)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]
