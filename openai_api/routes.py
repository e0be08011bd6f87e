"""The ``/v1`` routes. The gateway puts its model registry on ``app.state.registry``."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from openai_api import errors
from openai_api.errors import OpenAIError
from openai_api.generation import generate_text, merge, runner_unavailable, started
from openai_api.logprobs import chat_logprobs, completion_logprobs
from openai_api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    EmbeddingData,
    EmbeddingList,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenCheckRequest,
    TokenCheckResult,
    TokenCheckResults,
    Tokenized,
    TokenizeRequest,
    Usage,
    new_id,
)

app = FastAPI(title="BentoChat OpenAI-compatible API")
errors.install(app)
app.state.api_keys = set()


class RequireApiKey:
    """FastChat's --api-keys: with keys on ``app.state.api_keys``, every call needs
    `Authorization: Bearer <key>`. Plain ASGI, so streamed responses pass through untouched."""

    def __init__(self, asgi):
        self.asgi = asgi

    async def __call__(self, scope, receive, send):
        keys = scope["app"].state.api_keys if scope["type"] == "http" else None
        if keys:
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, key = authorization.partition(" ")
            if scheme.lower() != "bearer" or key.strip() not in keys:
                response = OpenAIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` with a "
                                            "key this server accepts.", code="invalid_api_key").response()
                return await response(scope, receive, send)
        await self.asgi(scope, receive, send)


app.add_middleware(RequireApiKey)


def sampling_params(model, req: SamplingFields, prompt_len: int, prompt_param: str, default_max: int | None) -> dict:
    """Request values win; what the request leaves out comes from the model's generation_config.json."""
    ctx = model.context_length
    if prompt_len >= ctx:
        raise OpenAIError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has "
                               f"{prompt_len} tokens.", param=prompt_param, code="context_length_exceeded")
    d = model.defaults
    max_tokens = req.max_new_tokens
    if max_tokens is not None and prompt_len + max_tokens > ctx:
        raise OpenAIError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {prompt_len} "
                               f"tokens and max_tokens asks for {max_tokens} more.", param="max_tokens",
                          code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(d.get("max_new_tokens") or default_max or ctx, ctx - prompt_len)

    def pick(name, fallback):
        value = getattr(req, name)
        return value if value is not None else d.get(name, fallback)

    return {
        "max_tokens": max_tokens,
        "temperature": pick("temperature", 1.0),
        "top_p": pick("top_p", 1.0),
        "top_k": max(pick("top_k", 0), 0),
        "repetition_penalty": pick("repetition_penalty", 1.0),
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "min_tokens": req.min_tokens or 0,
        "stop_token_ids": list(dict.fromkeys(model.eos_token_ids + (req.stop_token_ids or []))),
        "seed": req.seed,
        "logprobs": req.num_logprobs,
    }


def _choice_params(params: dict, index: int) -> dict:
    # With a seed, each of the n choices gets its own, so they differ but stay reproducible.
    return params if params["seed"] is None else {**params, "seed": params["seed"] + index}


def _sse(events: AsyncIterator) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {event.model_dump_json(exclude_none=False)}\n\n"
        except OpenAIError as e:  # headers are sent already: report in-band, as OpenAI does
            yield f"data: {e.body().model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _run_choices(model, runner, prompts: list[list[int]], params: dict, stops: list[str], n: int):
    """Yields (choice index, TextEvent); choice ``p * n + i`` is the i-th choice of prompt p, as OpenAI orders them."""
    return merge([generate_text(model, runner, prompt_ids, _choice_params(params, i), stops)
                  for prompt_ids in prompts for i in range(n)])


async def _collect(choices, total: int) -> tuple[list[str], list[str | None], list[int], list[list[dict]]]:
    """Whole texts, finish reasons, completion token counts and logprob entries of ``total`` choices."""
    texts, reasons, counts, logprobs = [""] * total, [None] * total, [0] * total, [[] for _ in range(total)]
    async for i, ev in choices:
        texts[i] += ev.text
        reasons[i], counts[i] = ev.finish_reason, ev.completion_tokens
        logprobs[i] += ev.logprobs
    return texts, reasons, counts, logprobs


