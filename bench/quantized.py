"""A bfloat16 model's int8 or 4-bit weights on each kernel that runs them here, in-process, alternated in one
process: decode tokens/s at concurrency 1 and 8 (greedy, 32 tokens a request after a 16-token prompt) and the
prompt tokens/s of a 512-token prefill. The kernels: ``quantized-x`` (the rows quantized per 32 too: on AMX's
tiles where the CPU has AMX, else with AVX-512 VNNI) and ``avx512`` (int8 weights times the rows as they are;
4 bits run in int8 there). ``BENTOCHAT_CPU_FLAGS`` runs the machine as a CPU without AMX would:

    .venv/bin/python bench/quantized.py --shape smollm2-1.7b --quantization int8
    BENTOCHAT_CPU_FLAGS="$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 | sed 's/amx_[a-z0-9]*//g')" \\
        .venv/bin/python bench/quantized.py --shape smollm2-1.7b     # AMX masked off: AVX-512 VNNI
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KERNELS = ("quantized-x", "avx512")


def load(path: str, quantization: str, kernel: str):
    """An engine on the model at ``path`` whose quantized weights are packed for ``kernel``."""
    from contextlib import nullcontext
    from unittest import mock

    from runners.engine import LLMEngine, ModelRunner, native
    from runners.engine.loader import load_causal_lm

    with mock.patch.object(native, "vnni", lambda: False) if kernel == "avx512" else nullcontext():
        model = load_causal_lm(path, dtype="bfloat16", forward="lean", quantization=quantization)
    return LLMEngine(ModelRunner(model, kv_cache_memory=1 << 30), max_num_seqs=8, max_model_len=640)


def measure(engine, vocab: int) -> dict[str, float]:
    from runners.engine import SamplingParams

    draw = random.Random(0)
    prompt = lambda n: [draw.randrange(1000, vocab) for _ in range(n)]  # noqa: E731 (no prefix to share)
    figures = {}
    for concurrency in (1, 8):
        started = time.perf_counter()
        outputs = engine.generate_batch([prompt(16) for _ in range(concurrency)],
                                        [SamplingParams(max_tokens=32, temperature=0)] * concurrency)
        figures[f"c={concurrency} tok/s"] = sum(map(len, outputs)) / (time.perf_counter() - started)
    started = time.perf_counter()
    engine.generate(prompt(512), SamplingParams(max_tokens=1, temperature=0))
    figures["prefill 512 tok/s"] = 512 / (time.perf_counter() - started)
    return figures


def main() -> None:
    import bentoml

    from runners.engine import SamplingParams, native

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="smollm2-1.7b", help="bench/shapes.py's shape, random weights")
    parser.add_argument("--quantization", choices=("int8", "int4"), default="int8")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    tag = subprocess.run([sys.executable, str(ROOT / "bench" / "shapes.py"), args.shape], stdout=subprocess.PIPE,
                         text=True, check=True).stdout.split()[-1]
    path = bentoml.models.get(tag).path
    native.ops()
    print(f"{tag}, {args.quantization}; native kernels: the {native._level} level, AMX "
          f"{'granted' if native.amx() else 'not used'}", flush=True)
    engines = {kernel: load(path, args.quantization, kernel) for kernel in KERNELS}
    vocab = engines[KERNELS[0]].model_runner.vocab_size
    for engine in engines.values():  # warm up
        engine.generate(list(range(1000, 1016)), SamplingParams(max_tokens=2))
    for round_ in range(args.rounds):
        for kernel, engine in engines.items():
            figures = measure(engine, vocab)
            print(f"round {round_ + 1} {kernel:<12}" + "".join(f"  {k} {v:7.1f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
