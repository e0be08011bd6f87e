"""The ``/v1`` routes. The gateway puts its model registry on ``app.state.registry``."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.routing import Match

from openai_api import errors
from openai_api.errors import OpenAIError, runner_unavailable
from openai_api.generation import generate_text, merge, started, unless_disconnected
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
    ErrorResponse,
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

# The published schema: errors in OpenAI's shape. ("default" also keeps FastAPI from adding a 422
# response, which this server never sends: invalid requests are 400.)
app = FastAPI(title="BentoChat OpenAI-compatible API", responses={
    400: {"model": ErrorResponse, "description": "Invalid request: `error.param` names the field"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    429: {"model": ErrorResponse, "description": "The model's queue is full; see `Retry-After`"},
    503: {"model": ErrorResponse, "description": "No runner of the model answers"},
    "default": {"model": ErrorResponse, "description": "Any other error, in the same shape"},
})
errors.install(app)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx must not buffer a stream


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
        cap = model.served.max_tokens_default or d.get("max_new_tokens") or default_max or ctx
        max_tokens = min(cap, ctx - prompt_len)
    vocab = len(model.tokenizer)
    if any(not 0 <= t < vocab for t in req.stop_token_ids or ()):
        raise OpenAIError(400, f"stop_token_ids: token ids must be in [0, {vocab})", param="stop_token_ids",
                          code="invalid_value")

    def pick(name, fallback):
        value = getattr(req, name)
        return value if value is not None else d.get(name, fallback)

    return {
        "max_tokens": max_tokens,
        "temperature": pick("temperature", 1.0),
        "top_p": pick("top_p", 1.0),
        "top_k": min(max(pick("top_k", 0), 0), vocab),
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

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


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


def _card(m) -> ModelCard:
    return ModelCard(id=m.id, created=m.created, kind=m.kind, context_length=m.context_length, root=m.tag,
                     template=m.chat_format.name if m.chat_format else None,
                     template_source=m.chat_format.source if m.chat_format else None,
                     generation_defaults=m.defaults)


@app.get("/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(m) for m in request.app.state.registry.models()])


@app.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    return _card(request.app.state.registry.info(model_id))


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
    # Rendering and tokenizing take CPU time that grows with the prompt: never on the event loop.
    prompt_ids, params, stops = await asyncio.to_thread(prepare_chat, model, req)
    choices = _run_choices(model, runner, [prompt_ids], params, stops, req.n)
    rid = new_id("chatcmpl")

    def logprobs(entries):
        return chat_logprobs(model.tokenizer, entries) if req.logprobs else None

    if req.stream:
        choices = await unless_disconnected(request, started(choices))

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

    texts, reasons, counts, entries = await unless_disconnected(request, _collect(choices, req.n))
    return ChatCompletion(id=rid, model=req.model, usage=Usage.of(len(prompt_ids), sum(counts)), choices=[
        ChatChoice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=reasons[i],
                   logprobs=logprobs(entries[i]))
        for i in range(req.n)
    ])


def _encode_prompts(model, req: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt. An empty text prompt is the beginning-of-sequence token alone, as
    OpenAI's models take it, when the tokenizer has one."""
    prompts = []
    for i, p in enumerate(req.prompts):
        ids = p if isinstance(p, list) else model.encode(p)
        if not ids and model.tokenizer.bos_token_id is not None:
            ids = [model.tokenizer.bos_token_id]
        if not ids:
            param = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
            raise OpenAIError(400, f"{param}: is empty, and this model has no beginning-of-sequence token to start "
                                   "from; send some text", param=param, code="invalid_value")
        prompts.append(ids)
    vocab = len(model.tokenizer)
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise OpenAIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
    return prompts


@app.post("/completions")
async def completions(req: CompletionRequest, request: Request):
    model, runner = request.app.state.registry.get(req.model, "chat")
    prompts = await asyncio.to_thread(_encode_prompts, model, req)
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
        choices = await unless_disconnected(request, started(choices))

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

    texts, reasons, counts, entries = await unless_disconnected(request, _collect(choices, total))
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
    prompt = req.messages if req.messages is not None else req.prompt
    ids = await asyncio.to_thread(_count, model, prompt, req.add_special_tokens)
    return Tokenized(model=model.id, tokens=ids, count=len(ids), max_model_len=model.context_length,
                     template=model.chat_format.name if req.messages is not None else None)


@app.post("/token_check")
async def token_check(req: TokenCheckRequest, request: Request) -> TokenCheckResults:
    """Extension, FastChat's /api/v1/token_check: does each prompt plus its max_tokens fit the context?"""
    results = []
    for item in req.prompts:
        model = request.app.state.registry.info(item.model)
        count = len(await asyncio.to_thread(_count, model, item.prompt))
        results.append(TokenCheckResult(fits=count + item.max_tokens <= model.context_length, tokenCount=count,
                                        contextLength=model.context_length))
    return TokenCheckResults(prompts=results)


def _input_lengths(model, texts: list[str]) -> list[int]:
    lengths = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
    for i, n in enumerate(lengths):
        if n > model.context_length:
            raise OpenAIError(400, f"input[{i}] has {n} tokens; this model's maximum is {model.context_length}.",
                              param="input", code="context_length_exceeded")
    return lengths


@app.post("/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request) -> EmbeddingList:
    model, runner = request.app.state.registry.get(req.model, "embedding")
    texts: list[str] = req.input
    lengths = await asyncio.to_thread(_input_lengths, model, texts)
    try:
        vectors = await unless_disconnected(request, runner.encode(texts))
    except OpenAIError:  # no runner of it answers, or its queue is full: already the error to give
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


@app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
               include_in_schema=False, name="unknown_route")
async def unknown_route(path: str, request: Request):
    """Anything else under /v1: OpenAI's error shape, 405 with ``Allow`` for a known path."""
    scope = {"type": "http", "path": "/" + path, "method": request.method, "root_path": ""}
    allowed = sorted({m for r in app.routes if r.name != "unknown_route" and r.matches(scope)[0] is Match.PARTIAL
                      for m in getattr(r, "methods", ())})
    if allowed:
        raise OpenAIError(405, f"Method {request.method} is not allowed on /v1/{path}; use {', '.join(allowed)}.",
                          code="method_not_allowed", headers={"Allow": ", ".join(allowed)})
    raise OpenAIError(404, f"Unknown route /v1/{path}. See GET /v1/openapi.json for this server's routes.",
                      code="unknown_route")
