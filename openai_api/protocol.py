"""The request schemas of the OpenAI routes, as pydantic models, with validators that name the field
of a 400; and how a request becomes the engine's parameters (``to_sampling_params``, after vLLM's).
The objects the routes return are in ``objects.py``, the extension routes' schemas in ``extensions.py``."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from models.info import ModelInfo
from openai_api import bounds
from openai_api.constraints import combine, extension_grammar, response_format_grammar
from openai_api.errors import context_length_exceeded, invalid_value
from openai_api.tool_calls import check_tools, tool_grammar
from runners.engine.sequence import SamplingParams

SEED_RANGE = (-2**63, 2**64 - 1)  # OpenAI's seed is a 64-bit integer, signed or not
MAX_SEQUENCES = 256  # prompts x n in one request


def find_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string in a parsed JSON body that holds an unpaired UTF-16 surrogate
    (JSON's ``"\\ud800"``): it is no text, and no tokenizer nor UTF-8 encoder can take it."""
    if isinstance(value, str):
        return path if any("\ud800" <= c <= "\udfff" for c in value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = find_surrogate(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
        if found is not None:
            return found
    return None


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # as OpenAI-compatible servers do: clients send extras freely


class TopLevelRequest(Request):
    """A whole request body."""

    @model_validator(mode="before")
    @classmethod
    def _text_is_text(cls, data):
        path = find_surrogate(data)
        if path is not None:
            raise ValueError(f"{path}: holds an unpaired UTF-16 surrogate (such as \\ud800), which is not text")
        return data


class StreamOptions(Request):
    include_usage: bool = False


class StructuredOutputs(Request):
    """vLLM's ``structured_outputs`` extension: exactly one of these."""

    model_config = ConfigDict(extra="allow")  # unknown keys are named in the 400, not dropped
    json_: dict | str | bool | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def given(self) -> dict:
        return {"json": self.json_, "regex": self.regex, "choice": self.choice, "grammar": self.grammar,
                **(self.model_extra or {})}


class SamplingFields(TopLevelRequest):
    """Parameters shared by chat and text completions, OpenAI's and the common extensions."""

    model_config = ConfigDict(json_schema_extra={"allOf": [bounds.only_with("stream", True, "stream_options")]})
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Annotated[float | None, WithJsonSchema(bounds.TEMPERATURE)] = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str | list[str] | None, WithJsonSchema(bounds.STOP)] = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    # extensions (vLLM / FastChat)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=100)
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | bool | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if v is not None and 0 < v < bounds.MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {bounds.MIN_TEMPERATURE}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > bounds.MAX_STOPS or any(len(s) > bounds.MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {bounds.MAX_STOPS} stop strings of at most {bounds.MAX_STOP_CHARS} characters each")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_only(cls, v, info):
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @model_validator(mode="after")
    def _min_below_max(self):
        if self.min_tokens and self.max_new_tokens is not None and self.min_tokens > self.max_new_tokens:
            raise ValueError(f"min_tokens: {self.min_tokens} is more than max_tokens ({self.max_new_tokens})")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    # What differs between chat and text completions: how the prompt is named in errors, how long an
    # answer that sets no max_tokens may be (None: up to the rest of the context), the logprobs asked
    # for, and which of the model's stops apply.
    PROMPT_PARAM: ClassVar[str]
    DEFAULT_MAX_TOKENS: ClassVar[int | None] = None

    @property
    def num_logprobs(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the k most likely."""
        return None

    def model_stops(self, info: ModelInfo) -> tuple[tuple[int, ...], tuple[str, ...]]:
        return info.eos_token_ids, ()

    def extension_grammar(self) -> tuple[str | None, str | None]:
        """(EBNF, the field it came from) of vLLM's structured-output extensions, if the request has one."""
        return extension_grammar(self.structured_outputs.given() if self.structured_outputs else None,
                                 {k: getattr(self, f"guided_{k}") for k in ("json", "regex", "choice", "grammar")})

    def output_grammar(self, info: ModelInfo) -> str | None:
        """The EBNF grammar the answer must match, if the request constrains it (a 400 when it cannot)."""
        return self.extension_grammar()[0]

    def to_sampling_params(self, info: ModelInfo, prompt_tokens: int, *, fit_context: bool = False) -> SamplingParams:
        """The engine's parameters for this request on ``info``'s model, for a prompt of ``prompt_tokens``:
        request values win; what it leaves out comes from the model's defaults (``ModelInfo.defaults``), else
        OpenAI's. A prompt or ``max_tokens`` beyond the context is a 400, unless ``fit_context`` (the chat
        page), which cuts ``max_tokens`` to what the context leaves."""
        ctx, d = info.context_length, info.defaults
        if prompt_tokens >= ctx:
            raise context_length_exceeded(ctx, prompt_tokens, self.PROMPT_PARAM)
        max_tokens = self.max_new_tokens
        if max_tokens is None:
            max_tokens = info.served.max_tokens_default or d.get("max_new_tokens") or self.DEFAULT_MAX_TOKENS or ctx
        elif prompt_tokens + max_tokens > ctx and not fit_context:
            raise context_length_exceeded(ctx, prompt_tokens, self.PROMPT_PARAM, max_tokens)
        vocab = info.vocab_size
        if any(not 0 <= t < vocab for t in self.stop_token_ids or ()):
            raise invalid_value("stop_token_ids", f"token ids must be in [0, {vocab})")
        stop_ids, stops = self.model_stops(info)

        def pick(name, fallback):
            value = getattr(self, name)
            return value if value is not None else d.get(name, fallback)

        return SamplingParams(
            max_tokens=min(max_tokens, ctx - prompt_tokens),
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=min(max(pick("top_k", 0), 0), vocab),
            repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            min_tokens=self.min_tokens or 0,
            stop_token_ids=tuple(dict.fromkeys([*stop_ids, *(self.stop_token_ids or [])])),
            stop=tuple(dict.fromkeys([*(self.stop or []), *stops])),
            seed=self.seed,
            logprobs=self.num_logprobs,
            grammar=self.output_grammar(info),
        )


class TextPart(Request):
    type: Literal["text"]
    text: str


def _text_parts(v):
    """Content parts must be text: this server's models read text only."""
    if isinstance(v, list):
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"part {i} is of type {kind!r}; this model takes text only "
                                 "(`text` parts, no images, audio or files)")
    return v


class FunctionCall(Request):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCall(Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    model_config = ConfigDict(json_schema_extra=bounds.MESSAGE)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this is the result of
    reasoning_content: str | None = None  # assistant: its reasoning, sent back as received; not rendered

    _parts = field_validator("content", mode="before")(_text_parts)

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: a {self.role} message needs content (text or text parts)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message makes tool calls")
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


TOOL_NAME = re.compile(bounds.TOOL_NAME_PATTERN)


class FunctionDefinition(Request):
    name: str = Field(json_schema_extra={"pattern": bounds.TOOL_NAME_PATTERN})
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not TOOL_NAME.fullmatch(v):
            raise ValueError("must be 1 to 64 letters, digits, underscores, dots or dashes")
        return v


class Tool(Request):
    model_config = ConfigDict(json_schema_extra=bounds.function_tool)
    type: str
    function: FunctionDefinition | None = None

    @model_validator(mode="after")
    def _function(self):
        if self.type != "function":
            raise ValueError(f"type: {self.type!r} tools are not supported; only `function` tools")
        if self.function is None:
            raise ValueError("function: a function tool needs its function")
        return self


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [bounds.only_with("stream", True, "stream_options"),
                                                           bounds.only_with("logprobs", True, "top_logprobs")]})
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, json_schema_extra={"minItems": 1})
    tool_choice: Annotated[Literal["none", "auto", "required"] | dict | None, WithJsonSchema(bounds.TOOL_CHOICE)] = None
    parallel_tool_calls: bool = True
    response_format: Annotated[dict | None, WithJsonSchema(bounds.RESPONSE_FORMAT)] = None

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.tools is not None and not self.tools:
            raise ValueError("tools: must not be empty; leave it out instead")
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if isinstance(choice, dict):
            function = choice.get("function") if choice.get("type") == "function" else None
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str):
                raise ValueError('tool_choice: must be "none", "auto", "required" or '
                                 '{"type": "function", "function": {"name": ...}}')
            if name not in names:
                raise ValueError(f"tool_choice: names function {name!r}, which is not among the tools")
        elif choice in ("auto", "required") and not self.tools:
            raise ValueError(f"tool_choice: {choice!r} needs tools")
        if self.response_format is not None and not isinstance(self.response_format.get("type"), str):
            raise ValueError("response_format: needs a `type` (text, json_object or json_schema)")
        return self

    @property
    def tool_mode(self) -> str:
        """none, auto, required (a named function is required, of the one tool it names)."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, dict):
            return "required"
        return self.tool_choice or "auto"

    @property
    def active_tools(self) -> list[dict]:
        """The tools the model may call (one, when ``tool_choice`` names it), as plain dicts."""
        if self.tool_mode == "none":
            return []
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        if isinstance(self.tool_choice, dict):
            tools = [t for t in tools if t["function"]["name"] == self.tool_choice["function"]["name"]]
        return tools

    PROMPT_PARAM: ClassVar[str] = "messages"

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def model_stops(self, info: ModelInfo) -> tuple[tuple[int, ...], tuple[str, ...]]:
        return info.stop_token_ids, info.stop  # the template's, with EOS

    def output_grammar(self, info: ModelInfo) -> str | None:
        check_tools([t.model_dump(exclude_none=True) for t in self.tools or ()])
        tools = self.active_tools
        answer = response_format_grammar(self.response_format)
        if tools:  # the answer's format folds into the tools' grammar: calls, or (auto) an answer in it
            answer = tool_grammar(info.tool_format, tools, self.tool_mode, self.parallel_tool_calls,
                                  named=isinstance(self.tool_choice, dict),
                                  answer=answer if self.tool_mode == "auto" else None)
        return combine((answer, "tools" if tools else "response_format"), self.extension_grammar())



class CompletionRequest(SamplingFields):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(bounds.PROMPT)]
    echo: Annotated[bool, WithJsonSchema({"const": False, **bounds.UNSUPPORTED})] = False
    suffix: Annotated[str | None, WithJsonSchema({"anyOf": [bounds.NULL, {"const": ""}], **bounds.UNSUPPORTED})] = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("echo", "suffix"):
            if getattr(self, name):
                raise ValueError(f"{name}: not supported by this server yet")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of: only best_of equal to n is supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be empty")
        if isinstance(self.prompt, list) and any(p == [] for p in self.prompt):
            raise ValueError(f"prompt[{self.prompt.index([])}]: a token-id prompt must hold at least one id")
        if len(self.prompts) * self.n > MAX_SEQUENCES:
            raise ValueError(f"prompt: {len(self.prompts)} prompts x n={self.n} is more than {MAX_SEQUENCES} "
                             "sequences in one request")
        return self

    PROMPT_PARAM: ClassVar[str] = "prompt"
    DEFAULT_MAX_TOKENS: ClassVar[int | None] = 16  # OpenAI's, for text completions

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class EmbeddingRequest(TopLevelRequest):
    model: str
    input: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(bounds.EMBEDDING_INPUT)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _texts_only(cls, v):
        texts = [v] if isinstance(v, str) else v
        if not texts:
            raise ValueError("must not be empty")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("token-id input is not supported; send strings (LangChain's OpenAIEmbeddings sends "
                             "token ids unless created with check_embedding_ctx_length=False)")
        if len(texts) > bounds.MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {bounds.MAX_EMBEDDING_INPUTS} inputs in one request, got {len(texts)}")
        empty = next((i for i, t in enumerate(texts) if not t), None)
        if empty is not None:
            raise ValueError(f"item {empty} is empty; every input must hold text")
        return texts
