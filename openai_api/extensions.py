"""The schemas of the extension routes: vLLM's LoRA adapter loading, tokenizing (vLLM's shape) and
FastChat's token check."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from openai_api.objects import Response
from openai_api.protocol import ChatMessage, Request, TopLevelRequest


class LoadLoRAAdapterRequest(TopLevelRequest):
    """vLLM's ``POST /v1/load_lora_adapter``; ``model`` (an extension) names the base model, which may be
    left out when one chat model is served."""

    lora_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096, description="a PEFT directory inside the runner's "
                           "lora.adapter_dirs, or the store tag of an imported adapter")
    model: str | None = None


class UnloadLoRAAdapterRequest(TopLevelRequest):
    """vLLM's ``POST /v1/unload_lora_adapter``."""

    lora_name: str


class LoRAAdapterStatus(Response):
    object: Literal["lora_adapter"] = "lora_adapter"
    id: str
    parent: str
    status: Literal["loaded", "unloaded"]
    rank: int | None = None
    source: str | None = None


class TokenizeRequest(TopLevelRequest):
    """Either ``prompt`` text or chat ``messages`` (rendered with the model's template)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True  # for `prompt`, as /completions encodes it

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self


class Tokenized(Response):
    object: Literal["tokenize"] = "tokenize"
    model: str
    count: int
    max_model_len: int
    tokens: list[int]
    template: str | None = None


class TokenCheckItem(Request):
    model: str
    prompt: str | list[ChatMessage]
    max_tokens: int = Field(default=0, ge=0)

    @field_validator("prompt", mode="before")
    @classmethod
    def _not_empty(cls, v):
        if v == []:
            raise ValueError("must be text or a non-empty list of messages")
        return v


class TokenCheckRequest(TopLevelRequest):
    prompts: list[TokenCheckItem] = Field(min_length=1)


class TokenCheckResult(Response):
    fits: bool
    tokenCount: int  # noqa: N815 (FastChat's field names)
    contextLength: int  # noqa: N815


class TokenCheckResults(Response):
    prompts: list[TokenCheckResult]
