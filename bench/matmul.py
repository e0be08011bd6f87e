"""The lean forward's linear layers of one decode step (SmolLM2-135M's shapes: 30 layers of q/k/v,
o, gate/up and down, then the lm_head), timed on oneDNN's packed bfloat16 kernels and on BentoChat's
AMX matmul, at several batch sizes and torch thread counts. Prints a table (median of 7 runs, ms).

    .venv/bin/python bench/matmul.py [--rows 1 16 32 64] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runners.engine import amx  # noqa: E402
from runners.engine.lean import Linear  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in): qkv, o, gate_up, down
LAYERS, VOCAB, HIDDEN = 30, 49152, 576


def step_ms(layers: list[Linear], head: Linear, rows: int) -> float:
    xs = {inner: torch.randn(rows, inner).bfloat16() for _, inner in SHAPES}

    def step():
        for _ in range(LAYERS):
            for linear, (_, inner) in zip(layers, SHAPES):
                linear(xs[inner])
        head(xs[HIDDEN])

    step()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if amx.ops() is None:
        sys.exit("no AMX matmul on this machine (see the log above): nothing to compare")
    generator = torch.Generator().manual_seed(0)
    weights = [(torch.randn(out, inner, generator=generator) * 0.05).bfloat16() for out, inner in SHAPES]
    head = (torch.randn(VOCAB, HIDDEN, generator=generator) * 0.05).bfloat16()
    kernels = {name: ([Linear(w, amx=on) for w in weights], Linear(head, amx=on))
               for name, on in (("oneDNN", False), ("AMX", True))}
    print(f"{'threads':>7}{'rows':>6}{'oneDNN ms':>11}{'AMX ms':>9}{'oneDNN/AMX':>12}")
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for rows in args.rows:
                onednn, ours = (step_ms(*kernels[name], rows) for name in ("oneDNN", "AMX"))
                print(f"{threads:>7}{rows:>6}{onednn:>11.1f}{ours:>9.1f}{onednn / ours:>12.2f}")


if __name__ == "__main__":
    main()
