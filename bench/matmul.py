"""The lean forward's linear layers of one decode step (SmolLM2-135M's shapes: 30 layers of q/k/v, o,
gate/up and down, then the lm_head; every layer with weights of its own, read from memory as in the
model), timed on oneDNN's packed kernels and on BentoChat's own (bfloat16 on AMX, float32 on AVX-512),
at several batch sizes and torch thread counts. Prints a table (median of 7 runs, ms).

    .venv/bin/python bench/matmul.py [--dtype bfloat16 float32] [--rows 1 16 32 64] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runners.engine import native  # noqa: E402
from runners.engine.linear import Linear  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in): qkv, o, gate_up, down
LAYERS, VOCAB, HIDDEN = 30, 49152, 576
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def step_ms(linears: list[Linear], rows: int, dtype: torch.dtype) -> float:
    xs = {inner: torch.randn(rows, inner).to(dtype) for inner in (HIDDEN, 1536)}
    inners = [inner for _, inner in SHAPES] * LAYERS + [HIDDEN]

    def step():
        for linear, inner in zip(linears, inners):
            linear(xs[inner])

    step()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    shapes = SHAPES * LAYERS + [(VOCAB, HIDDEN)]
    print(f"{'dtype':>9}{'threads':>8}{'rows':>6}{'oneDNN ms':>11}{'own ms':>9}{'oneDNN/own':>12}")
    for name in args.dtype:
        dtype = DTYPES[name]
        if not native.runs(dtype):
            print(f"{name:>9}: BentoChat's own matmul does not run here (see the log above)")
            continue
        weights = [(torch.randn(out, inner, generator=generator) * 0.05).to(dtype) for out, inner in shapes]
        kernels = {own: [Linear(w, own=own) for w in weights] for own in (False, True)}
        with torch.inference_mode():
            for threads in args.threads:
                torch.set_num_threads(threads)
                for rows in args.rows:
                    onednn, ours = (step_ms(kernels[own], rows, dtype) for own in (False, True))
                    print(f"{name:>9}{threads:>8}{rows:>6}{onednn:>11.1f}{ours:>9.1f}{onednn / ours:>12.2f}")


if __name__ == "__main__":
    main()
