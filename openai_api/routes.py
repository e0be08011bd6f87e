"""The ``/v1`` routes, a route table: each handler validates (``protocol``), asks the model registry
(``app.state.registry``, set by the gateway) for the model, and answers in OpenAI's shapes
(``objects``). The chat path is ``chat.py``'s, the text of each choice ``text_stream.py``'s."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.routing import Match

from controller import AdapterModel, Registry
from models.info import ModelInfo
from openai_api import errors, responses
from openai_api.chat import chat_messages, start_chat
from openai_api.errors import (
    ErrorResponse,
    OpenAIError,
    context_length_exceeded,
    invalid_value,
    model_not_supported,
)
from openai_api.extensions import (
    LoadLoRAAdapterRequest,
    LoRAAdapterStatus,
    TokenCheckRequest,
    TokenCheckResult,
    TokenCheckResults,
    Tokenized,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from openai_api.ids import ACCOUNT, API_KEY, TENANT, allowed, new_id
from openai_api.tenancy import require_admin, usage
from openai_api.logprobs import chat_logprobs, completion_logprobs
from openai_api.objects import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    Delta,
    EmbeddingData,
    EmbeddingList,
    FunctionCallOut,
    FunctionDelta,
    ModelCard,
    ModelList,
    ToolCallDelta,
    ToolCallOut,
    Usage,
)
from openai_api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest
from openai_api.responses import ResponsesRequest, ResponseStore, to_chat_request
from openai_api.streams import sse, started, unless_disconnected
from openai_api.text_stream import collect, prompt_cached, run_choices
from openai_api.tool_calls import AnswerParser

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
logger = logging.getLogger("bentochat.api")
# What the routes that stream answer with `"stream": true`: Server-Sent Events.
STREAMS = {200: {"description": "The answer; with `stream: true`, Server-Sent Events",
                 "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}}}


def _card(m: ModelInfo, adapter: AdapterModel | None = None) -> ModelCard:
    """A model's card, or that of a LoRA ``adapter`` on it (``parent`` the model, ``root`` the adapter's source)."""
    card = ModelCard(id=m.id, created=m.created, kind=m.kind, context_length=m.context_length, root=m.tag,
                     template=m.chat_format.name if m.chat_format else None,
                     template_source=m.chat_format.source if m.chat_format else None,
                     generation_defaults=m.defaults)
    if adapter is not None:
        card.id, card.parent, card.root = adapter.name, m.id, str(adapter.description.get("source") or "")
    return card


def _registry(request: Request) -> Registry:
    return request.app.state.registry


@app.get("/models")
async def list_models(request: Request) -> ModelList:
    """The models served, those the key's tenant may use."""
    registry = _registry(request)
    cards = [_card(m) for m in registry.models()] + [_card(a.info, a) for a in registry.adapters()]
    return ModelList(data=[c for c in cards if allowed(c.id, c.parent or c.id)])


@app.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    model = _registry(request).get(model_id)
    return _card(model.info, model if model.id != model.info.id else None)


def _runtime_lora(request: Request) -> None:
    """vLLM serves these routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING; BentoChat with lora.runtime_loading."""
    if not getattr(request.app.state, "runtime_lora", False):
        raise OpenAIError(403, "Loading and unloading LoRA adapters at run time is off on this server "
                               "(lora.runtime_loading in bentochat.yaml).", code="runtime_lora_off")


@app.post("/load_lora_adapter")
async def load_lora_adapter(req: LoadLoRAAdapterRequest, request: Request) -> LoRAAdapterStatus:
    """vLLM's: serve a LoRA adapter from now on, as model ``lora_name`` (until the runner restarts)."""
    require_admin("Loading LoRA adapters")
    _runtime_lora(request)
    registry = _registry(request)
    if registry.serves(req.lora_name):
        raise invalid_value("lora_name", f"`{req.lora_name}` is served already; unload it first or pick another name")
    base = registry.adapter_base(req.model)
    adapter = await base.load_adapter(req.lora_name, req.lora_path)
    logger.info("adapter %s loaded on %s from %s", req.lora_name, base.id, req.lora_path)
    return LoRAAdapterStatus(id=req.lora_name, parent=base.id, status="loaded", rank=adapter.get("rank"),
                             source=adapter.get("source"))