@app.get("/models")
async def list_models(request: Request) -> ModelList:
    registry = request.app.state.registry
    return ModelList(data=[
        ModelCard(id=m.id, created=m.created, kind=m.kind, context_length=m.context_length, root=m.tag,
                  template=m.chat_format.name if m.chat_format else None,
                  template_source=m.chat_format.source if m.chat_format else None,
                  generation_defaults=m.defaults)
        for m in registry.models()
    ])


@app.get("/stats")
async def runner_stats(request: Request) -> dict:
    """Extension: each model's runner state (a chat engine's running and waiting sequences and tokens
    generated), summed over its ready replicas and per replica."""
    registry = request.app.state.registry
    ready = [m for m in registry.entries.values() if m.ready]
    stats = await asyncio.gather(*(m.stats() for m in ready))
    return {"object": "list", "data": {m.id: s for m, s in zip(ready, stats)}}


def prepare_chat(model, req: ChatCompletionRequest) -> tuple[list[int], dict, list[str]]:
    """Prompt ids, sampling parameters and stop strings of a chat request: the model's template adds
    its own stop tokens and strings to the request's."""
    prompt_ids = model.render_chat(chat_messages(req.messages))
    params = sampling_params(model, req, len(prompt_ids), "messages", None)
    fmt = model.chat_format
    params["stop_token_ids"] = list(dict.fromkeys(params["stop_token_ids"] + fmt.stop_token_ids))
    return prompt_ids, params, list(dict.fromkeys((req.stop or []) + fmt.stop))


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]


