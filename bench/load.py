"""The benchmark's loads over HTTP: streaming chat requests from C clients, each sending its next
request when the last ends (closed loop). ``closed_loop`` is the short-prompt load; ``long_loads`` the
long-prompt ones (about 1,500 prompt tokens a request: distinct documents, or one long document shared
by every prompt with a different question after it, and one prompt at a time)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

PROMPTS = [
    "Write a short story about a cat who learns to sail.",
    "Explain how rainbows form, step by step.",
    "Describe a day in the life of a lighthouse keeper.",
    "What should I pack for a week of hiking in the mountains?",
    "Tell me about the history of the bicycle.",
    "Write a letter to a friend about your new garden.",
    "How do bees make honey? Explain in detail.",
    "Describe the city of Paris to someone who has never been there.",
]

Job = tuple[str, str]  # (model id, prompt)


@dataclass
class Run:
    tokens: int = 0  # output tokens, the streamed text re-tokenized
    prompt_tokens: int = 0  # the prompts with their chat template, as the tokenizer counts them
    requests: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.seconds if self.seconds else 0.0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def closed_loop(model: str | list[str], concurrency: int, requests: int) -> list[list[Job]]:
    """The short-prompt load: ``requests`` requests a client; with a list of ``model`` ids, client c asks
    for ``model[c % len(model)]``."""
    models = [model] if isinstance(model, str) else model
    return [[(models[c % len(models)], PROMPTS[(c + i) % len(PROMPTS)]) for i in range(requests)]
            for c in range(concurrency)]


async def drive_http(url: str, clients: list[list[Job]], tokenizer, max_tokens: int, extra: dict | None = None) -> Run:
    """Each client sends its jobs one after the other, all clients at once; each model is warmed up
    first with one short request (and an adapter loaded)."""
    import httpx

    run = Run()

    async def one(client: httpx.AsyncClient, model: str, prompt: str):
        try:
            await send(client, model, prompt)
        except httpx.RemoteProtocolError:  # a kept-alive connection the server had just closed: once more
            await send(client, model, prompt)

    async def send(client: httpx.AsyncClient, model: str, prompt: str):
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, **(extra or {})}
        start = last = time.perf_counter()
        text, first = "", None
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                detail = (await r.aread()).decode(errors="replace")[:300]
                raise RuntimeError(f"HTTP {r.status_code} from {model!r}: {detail}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or [{}]
                piece = (choices[0].get("delta") or {}).get("content")
                if not piece:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                    run.ttft.append(now - start)
                else:
                    run.itl.append(now - last)
                last = now
                text += piece
        run.tokens += len(tokenizer.encode(text, add_special_tokens=False))
        run.prompt_tokens += len(prompt_ids(tokenizer, prompt))
        run.requests += 1

    async def client_loop(client, jobs: list[Job]):
        for model, prompt in jobs:
            await one(client, model, prompt)

    limits = httpx.Limits(max_connections=len(clients) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        for m in dict.fromkeys(model for jobs in clients for model, _ in jobs):
            await one(client, m, "Hello")  # warm-up (and an adapter's first load)
        run.tokens, run.prompt_tokens, run.requests, run.ttft, run.itl = 0, 0, 0, [], []
        start = time.perf_counter()
        await asyncio.gather(*[client_loop(client, jobs) for jobs in clients])
        run.seconds = time.perf_counter() - start
    return run


# ---- long prompts ---------------------------------------------------------------------------------

WORDS = """time year people way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work government number night point home
water room mother area money story fact month lot right study book eye job word business issue side kind head
house service friend father power hour game line end member law car city community name president team minute
idea kid body information back parent face others level office door health person art war history party result
change morning reason research girl guy moment air teacher force education river mountain garden harbor engine
letter bridge market winter summer village island forest machine language music museum station library""".split()
VERBS = """is was makes takes finds gives tells becomes leaves feels brings begins keeps holds writes stands hears
lets means sets meets runs pays moves builds follows carries shows opens remembers considers describes""".split()
ADJECTIVES = """good new first last long great little own other old right big high different small large next early
young important few public bad same able quiet bright cold warm strange careful distant ancient narrow""".split()
QUESTIONS = ["What is the main subject of the document?", "Which places does the document mention?",
             "Summarize the second paragraph in one sentence.", "Who are the people in the document?",
             "What happens at the end of the document?", "List three facts from the document.",
             "What is the tone of the document?", "Which season is described in the document?"]


def _text(rng: random.Random, words: int) -> str:
    sentences, n = [], 0
    while n < words:
        k = rng.randint(8, 18)
        parts = [rng.choice(ADJECTIVES if i % 3 == 1 else VERBS if i % 3 == 2 else WORDS) for i in range(k)]
        sentences.append(" ".join(["The", *parts]) + ".")
        n += k + 1
    return " ".join(sentences)


def document(tokenizer, seed: int, tokens: int) -> str:
    """Text of ``tokens`` tokens (for this tokenizer), made of random English words drawn with ``seed``."""
    text = f"Document {seed}.\n" + _text(random.Random(seed), tokens)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.decode(ids[:tokens])


def long_loads(tokenizer, model: str, prompts: int, concurrency: int, tokens: int = 1500, shared: int = 1200,
               single: int = 3) -> dict[str, tuple[int, list[list[Job]]]]:
    """{load name: (concurrency, the clients' jobs)}: ``single`` prompts of ``tokens`` tokens one at a time;
    ``prompts`` distinct documents of ``tokens`` at ``concurrency``; and as many prompts that start with
    the same document of ``shared`` tokens, each going on with a passage and question of its own. Every
    document is new to the server (seeds of their own)."""
    def ask(doc: str, j: int) -> str:
        return f"{doc}\n\nQuestion {j}: {QUESTIONS[j % len(QUESTIONS)]}"

    def spread(texts: list[str], c: int) -> list[list[Job]]:
        return [[(model, t) for t in texts[k::c]] for k in range(min(c, len(texts)))]

    common = document(tokenizer, 10_000, shared)
    return {
        "long single": (1, spread([ask(document(tokenizer, 20_000 + j, tokens), j) for j in range(single)], 1)),
        "long distinct": (concurrency, spread([ask(document(tokenizer, 30_000 + j, tokens), j)
                                               for j in range(prompts)], concurrency)),
        "long shared-prefix": (concurrency, spread([ask(common + "\n\n" + document(tokenizer, 40_000 + j, tokens - shared), j)
                                                    for j in range(prompts)], concurrency)),
    }
