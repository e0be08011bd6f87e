"""The objects the API returns (OpenAI's chat completion, chunk, completion, embedding and model
objects), as pydantic models; with the request schemas of ``protocol.py`` they are the published schema."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field, model_serializer


class Response(BaseModel):
    pass


class PromptTokensDetails(Response):
    cached_tokens: int = 0  # of the prompt tokens, those the runner's prefix cache gave


class Usage(Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # generations only

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


FinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCallOut(Response):
    name: str
    arguments: str


class ToolCallOut(Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = None  # extension (vLLM, DeepSeek): the reasoning models' thinking


class TopLogprob(Response):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Response):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Sparse(Response):
    """Written without the fields it leaves None, as OpenAI streams a call: clients' aggregators add up
    what each chunk holds, and a ``"type": null`` would undo the first chunk's ``"function"``."""

    @model_serializer(mode="wrap")
    def _sparse(self, write):
        return {k: v for k, v in write(self).items() if v is not None}


class FunctionDelta(Sparse):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Response):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(Response):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Response):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bentochat"
    # extensions
    kind: Literal["chat", "embedding"]
    context_length: int
    root: str
    template: str | None = None  # chat models: the conversation template and why it was chosen
    template_source: Literal["config", "tokenizer", "name", "architecture", "fallback"] | None = None
    generation_defaults: dict[str, float | int] = Field(default_factory=dict)  # from generation_config.json
    parent: str | None = None  # a LoRA adapter: the model it runs on (vLLM's field); `root` is its source


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