@app.post("/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadLoRAAdapterRequest, request: Request) -> LoRAAdapterStatus:
    """vLLM's: stop serving a LoRA adapter; requests already running on it finish first."""
    require_admin("Unloading LoRA adapters")
    _runtime_lora(request)
    adapter = _registry(request).adapter(req.lora_name)
    if adapter is None:
        raise OpenAIError(404, f"No LoRA adapter `{req.lora_name}` is loaded.", param="lora_name",
                                 code="adapter_not_found")
    await adapter.base.unload_adapter(adapter.name)
    logger.info("adapter %s unloaded from %s", adapter.name, adapter.base.id)
    return LoRAAdapterStatus(id=adapter.name, parent=adapter.base.id, status="unloaded")


@app.get("/stats")
async def runner_stats(request: Request) -> dict:
    """Extension: each model's runner state (a chat engine's running and waiting sequences and tokens
    generated), summed over its ready replicas and per replica."""
    require_admin("/v1/stats")
    return {"object": "list", "data": await _registry(request).stats()}


def _tool_call_deltas(d) -> list[ToolCallDelta]:
    """As OpenAI streams a call: its index, id, type and name first, then fragments of its arguments."""
    return [ToolCallDelta(index=c.index, id=c.id, type="function" if c.id else None,
                          function=FunctionDelta(name=c.name, arguments=c.arguments)) for c in d.calls]


def _message(p: AnswerParser) -> AssistantMessage:
    calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in p.calls]
    return AssistantMessage(content=p.content if p.content or not calls else None, tool_calls=calls or None,
                            reasoning_content=p.reasoning_text or None)


def _sse(events):
    """Chat and text completion chunks as OpenAI streams them, ``[DONE]`` last."""
    return sse(events, lambda chunk: f"data: {chunk.model_dump_json()}\n\n",
               lambda e: f"data: {e.body().model_dump_json()}\n\n", "data: [DONE]\n\n")


@app.post("/chat/completions", responses=STREAMS)
async def chat_completions(req: ChatCompletionRequest, request: Request):
    run = await start_chat(_registry(request), req, request)
    rid = new_id("chatcmpl-")

    def logprobs(entries):
        return chat_logprobs(run.info.tokenizer, entries) if req.logprobs else None

    if req.stream:
        def chunk(i, delta=None, finish_reason=None, entries=()):
            return ChatCompletionChunk(id=rid, model=req.model, choices=[ChatChunkChoice(
                index=i, delta=delta or Delta(), finish_reason=finish_reason, logprobs=logprobs(entries))])

        async def chunks():
            counts, cached = [0] * req.n, [0] * req.n
            for i in range(req.n):
                yield chunk(i, Delta(role="assistant", content=""))
            async for i, ev, d in run.deltas():
                counts[i], cached[i] = ev.completion_tokens, ev.cached_tokens
                if d.reasoning or d.content or ev.logprobs:
                    yield chunk(i, Delta(content=d.content or None, reasoning_content=d.reasoning or None),
                                entries=ev.logprobs)
                for call in _tool_call_deltas(d):  # one per chunk, as OpenAI streams them
                    yield chunk(i, Delta(tool_calls=[call]))
                if ev.finish_reason:
                    yield chunk(i, finish_reason=run.parsers[i].finish_reason(ev.finish_reason))
            if req.include_usage:
                usage = Usage.of(len(run.prompt_ids), sum(counts), prompt_cached(cached, req.n))
                yield ChatCompletionChunk(id=rid, model=req.model, choices=[], usage=usage)
        return _sse(chunks())

    answers = await unless_disconnected(request, run.collect())
    usage = Usage.of(len(run.prompt_ids), sum(a.completion_tokens for a in answers),
                     prompt_cached([a.cached_tokens for a in answers], req.n))
    return ChatCompletion(id=rid, model=req.model, usage=usage, choices=[
        ChatChoice(index=i, message=_message(p), finish_reason=a.finish_reason, logprobs=logprobs(a.logprobs))
        for i, (a, p) in enumerate(zip(answers, run.parsers))
    ])


