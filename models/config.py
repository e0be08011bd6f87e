"""BentoChat's configuration: which models it serves, from where and on what hardware (``models``),
and the gateway's own settings (every other key: UI, health polls, API keys, CORS, body size).

Read from ``bentochat.yaml`` at the repository root, or the file named by ``BENTOCHAT_CONFIG``.
The worker options mirror FastChat's model worker flags: ``gpus`` (``--gpus``),
``max_gpu_memory`` (``--max-gpu-memory``) and ``max_concurrency`` (``--limit-worker-concurrency``);
``max_queue`` bounds the requests waiting beyond that, past which the API answers 429;
``prefix_cache_tokens`` is how many prompt tokens' keys and values are kept for later prompts that
start the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.templates import TEMPLATE_NAMES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = ROOT / "bentochat.yaml"
DEFAULT_CONTEXT_LENGTH = 2048  # for a model whose config.json names no context length


ADAPTER_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"


class AdapterEntry(BaseModel):
    """A LoRA adapter served on a chat model: a store tag (``python -m models import`` of a PEFT
    directory; ``bentoml build`` packs it) or a PEFT directory on this machine (read at start, not
    packed). It is served as model ``name`` (unset: the tag's name or the directory's) and as
    ``<model id>:<name>``."""

    model_config = ConfigDict(extra="forbid")

    source: str
    name: str = ""

    @property
    def is_directory(self) -> bool:
        return "/" in self.source or self.source.startswith((".", "~"))

    @property
    def tag(self) -> str | None:
        """The store tag, None for a directory."""
        if self.is_directory:
            return None
        return self.source if ":" in self.source else f"{self.source}:latest"

    @model_validator(mode="after")
    def _name(self):
        if not self.name:
            self.name = Path(self.source.rstrip("/")).name if self.is_directory else self.source.split(":", 1)[0]
        if not re.fullmatch(ADAPTER_NAME, self.name):
            raise ValueError(f"adapter name {self.name!r} may hold only letters, digits and . _ -")
        return self


class ServedModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="model id clients send as `model`")
    model: str | None = Field(default=None, description="BentoML model store tag, e.g. `smollm2-135m-instruct:latest`")
    urls: list[str] = Field(default_factory=list, description="runners served elsewhere, instead of `model`; "
                                                              "several are replicas")
    kind: Literal["chat", "embedding"] = "chat"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantization: Literal["int8"] | None = Field(default=None, description="int8: weights stored and multiplied "
                                                                           "as int8 (FastChat --load-8bit)")
    cpu_threads: int | None = Field(default=None, ge=1, description="torch threads of this model's runner on "
                                    "CPU; unset: every core")
    forward: Literal["lean", "transformers"] = Field(default="lean", description="lean: BentoChat's own forward "
                                                     "for Llama, Mistral, Qwen2 and Qwen3; transformers: theirs")
    attention: Literal["fused", "eager"] = Field(default="fused", description="the lean forward's attention on "
                                                 "CPU: fused (BentoChat's native forward, or torch's fused kernel in "
                                                 "the decode step; faster) or eager (transformers' eager maths, token "
                                                 "for token as model.generate in bfloat16 too)")
    matmul: Literal["auto", "onednn"] = Field(default="auto", description="the lean forward's matmuls on CPU: "
                                              "auto (BentoChat's native kernels and forward pass where they run: "
                                              "bfloat16 on AMX or AVX-512 BF16, float32 on AVX-512, attention fused) or onednn "
                                              "(oneDNN's kernels, the Python forward)")
    gpus: list[int] = Field(default_factory=list, description="GPU indices; empty runs on CPU")
    max_gpu_memory: str | None = Field(default=None, description="cap per GPU, e.g. `20GiB`")
    max_concurrency: int = Field(default=64, ge=1, description="sequences generated together (the batch)")
    max_queue: int = Field(default=256, ge=0, description="requests waiting beyond max_concurrency; more get 429")
    prefix_cache_tokens: int = Field(default=2048, ge=0, description="prompt tokens whose KV is kept for reuse; 0: off")
    max_tokens_default: int | None = Field(default=None, ge=1, description="cap on generated tokens for requests "
                                                                          "that set none; unset: up to the context")
    trust_remote_code: bool = False
    template: str | None = Field(default=None, description="conversation template; unset: resolved from the model")
    tool_parser: Literal["hermes", "llama3", "mistral", "builtin"] | None = Field(
        default=None, description="the format of tool calls in the model's text; unset: from its chat template")
    reasoning: bool = Field(default=False, description="the model writes <think>…</think> first: it goes to "
                                                       "`reasoning_content`, not `content`")
    adapters: list[AdapterEntry] = Field(default_factory=list, description="LoRA adapters served on this chat "
                                         "model, each as a model id of its own: store tags or PEFT directories")
    max_loras: int = Field(default=4, ge=1, description="adapters resident at once; beyond, the least recently "
                                                        "used idle one is evicted and read again when next asked for")

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapter_strings(cls, v):
        return [{"source": e} if isinstance(e, str) else e for e in v or []]

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]*", v):
            raise ValueError(f"model id {v!r} may hold only letters, digits and . _ : / -")
        return v

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        if v is not None and v not in TEMPLATE_NAMES:
            raise ValueError(f"unknown template {v!r}; built in: {', '.join(TEMPLATE_NAMES)}")
        return v

    @field_validator("model")
    @classmethod
    def _tag_has_version(cls, v: str | None) -> str | None:
        return v if v is None or ":" in v else f"{v}:latest"

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
                raise ValueError(f"runner url {url!r} must be http(s)://host[:port]")
        if len(set(v)) != len(v):
            raise ValueError("runner urls must not repeat")
        return [url.rstrip("/") for url in v]

    @model_validator(mode="after")
    def _local_or_remote(self):
        if (self.model is None) == (not self.urls):
            raise ValueError(f"model {self.id!r}: give either `model` (a store tag, served here) or `urls` "
                             "(runners served elsewhere)")
        if self.adapters and (self.kind != "chat" or self.remote):
            raise ValueError(f"model {self.id!r}: adapters are served on a chat model served here; a runner "
                             "elsewhere lists its own in its bentochat.yaml")
        return self

    @property
    def remote(self) -> bool:
        return bool(self.urls)

    @property
    def store_name(self) -> str:
        return self.model.split(":", 1)[0] if self.model else ""

    @property
    def runner_name(self) -> str:
        """Its runner service's name: ``smollm2-135m-instruct`` -> ``runner-smollm2-135m-instruct``
        (in ``service.py`` the attribute for ``bentoml serve service:<attribute>`` has ``_`` for ``-``)."""
        return "runner-" + re.sub(r"[^a-z0-9]+", "-", self.id.lower()).strip("-")


class UIConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # FastChat's --model-list-mode: `once` lists the chat models at start; `reload` lists, on every
    # page load, those whose runners answer the gateway's health polls.
    model_list_mode: Literal["once", "reload"] = "once"
    # FastChat's --log-dir: the side by side and arena tabs' answers and every vote, appended as JSON
    # lines (conv-YYYY-MM-DD.json) here; the leaderboard is computed from them. Unset: nothing logged.
    log_dir: str | None = None


class HealthConfig(BaseModel):
    """FastChat's worker heartbeats, turned around: the gateway polls each runner's queue. A runner
    that fails ``failures`` polls in a row is out of /v1/models and routing, within
    ``failures * (interval_s + timeout_s)`` seconds of going silent, and back at its next answer."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(default=2.0, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)
    failures: int = Field(default=2, ge=1)

    @property
    def bound_s(self) -> float:
        return self.failures * (self.interval_s + self.timeout_s)


