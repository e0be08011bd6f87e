"""What each precision costs in accuracy, against transformers' float32 forward on the same model (or,
with ``--reference bfloat16``, the lean bfloat16 forward, what int8 replaces): for a fixed set of chat
prompts, the reference's greedy answer is fed back (teacher forcing) and each variant is scored on it.
Prints a table: next-token agreement with the reference (the share of positions where the variant's
most likely token is the reference's), its perplexity of the reference answer, how many greedy answers it generates identical to the reference's, and how many tokens its
greedy answers share with the reference's before they part (the mean over the prompts).

    .venv/bin/python bench/accuracy.py                      # SmolLM2-135M-Instruct, 8 prompts, 64 tokens
    .venv/bin/python bench/accuracy.py --reference bfloat16 --only int8  # int8 against lean bfloat16
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import PROMPTS, prompt_ids  # noqa: E402

VARIANTS = {  # name: load_causal_lm options
    "transformers float32 (reference)": {"dtype": "float32"},
    "lean float32": {"dtype": "float32", "forward": "lean"},
    "lean bfloat16": {"dtype": "bfloat16", "forward": "lean"},
    "lean bfloat16, eager attention": {"dtype": "bfloat16", "forward": "lean", "attention": "eager"},
    "lean bfloat16, oneDNN matmul": {"dtype": "bfloat16", "forward": "lean", "matmul": "onednn"},
    # int8 on BentoChat's kernel and native forward (a scale per 32 weights), where they run
    "lean bfloat16, int8 weights": {"dtype": "bfloat16", "forward": "lean", "quantization": "int8"},
    # 4 bits (a scale and an offset per 32 weights, the logits' weight int8) on AMX, else int8
    "lean bfloat16, int4 weights": {"dtype": "bfloat16", "forward": "lean", "quantization": "int4"},
    # int8 on torch's _weight_int8pack_mm (a scale per output feature) and the Python pass
    "lean bfloat16, int8 weights, torch": {"dtype": "bfloat16", "forward": "lean", "quantization": "int8",
                                           "matmul": "onednn"},
}
REFERENCES = {"float32": "transformers float32 (reference)", "bfloat16": "lean bfloat16"}


def greedy(model, ids: list[int], n: int) -> list[int]:
    from runners.engine import LLMEngine, ModelRunner, SamplingParams

    engine = LLMEngine(ModelRunner(model), max_num_seqs=8, max_model_len=4096)
    return engine.generate(ids, SamplingParams(max_tokens=n, temperature=0))  # no stop token: n tokens


def score(model, ids: list[int], answer: list[int]) -> tuple[int, float]:
    """(positions whose argmax is the reference's token, summed negative log-likelihood of it)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids + answer]), logits_to_keep=0).logits[0].float()
    predicted = logits[len(ids) - 1:-1]
    target = torch.tensor(answer)
    nll = -torch.log_softmax(predicted, dim=-1).gather(1, target[:, None]).sum().item()
    return int((predicted.argmax(-1) == target).sum()), nll


def main() -> None:
    import bentoml
    from transformers import AutoTokenizer

    from models.config import load_config
    from models.embedded import ensure_available
    from runners.engine.loader import load_causal_lm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct:latest", help="BentoML store tag")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reference", choices=REFERENCES, default="float32",
                        help="whose greedy answers the variants are scored on: transformers float32, or lean bfloat16")
    parser.add_argument("--only", nargs="*", help="run only the variants whose names contain one of these")
    args = parser.parse_args()
    ensure_available(load_config())
    path = bentoml.models.get(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [prompt_ids(tokenizer, p) for p in PROMPTS]
    reference = None
    first = REFERENCES[args.reference]
    variants = {first: VARIANTS[first], **{name: options for name, options in VARIANTS.items() if name != first and (
        not args.only or any(word in name for word in args.only))}}
    print(f"{args.model}: {len(prompts)} prompts, {args.max_tokens} greedy tokens each, against {first}\n")
    print(f"{'variant':<38}{'next-token agreement':>22}{'perplexity':>12}{'identical answers':>19}"
          f"{'tokens before parting':>23}")
    for name, options in variants.items():
        model = load_causal_lm(path, **options)
        answers = [greedy(model, ids, args.max_tokens) for ids in prompts]
        if reference is None:
            reference = answers
        agree = nll = 0.0
        for ids, answer in zip(prompts, reference):
            a, n = score(model, ids, answer)
            agree, nll = agree + a, nll + n
        total = sum(map(len, reference))
        same = sum(a == r for a, r in zip(answers, reference))
        shared = sum(next((i for i, (x, y) in enumerate(zip(a, r)) if x != y), len(r)) for a, r in zip(answers, reference))
        print(f"{name:<38}{agree / total:>21.1%} {math.exp(nll / total):>11.3f}{same:>12}/{len(prompts)}"
              f"{shared / len(prompts):>23.1f}", flush=True)


if __name__ == "__main__":
    main()
