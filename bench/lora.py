"""How much a mixed-adapter batch costs: one forward pass of transformers' SmolLM2 (bfloat16, one new
token per row, no cache) on the base model alone, with PEFT's mixed-batch path (``adapter_names``), and
with BentoChat's LoRA layers (``runners/engine/lora.py``), the rows split evenly across the base and
three random rank-16 adapters of every linear layer. Prints a table with ratios (medians of repeats).
Needs PEFT (installed with the test extras).

    .venv/bin/python bench/lora.py
    .venv/bin/python bench/lora.py --batch 8 32 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import write_random_adapter  # noqa: E402


def median_seconds(f, repeats: int) -> float:
    for _ in range(3):
        f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct:latest", help="BentoML store tag")
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a served runner's default on 2 cores)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    import bentoml
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from runners.engine.lora import Adapters

    torch.set_num_threads(args.threads)
    path = bentoml.models.get(args.model).path
    workdir = Path(tempfile.mkdtemp(prefix="bentochat-lora-bench-"))
    dirs = [write_random_adapter(path, workdir / f"a{i}", seed=i) for i in (1, 2, 3)]

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()

    base = load()
    peft = PeftModel.from_pretrained(load(), str(dirs[0]), adapter_name="a1").eval()
    for i, d in enumerate(dirs[1:], 2):
        peft.load_adapter(str(d), adapter_name=f"a{i}")
    ours = load()
    adapters = Adapters(ours, max_loras=4)
    loaded = []
    for i, d in enumerate(dirs, 1):
        adapter = adapters.read(f"a{i}", d)
        adapters.add(adapter)
        adapters.slot(adapter, set())
        loaded.append(adapter)

    class Row:  # what the model runner passes for each row: its sequence, which names its adapter
        def __init__(self, adapter):
            self.adapter = adapter

    print(f"\n{args.model}: transformers' forward, bfloat16, {args.threads} torch thread(s), one new token "
          "per row; rows split evenly across the base and 3 adapters (rank 16, every linear layer)\n")
    print(f"{'batch':>5}{'base ms':>10}{'PEFT mixed ms':>15}{'BentoChat mixed ms':>20}{'PEFT/base':>11}"
          f"{'BentoChat/base':>16}")
    with torch.inference_mode():
        for batch in args.batch:
            ids = torch.randint(0, 1000, (batch, 1))
            names = [["__base__", "a1", "a2", "a3"][i % 4] for i in range(batch)]
            rows = [Row(None if n == "__base__" else loaded[int(n[1]) - 1]) for n in names]

            def run_ours():
                adapters.select(rows)
                return ours(input_ids=ids, use_cache=False, logits_to_keep=1)

            t_base = median_seconds(lambda: base(input_ids=ids, use_cache=False, logits_to_keep=1), args.repeats)
            t_peft = median_seconds(lambda: peft(input_ids=ids, use_cache=False, logits_to_keep=1,
                                                 adapter_names=names), args.repeats)
            t_ours = median_seconds(run_ours, args.repeats)
            print(f"{batch:>5}{t_base * 1e3:>10.1f}{t_peft * 1e3:>15.1f}{t_ours * 1e3:>20.1f}"
                  f"{t_base / t_peft:>10.2f}x{t_base / t_ours:>15.2f}x")


if __name__ == "__main__":
    main()