class CorsConfig(BaseModel):
    """FastChat's --allowed-origins: browsers on these origins may call the API. Empty: CORS is off."""

    model_config = ConfigDict(extra="forbid")

    allow_origins: list[str] = Field(default_factory=list)  # e.g. [https://chat.example.com], or ["*"]


class ResponsesConfig(BaseModel):
    """The Responses API's store: the last ``store_size`` responses are kept in memory, for
    ``previous_response_id`` and ``GET /v1/responses/{id}``; older ones are a 404. 0 keeps none."""

    model_config = ConfigDict(extra="forbid")

    store_size: int = Field(default=1000, ge=0)


class GatewayConfig(BaseModel):
    """Every key of bentochat.yaml but ``models``."""

    model_config = ConfigDict(extra="forbid")

    ui: UIConfig = Field(default_factory=UIConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    # FastChat's --api-keys: when any are set, every call but the health probes needs
    # `Authorization: Bearer <key>` (the chat UI asks for a key at sign-in instead).
    # BENTOCHAT_API_KEYS (comma-separated) adds keys that should not live in a file.
    api_keys: list[str] = Field(default_factory=list)
    # With api_keys set, /metrics needs a key too, unless this is true (a scraper that cannot send one).
    public_metrics: bool = False
    cors: CorsConfig = Field(default_factory=CorsConfig)
    # A request body larger than this is refused with 413 before it is read.
    max_body_mb: float = Field(default=8, gt=0)
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)


class ServedModels(BaseModel):
    """The `models` of bentochat.yaml: at least one, ids and runner names unique."""

    models: list[ServedModel]

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, v: list[ServedModel]) -> list[ServedModel]:
        if not v:
            raise ValueError("at least one model must be served")
        ids = [m.id for m in v] + [a.name for m in v for a in m.adapters]
        for what, names in (("model and adapter ids", ids), ("runner names", [m.runner_name for m in v])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} must be unique, repeated: {', '.join(dupes)}")
        return v


@dataclass
class Config:
    models: list[ServedModel]
    gateway: GatewayConfig


class ConfigError(RuntimeError):
    pass


def config_path() -> Path:
    return Path(os.environ.get("BENTOCHAT_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"invalid BentoChat configuration {path}: expected a mapping of keys")
        models = ServedModels.model_validate({"models": raw.pop("models", None)}).models
        gateway = GatewayConfig.model_validate(raw)
        env_keys = [k.strip() for k in os.environ.get("BENTOCHAT_API_KEYS", "").split(",") if k.strip()]
        gateway.api_keys = list(dict.fromkeys(gateway.api_keys + env_keys))
        return Config(models, gateway)
    except FileNotFoundError as e:
        raise ConfigError(f"BentoChat configuration not found: {path}") from e
    except (yaml.YAMLError, ValidationError) as e:
        raise ConfigError(f"invalid BentoChat configuration {path}:\n{e}") from e
