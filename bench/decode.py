"""Decode steps in-process, on the 1.7B shape (``bench/shapes.py``) or any stored model: at batch 1, 8 and 16
after prompts of ``--context`` tokens, the engine step, the native forward pass within it, the matmuls alone
(the model's own packed linear layers, ``bench/prefill.py``'s ``linears``, on as many rows) and Python outside the native call (scheduler,
sampler, postprocess), each the median of its steps over ``--rounds`` rounds of every batch in turn; and the
weight-read floor at the read bandwidth that ``bench/bandwidth.c`` measures beside them (where built, see its
header). ``--cpu-time``: on one thread, in thread CPU time, which a busy shared machine disturbs less.

    .venv/bin/python bench/decode.py [--model smollm2-1.7b-random:latest] [--context 80] [--cpu-time]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefill import linears  # noqa: E402

BATCHES = (1, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-1.7b-random:latest")
    parser.add_argument("--context", type=int, default=80, help="prompt tokens before the decode steps")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per batch and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-time", action="store_true", help="one thread, thread CPU time")
    parser.add_argument("--bandwidth", default="/tmp/bandwidth", help="bench/bandwidth.c, built")
    a = parser.parse_args()

    import bentoml
    import torch

    from runners.engine import LLMEngine, ModelRunner, SamplingParams
    from runners.engine.loader import load_causal_lm
    from runners.engine.sequence import Sequence

    clock = time.thread_time if a.cpu_time else time.perf_counter
    if a.cpu_time:
        torch.set_num_threads(1)
    model = load_causal_lm(bentoml.models.get(a.model).path, dtype="bfloat16", forward="lean")
    if model.native is None:
        sys.exit("this model does not run on the native forward pass here")
    engine = LLMEngine(ModelRunner(model, kv_cache_memory=2 << 30), max_num_seqs=max(BATCHES),
                       max_model_len=a.context + a.steps + 8)
    weights = model.native[0]
    pairs = linears(model)
    forward_times = []
    forward_rows = model.forward_rows

    def timed(*args):
        started = clock()
        logits = forward_rows(*args)
        forward_times.append(clock() - started)
        return logits

    model.forward_rows = timed

    def matmuls(rows: int) -> float:  # every linear layer, the lm_head too, on `rows` rows
        xs = {k: torch.randn(rows, k).to(torch.bfloat16) for _, k in pairs}
        started = clock()
        for linear, k in pairs:
            linear(xs[k])
        return clock() - started

    draw = random.Random(0)

    def steps(batch: int) -> dict[str, list[float]]:
        seqs = [Sequence(f"{batch}-{draw.random()}", [draw.randrange(1000, model.vocab) for _ in range(a.context)],
                         SamplingParams(max_tokens=a.steps + 1, temperature=0)) for _ in range(batch)]
        for seq in seqs:
            engine.add(seq)
        while any(seq.num_output_tokens == 0 for seq in seqs):  # the prompts
            engine.step()
        forward_times.clear()
        step = []
        for _ in range(a.steps):
            started = clock()
            engine.step()
            step.append(clock() - started)
        while engine.has_work:
            engine.step()
        return {"step": step, "forward": list(forward_times), "python": [s - f for s, f in zip(step, forward_times)],
                "matmuls": [matmuls(batch) for _ in range(3)]}

    figures = {b: {} for b in BATCHES}
    for _ in range(a.rounds):
        for b in BATCHES:
            for name, values in steps(b).items():
                figures[b].setdefault(name, []).extend(values)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    try:
        out = subprocess.run([a.bandwidth], capture_output=True, text=True, check=True).stdout
        bandwidth = float(out.split(":")[1].split()[0])
        floor = f"{weight_bytes / bandwidth / 1e6:.1f} ms at {bandwidth:.1f} GB/s"
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        floor = f"no {a.bandwidth}"
    print(f"{a.model}, bfloat16, context {a.context}, {'1 thread, CPU time' if a.cpu_time else 'wall time'}; "
          f"load {open('/proc/loadavg').read().split()[0]}; weights {weight_bytes / 1e9:.2f} GB, read floor {floor}")
    for b, f in figures.items():
        print(f"batch {b:2d}: " + "  ".join(f"{name} {statistics.median(v) * 1e3:6.1f} ms" for name, v in f.items()))


if __name__ == "__main__":
    main()
