"""Long prompts in-process, on a model of a real shape with random weights (``bench/shapes.py``), no HTTP:

- ``single``: the time to the first token of one prompt of ``--tokens`` random tokens alone in an
  ``LLMEngine`` whose prefill budget a step is each ``--chunks`` size (best of ``--runs``), and the parts of
  that time: the linear layers alone (the model's own packed weights on random rows of each step's chunk),
  the logits (one row) and the rest of the native pass (attention, norms, rotation, the cache writes, Python);
- ``wave``: ``--wave`` prompts of ``--tokens / 3`` to ``--tokens`` tokens (in a shuffled order) added at
  once to an ``LLMEngine`` (per-step prefill budget ``--budget``), ``--max-tokens`` greedy tokens each,
  stepped to the end, under each ``--policies`` order of the waiting prompts: ``fcfs`` (the scheduler's,
  first come first served: one prompt's chunks until it is done), ``srpt`` (the fewest prompt tokens left
  first) and ``rr`` (round robin: the budget to the next prompt each step). Each prompt's TTFT in seconds
  and in engine steps from the start; p50 and p99 (here the last).

    .venv/bin/python bench/prefill.py --shape smollm2-1.7b --tokens 1536 --chunks 512 1536
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runners.engine import LLMEngine, ModelRunner, SamplingParams, Sequence  # noqa: E402


def prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(100, vocab - 100, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def chunks(n: int, budget: int) -> list[int]:
    """Each step's chunk of a prompt of ``n`` tokens alone, as the scheduler splits it."""
    from runners.engine.scheduler import Scheduler

    scheduler, seq = Scheduler(1, n + 2, budget), Sequence("split", [0] * n, SamplingParams(max_tokens=1))
    scheduler.add(seq)
    split = []
    while seq.num_cached < n:
        (_, tokens), = scheduler.schedule()[0]
        split.append(tokens)
        seq.num_cached += tokens
    return split


def first_token_seconds(runner: ModelRunner, ids: list[int], budget: int) -> tuple[float, float]:
    """One prompt alone in an engine whose prefill budget a step is ``budget``: the time to its first token,
    and the CPU time the process spent on it (on a shared machine the steadier figure)."""
    engine = LLMEngine(runner, max_num_seqs=1, max_model_len=len(ids) + 2, max_prefill_tokens=budget, fair=False)
    start, cpu = time.perf_counter(), time.process_time()
    engine.generate(ids, SamplingParams(max_tokens=1, temperature=0))
    return time.perf_counter() - start, time.process_time() - cpu


def linears(model) -> list[tuple]:
    """Each linear layer of the native forward pass, in its order (the last: the lm_head), with its inner size."""
    c = model.config
    inners = [c.hidden_size, model.heads * model.head_dim, c.hidden_size, c.intermediate_size] * len(model.layers)
    return list(zip(model._matmuls(), [*inners, c.hidden_size]))


def matmul_seconds(model, sizes: list[int], logits: bool) -> float:
    """The linear layers of every layer on random rows of each chunk's size (``logits``: the lm_head's on one
    row)."""
    pairs = linears(model)[-1:] if logits else linears(model)[:-1]
    xs = {(rows, inner): torch.randn(rows, inner).to(model.norm.dtype)
          for rows in {1 if logits else r for r in sizes} for _, inner in pairs}
    start = time.perf_counter()
    for rows in sizes[-1:] if logits else sizes:
        for linear, inner in pairs:
            linear(xs[1 if logits else rows, inner])
    return time.perf_counter() - start


def single(model, runner: ModelRunner, a) -> None:
    ids = prompt(model.vocab, a.tokens, 0)
    first_token_seconds(runner, ids[:64], 64)  # (warm)
    print(f"single prompt of {a.tokens} tokens (best of {a.runs}):")
    for size in a.chunks:
        total, cpu = min(first_token_seconds(runner, ids, size) for _ in range(a.runs))
        parts = chunks(a.tokens, size)
        with torch.inference_mode():
            linear = min(matmul_seconds(model, parts, False) for _ in range(a.runs))
            logits = min(matmul_seconds(model, parts, True) for _ in range(a.runs))
        flops = linear_flops(model) * a.tokens
        print(f"  budget {size:5d} ({len(parts)} passes): {total:6.2f} s (CPU {cpu:5.2f} s), {a.tokens / total:5.0f} "
              f"prompt tok/s | linear "
              f"{linear:5.2f} s ({flops / linear / 1e12:.2f} TFLOP/s), logits {logits:5.2f} s, rest "
              f"{total - linear - logits:5.2f} s", flush=True)


