"""Fair sharing in the engine (``runners/engine/scheduler.py``), in-process: tenant A floods (64 streams
by default, eight times its equal share of a 16-slot batch), tenant B sends 4 streams; each stream sends
its next request as soon as the last ends (closed loop), ``--max-tokens`` greedy tokens a request; the
engine is stepped in this thread, requests arriving between steps. Runs B alone, A alone and A with B,
with fair sharing (the engine's default) and first come, first served (``LLMEngine(fair=False)``), each
on a fresh engine over one loaded model, and prints B's time to first token (p50, p99, and p99 in
engine steps, which no other load on the machine changes), the tokens/s of each tenant and of the box,
and the ratios: B's TTFT p99 under the flood against B alone, the box's tokens/s fair against first
come, first served, and A alone fair against A alone first come, first served. Timings only: it
asserts nothing.

    .venv/bin/python bench/fairness.py                     # SmolLM2-135M-Instruct from the store
    .venv/bin/python bench/fairness.py --seconds 20 --slots 16 --a-streams 64 --b-streams 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import PROMPTS, pct, prompt_ids  # noqa: E402


class Tenant:
    def __init__(self, name: str, streams: int):
        self.name, self.streams = name, streams
        self.ttft: list[float] = []  # seconds from arrival to the first token
        self.ttft_steps: list[int] = []  # engine steps, the same
        self.tokens = 0
        self.unanswered = 0  # requests still without a first token at the end


def run(engine, tenants: list[Tenant], prompts: list[list[int]], params, seconds: float, max_steps: int = 0) -> float:
    """Closed-loop streams on ``engine`` for ``seconds`` (or ``max_steps`` steps), driven in this thread (a
    request arrives between two steps, when its stream's last one ended); returns the seconds it ran."""
    from runners.engine import Sequence

    steps, arrived, sent = 0, {}, {}

    def send(tenant: Tenant, k: int) -> None:
        i = sent[tenant.name, k] = sent.get((tenant.name, k), -1) + 1
        seq = Sequence(f"{tenant.name}-{k}-{i}", prompts[(k + i) % len(prompts)], params, tenant=tenant.name)
        arrived[seq.request_id] = (time.perf_counter(), steps, tenant, k)
        engine.add(seq)

    for tenant in tenants:
        for k in range(tenant.streams):
            send(tenant, k)
    start = time.perf_counter()
    while steps < max_steps if max_steps else time.perf_counter() - start < seconds:
        results = engine.step()
        steps += 1
        now = time.perf_counter()
        for seq, _ in results:
            t0, step0, tenant, k = arrived[seq.request_id]
            tenant.tokens += 1
            if seq.num_output_tokens == 1:
                tenant.ttft.append(now - t0)
                tenant.ttft_steps.append(steps - step0)
            if seq.finish_reason is not None:
                send(tenant, k)
    elapsed = time.perf_counter() - start
    for seq in [*engine.scheduler.waiting, *engine.scheduler.running]:
        arrived[seq.request_id][2].unanswered += not seq.output_ids
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct:latest", help="BentoML store tag")
    parser.add_argument("--slots", type=int, default=16, help="max_num_seqs: sequences generated together")
    parser.add_argument("--a-streams", type=int, default=64)
    parser.add_argument("--b-streams", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    parser.add_argument("--steps", type=int, default=0, help="length of each run in engine steps instead (a busy machine)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="the engine's torch threads")
    args = parser.parse_args()

    import bentoml
    from transformers import AutoTokenizer

    from runners.engine import LLMEngine, ModelRunner, SamplingParams
    from runners.engine.loader import load_causal_lm

    path = bentoml.models.get(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [prompt_ids(tokenizer, p) for p in PROMPTS]
    model = load_causal_lm(path, dtype="bfloat16", forward="lean")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)  # no stop token: every answer is full length

    def engine(fair: bool):
        return LLMEngine(ModelRunner(model, kv_cache_memory=1 << 30), max_num_seqs=args.slots, max_model_len=2048, prefix_cache_tokens=2048,
                         threads=args.threads, fair=fair)

    run(engine(True), [Tenant("warm", args.slots)], prompts, params, 5.0, min(args.steps, 20))
    length = f"{args.steps} steps" if args.steps else f"{args.seconds:.0f} s"
    print(f"{args.model}, {args.slots} slots, {args.max_tokens} tokens a request, {length} a run, "
          f"{args.threads} threads; A: {args.a_streams} streams, B: {args.b_streams}\n")
    print(f"{'run':<22}{'B TTFT p50':>11}{'B TTFT p99':>11}{'(steps)':>8}{'B unanswered':>13}{'A tok/s':>9}"
          f"{'B tok/s':>9}{'total tok/s':>12}")
    results = {}
    for name, fair, streams in [("B alone", True, (0, args.b_streams)), ("A alone, fair", True, (args.a_streams, 0)),
                                ("A alone, FCFS", False, (args.a_streams, 0)),
                                ("A floods + B, fair", True, (args.a_streams, args.b_streams)),
                                ("A floods + B, FCFS", False, (args.a_streams, args.b_streams))]:
        a, b = Tenant("A", streams[0]), Tenant("B", streams[1])
        seconds = run(engine(fair), [t for t in (a, b) if t.streams], prompts, params, args.seconds, args.steps)
        results[name] = (a, b, seconds)
        p50, p99 = pct(b.ttft, 0.5), pct(b.ttft, 0.99)
        ms = lambda v: f"{v * 1000:.0f} ms" if v is not None else "-"  # noqa: E731
        steps = pct(b.ttft_steps, 0.99)
        print(f"{name:<22}{ms(p50):>11}{ms(p99):>11}{steps if steps is not None else '-':>8}"
              f"{b.unanswered if b.streams else '-':>13}"
              f"{a.tokens / seconds:>9.1f}{b.tokens / seconds:>9.1f}{(a.tokens + b.tokens) / seconds:>12.1f}", flush=True)

    def total(name: str) -> float:
        a, b, seconds = results[name]
        return (a.tokens + b.tokens) / seconds

    alone, flood = pct(results["B alone"][1].ttft, 0.99), pct(results["A floods + B, fair"][1].ttft, 0.99)
    print(f"\nB's TTFT p99 under the flood / alone: {flood / alone:.2f}x" if alone and flood else "")
    print(f"total tokens/s under the flood, fair / FCFS: {total('A floods + B, fair') / total('A floods + B, FCFS'):.3f}x")
    print(f"A alone, fair / FCFS: {total('A alone, fair') / total('A alone, FCFS'):.3f}x")


if __name__ == "__main__":
    main()