def _encode_prompts(info: ModelInfo, req: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt. An empty text prompt is the beginning-of-sequence token alone, as
    OpenAI's models take it, when the tokenizer has one."""
    prompts = []
    for i, p in enumerate(req.prompts):
        ids = p if isinstance(p, list) else info.encode(p)
        if not ids and info.tokenizer.bos_token_id is not None:
            ids = [info.tokenizer.bos_token_id]
        if not ids:
            raise invalid_value("prompt" if len(req.prompts) == 1 else f"prompt[{i}]",
                                "is empty, and this model has no beginning-of-sequence token to start from; send "
                                "some text")
        prompts.append(ids)
    if any(not 0 <= t < info.vocab_size for p in prompts for t in p):
        raise invalid_value("prompt", f"token ids must be in [0, {info.vocab_size})")
    return prompts


@app.post("/completions", responses=STREAMS)
async def completions(req: CompletionRequest, request: Request):
    model = _registry(request).get(req.model, "chat")
    info = model.info
    prompts = await asyncio.to_thread(_encode_prompts, info, req)
    # max_tokens may be clamped per prompt; the tightest applies to all, as one request.
    params = min((req.to_sampling_params(info, len(p)) for p in prompts), key=lambda p: p.max_tokens)
    choices = run_choices(model, prompts, params, req.n)
    rid = new_id("cmpl-")
    prompt_tokens = sum(len(p) for p in prompts)

    total = len(prompts) * req.n

    def logprobs(entries, offset=0):
        return completion_logprobs(info.tokenizer, entries, offset) if req.logprobs is not None else None

    if req.stream:
        choices = await unless_disconnected(request, started(choices))

        async def chunks():
            counts, offsets, cached = [0] * total, [0] * total, [0] * total
            async for i, ev in choices:
                counts[i], cached[i] = ev.completion_tokens, ev.cached_tokens
                if ev.text or ev.finish_reason:
                    lp = logprobs(ev.logprobs, offsets[i])
                    if lp and lp.tokens:
                        offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
                    yield Completion(id=rid, model=req.model, choices=[CompletionChoice(
                        index=i, text=ev.text, finish_reason=ev.finish_reason, logprobs=lp)])
            if req.include_usage:
                yield Completion(id=rid, model=req.model, choices=[],
                                 usage=Usage.of(prompt_tokens, sum(counts), prompt_cached(cached, req.n)))
        return _sse(chunks())

    answers = await unless_disconnected(request, collect(choices, total))
    usage = Usage.of(prompt_tokens, sum(a.completion_tokens for a in answers),
                     prompt_cached([a.cached_tokens for a in answers], req.n))
    return Completion(id=rid, model=req.model, usage=usage, choices=[
        CompletionChoice(index=i, text=a.text, finish_reason=a.finish_reason, logprobs=logprobs(a.logprobs))
        for i, a in enumerate(answers)
    ])


def _count(info: ModelInfo, prompt: str | list[ChatMessage], add_special_tokens: bool = True) -> list[int]:
    if isinstance(prompt, str):
        return info.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    if info.chat_format is None:
        raise model_not_supported(info.id, info.kind, "has no chat template; send `prompt` text", param="messages")
    return info.render_chat(chat_messages(prompt))


@app.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> Tokenized:
    """Extension: the token ids of a prompt, or of a message list rendered with the model's chat
    template exactly as /chat/completions renders it."""
    info = _registry(request).get(req.model).info
    prompt = req.messages if req.messages is not None else req.prompt
    ids = await asyncio.to_thread(_count, info, prompt, req.add_special_tokens)
    return Tokenized(model=info.id, tokens=ids, count=len(ids), max_model_len=info.context_length,
                     template=info.chat_format.name if req.messages is not None else None)


@app.post("/token_check")
async def token_check(req: TokenCheckRequest, request: Request) -> TokenCheckResults:
    """Extension, FastChat's /api/v1/token_check: does each prompt plus its max_tokens fit the context?"""
    results = []
    for item in req.prompts:
        info = _registry(request).get(item.model).info
        count = len(await asyncio.to_thread(_count, info, item.prompt))
        results.append(TokenCheckResult(fits=count + item.max_tokens <= info.context_length, tokenCount=count,
                                        contextLength=info.context_length))
    return TokenCheckResults(prompts=results)


def _input_lengths(info: ModelInfo, texts: list[str]) -> list[int]:
    lengths = [len(ids) for ids in info.tokenizer(texts)["input_ids"]]
    for i, n in enumerate(lengths):
        if n > info.context_length:
            raise context_length_exceeded(info.context_length, n, f"input[{i}]")
    return lengths


@app.post("/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request) -> EmbeddingList:
    model = _registry(request).get(req.model, "embedding")
    texts: list[str] = req.input
    lengths = await asyncio.to_thread(_input_lengths, model.info, texts)
    if (account := ACCOUNT.get()) is not None:  # a tenant's request: within its quotas, its tokens counted
        account.admit(model.id, model.info.id, sum(lengths), 0)
    vectors = await unless_disconnected(request, model.encode(texts))
    dims = len(vectors[0])
    if req.dimensions is not None and req.dimensions != dims:
        raise invalid_value("dimensions", f"this model returns {dims}-dimensional vectors")

    def encode(v) -> list[float] | str:
        values = [float(x) for x in v]
        if req.encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        return values

    return EmbeddingList(model=req.model, usage=Usage(prompt_tokens=sum(lengths), total_tokens=sum(lengths)),
                         data=[EmbeddingData(index=i, embedding=encode(v)) for i, v in enumerate(vectors)])


def _response_event(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


def _response_error(e: OpenAIError) -> str:
    return _response_event({"type": "error", "code": e.code, "message": e.message, "param": e.param})


def _store(request: Request) -> tuple[ResponseStore, tuple[str | None, str | None]]:
    """The store of responses, and whose a response of this request is there: (tenant, API key)."""
    store = getattr(request.app.state, "responses", None)
    if store is None:
        store = request.app.state.responses = ResponseStore()
    return store, ((TENANT.get() or (None,))[0], request.scope.get(API_KEY))


@app.post("/responses", responses=STREAMS)
async def create_response(req: ResponsesRequest, request: Request):
    """OpenAI's Responses API, run as a chat completion (``openai_api.responses``)."""
    store, owner = _store(request)
    history = store.get(req.previous_response_id, owner)[1] if req.previous_response_id is not None else []
    chat, conversation = to_chat_request(req, history)
    run = await start_chat(_registry(request), chat, request)
    rid = new_id("resp_")

    def finish(response: dict, turn: list[dict]) -> None:
        if req.store:
            store.put(response, conversation + turn, owner)

    if req.stream:
        return sse(responses.events(req, rid, run, finish), _response_event, _response_error)

    created = time.time()
    answer = (await unless_disconnected(request, run.collect()))[0]
    items, turn = responses.output_items(run.parsers[0], cut=answer.finish_reason == "length")
    response = responses.response_object(req, rid, created, "completed", items,
                                         responses.usage_of(len(run.prompt_ids), answer.completion_tokens,
                                                            answer.cached_tokens),
                                         answer.finish_reason)
    finish(response, turn)
    return JSONResponse(response)


@app.get("/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request):
    store, owner = _store(request)
    return JSONResponse(store.get(response_id, owner)[0])


app.get("/usage")(usage)  # extension: GET /v1/usage (openai_api/tenancy.py), before the catch-all


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