def linear_flops(model) -> int:
    """Multiply-adds times two of the linear layers for one token (the logits left out)."""
    c, q = model.config, model.heads * model.head_dim
    qkv = q + 2 * model.kv_heads * model.head_dim
    return 2 * len(model.layers) * (c.hidden_size * qkv + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)


def wave(model, runner: ModelRunner, a, policy: str) -> tuple[list[float], list[int], float, float]:
    """(TTFT seconds, TTFT steps) per prompt in arrival order, and the seconds (and CPU seconds) until all
    are done."""
    n = a.wave
    low = a.tokens // 3
    lengths = [low + (a.tokens - low) * i // max(1, n - 1) for i in range(n)]
    lengths = [lengths[(5 * i + 3) % n] for i in range(n)] if math.gcd(5, n) == 1 else lengths
    engine = LLMEngine(runner, max_num_seqs=n, max_model_len=a.tokens + a.max_tokens + 1,
                       max_prefill_tokens=a.budget, fair=False)
    scheduler = engine.scheduler
    if policy == "srpt":  # (a stable sort: arrival order between equals)
        scheduler._turns = lambda: iter(sorted(scheduler.waiting, key=lambda s: s.num_tokens - s.num_cached))
    elif policy == "rr":
        def turns():
            scheduler.waiting.rotate(-1)
            return iter(list(scheduler.waiting))
        scheduler._turns = turns
    seqs = [Sequence(f"w{i}", prompt(model.vocab, length, 100 + i), SamplingParams(max_tokens=a.max_tokens, temperature=0))
            for i, length in enumerate(lengths)]
    for seq in seqs:
        engine.add(seq)
    first: dict[str, tuple[float, int]] = {}
    steps, start, cpu = 0, time.perf_counter(), time.process_time()
    while engine.has_work:
        done = engine.step()
        steps += 1
        now = time.perf_counter() - start
        for seq, _ in done:
            first.setdefault(seq.request_id, (now, steps))
    return [first[s.request_id][0] for s in seqs], [first[s.request_id][1] for s in seqs], now, time.process_time() - cpu


def p99(values: list) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-1.7b", help="a shape of bench/shapes.py, built there first")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=1536)
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1536])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--wave", type=int, default=8, help="prompts of the wave (0: none)")
    parser.add_argument("--budget", type=int, default=512, help="the wave's prefill tokens a step")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--policies", nargs="+", default=["fcfs", "srpt", "rr"], choices=["fcfs", "srpt", "rr"])
    parser.add_argument("--skip-single", action="store_true")
    a = parser.parse_args()

    import bentoml

    from bench.shapes import store_name
    from runners.engine.loader import load_causal_lm

    path = bentoml.models.get(f"{store_name(a.shape)}:latest").path
    model = load_causal_lm(path, dtype=a.dtype, forward="lean")
    runner = ModelRunner(model)
    if runner.pool is None:
        raise SystemExit("the native forward pass does not run here: nothing to measure")
    print(f"{a.shape} ({a.dtype}), torch threads {torch.get_num_threads()}", flush=True)
    passes, forward_rows = [], model.forward_rows
    model.forward_rows = lambda *args: passes.append(len(args[0])) or forward_rows(*args)  # (counted)
    if not a.skip_single:
        single(model, runner, a)
    for policy in a.policies if a.wave else []:
        passes.clear()
        seconds, steps, total, cpu = wave(model, runner, a, policy)
        print(f"wave of {a.wave} ({a.tokens // 3}-{a.tokens} tokens, budget {a.budget}), {policy:4s}: TTFT p50 "
              f"{statistics.median(seconds):6.2f} s p99 {p99(seconds):6.2f} s | steps p50 {statistics.median(steps):5.1f} "
              f"p99 {p99(steps):3d} | all done {total:6.2f} s (CPU {cpu:6.2f} s), {len(passes)} forward passes", flush=True)


if __name__ == "__main__":
    main()