@app.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    model, runner = request.app.state.registry.get(req.model, "chat")
    prompt_ids, params, stops = prepare_chat(model, req)
    choices = _run_choices(model, runner, [prompt_ids], params, stops, req.n)
    rid = new_id("chatcmpl")

    def logprobs(entries):
        return chat_logprobs(model.tokenizer, entries) if req.logprobs else None

    if req.stream:
        choices = await started(choices)

        async def chunks():
            counts = [0] * req.n
            for i in range(req.n):
                yield ChatCompletionChunk(id=rid, model=req.model,
                                          choices=[ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            async for i, ev in choices:
                counts[i] = ev.completion_tokens
                if ev.text or ev.finish_reason:
                    yield ChatCompletionChunk(id=rid, model=req.model, choices=[ChatChunkChoice(
                        index=i, delta=Delta(content=ev.text), finish_reason=ev.finish_reason,
                        logprobs=logprobs(ev.logprobs))])
            if req.include_usage:
                yield ChatCompletionChunk(id=rid, model=req.model, choices=[],
                                          usage=Usage.of(len(prompt_ids), sum(counts)))
        return _sse(chunks())

    texts, reasons, counts, entries = await _collect(choices, req.n)
    return ChatCompletion(id=rid, model=req.model, usage=Usage.of(len(prompt_ids), sum(counts)), choices=[
        ChatChoice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=reasons[i],
                   logprobs=logprobs(entries[i]))
        for i in range(req.n)
    ])


@app.post("/completions")
async def completions(req: CompletionRequest, request: Request):
    model, runner = request.app.state.registry.get(req.model, "chat")
    prompts = [p if isinstance(p, list) else model.encode(p) for p in req.prompts]
    vocab = len(model.tokenizer)
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise OpenAIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
    params = [sampling_params(model, req, len(p), "prompt", 16) for p in prompts]
    # max_tokens may be clamped per prompt; the tightest applies to all, as one request.
    params = min(params, key=lambda p: p["max_tokens"])
    choices = _run_choices(model, runner, prompts, params, req.stop, req.n)
    rid = new_id("cmpl")
    prompt_tokens = sum(len(p) for p in prompts)

    total = len(prompts) * req.n

    def logprobs(entries, offset=0):
        return completion_logprobs(model.tokenizer, entries, offset) if req.logprobs is not None else None

    if req.stream:
        choices = await started(choices)

        async def chunks():
            counts, offsets = [0] * total, [0] * total
            async for i, ev in choices:
                counts[i] = ev.completion_tokens
                if ev.text or ev.finish_reason:
                    lp = logprobs(ev.logprobs, offsets[i])
                    if lp and lp.tokens:
                        offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
                    yield Completion(id=rid, model=req.model, choices=[CompletionChoice(
                        index=i, text=ev.text, finish_reason=ev.finish_reason, logprobs=lp)])
            if req.include_usage:
                yield Completion(id=rid, model=req.model, choices=[],
                                 usage=Usage.of(prompt_tokens, sum(counts)))
        return _sse(chunks())

    texts, reasons, counts, entries = await _collect(choices, total)
    return Completion(id=rid, model=req.model, usage=Usage.of(prompt_tokens, sum(counts)), choices=[
        CompletionChoice(index=i, text=texts[i], finish_reason=reasons[i], logprobs=logprobs(entries[i]))
        for i in range(total)
    ])


def _count(model, prompt: str | list[ChatMessage], add_special_tokens: bool = True) -> list[int]:
    if isinstance(prompt, str):
        return model.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    if model.chat_format is None:
        raise OpenAIError(400, f"The model `{model.id}` is an {model.kind} model and has no chat template; send "
                               "`prompt` text.", param="messages", code="model_not_supported")
    return model.render_chat(chat_messages(prompt))


@app.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> Tokenized:
    """Extension: the token ids of a prompt, or of a message list rendered with the model's chat
    template exactly as /chat/completions renders it."""
    model = request.app.state.registry.info(req.model)
    ids = _count(model, req.messages if req.messages is not None else req.prompt, req.add_special_tokens)
    return Tokenized(model=model.id, tokens=ids, count=len(ids), max_model_len=model.context_length,
                     template=model.chat_format.name if req.messages is not None else None)


@app.post("/token_check")
async def token_check(req: TokenCheckRequest, request: Request) -> TokenCheckResults:
    """Extension, FastChat's /api/v1/token_check: does each prompt plus its max_tokens fit the context?"""
    results = []
    for item in req.prompts:
        model = request.app.state.registry.info(item.model)
        count = len(_count(model, item.prompt))
        results.append(TokenCheckResult(fits=count + item.max_tokens <= model.context_length, tokenCount=count,
                                        contextLength=model.context_length))
    return TokenCheckResults(prompts=results)


@app.post("/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request) -> EmbeddingList:
    model, runner = request.app.state.registry.get(req.model, "embedding")
    texts: list[str] = req.input
    lengths = [len(model.encode(t)) for t in texts]
    for i, n in enumerate(lengths):
        if n > model.context_length:
            raise OpenAIError(400, f"input[{i}] has {n} tokens; this model's maximum is {model.context_length}.",
                              param="input", code="context_length_exceeded")
    try:
        vectors = await runner.encode(texts=texts)
    except OpenAIError:  # no runner of it answers: already the 503 to give
        raise
    except Exception as e:
        raise runner_unavailable(model.id, e) from e
    dims = len(vectors[0])
    if req.dimensions is not None and req.dimensions != dims:
        raise OpenAIError(400, f"dimensions: this model returns {dims}-dimensional vectors", param="dimensions",
                          code="invalid_value")

    def encode(v) -> list[float] | str:
        values = [float(x) for x in v]
        if req.encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        return values

    return EmbeddingList(model=req.model, usage=Usage(prompt_tokens=sum(lengths), total_tokens=sum(lengths)),
                         data=[EmbeddingData(index=i, embedding=encode(v)) for i, v in enumerate(vectors)])
