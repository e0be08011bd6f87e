"""Models of a real model's shape with random weights, for benchmarks at sizes no wheel ships: the
config of the named shape, bf16 safetensors drawn from a normal distribution of std 0.02 (norms at 1),
one tensor at a time and written in shards (so that building the 13 GB 7B shape never holds more than
a shard), and the tokenizer and chat template of the stored SmolLM2-135M-Instruct. Imported into the
BentoML store with the project's importer as ``<shape>-random``; a shape already in the store is reused.

    .venv/bin/python bench/shapes.py smollm2-1.7b     # prints the store tag
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {
    # HuggingFaceTB/SmolLM2-1.7B-Instruct's config
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, rope_theta=130000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    # Llama-2-7B's, with SmolLM2's vocabulary (its tokenizer is the one at hand)
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=False, rope_theta=10000.0,
                     max_position_embeddings=4096, rms_norm_eps=1e-5),
}
BASE = "smollm2-135m-instruct:latest"  # whose tokenizer, chat template and token ids the shapes take
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
SHARD_BYTES = 2 << 30


def store_name(shape: str) -> str:
    return f"{shape}-random"


def config_for(shape: str, base: dict) -> dict:
    s = SHAPES[shape]
    config = {k: v for k, v in base.items() if not k.startswith("_") and k not in ("rope_theta", "torch_dtype")}
    config.update({k: v for k, v in s.items() if k != "rope_theta"})
    config.update(architectures=["LlamaForCausalLM"], model_type="llama", dtype="bfloat16",
                  head_dim=s["hidden_size"] // s["num_attention_heads"],
                  rope_parameters={"rope_theta": s["rope_theta"], "rope_type": "default"})
    return config


def tensors(config: dict):
    """(name, shape, is a norm) of a Llama model's weights, in the order transformers saves them."""
    h, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head = config["head_dim"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    yield "model.embed_tokens.weight", (vocab, h), False
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,), True
        yield p + "self_attn.q_proj.weight", (q, h), False
        yield p + "self_attn.k_proj.weight", (kv, h), False
        yield p + "self_attn.v_proj.weight", (kv, h), False
        yield p + "self_attn.o_proj.weight", (h, q), False
        yield p + "post_attention_layernorm.weight", (h,), True
        yield p + "mlp.gate_proj.weight", (inner, h), False
        yield p + "mlp.up_proj.weight", (inner, h), False
        yield p + "mlp.down_proj.weight", (h, inner), False
    yield "model.norm.weight", (h,), True
    if not config["tie_word_embeddings"]:
        yield "lm_head.weight", (vocab, h), False


def write(shape: str, out: Path, base_dir: Path, seed: int = 0, std: float = 0.02) -> None:
    """The model directory of ``shape`` at ``out``, with random weights."""
    import torch
    from safetensors.torch import save_file

    config = config_for(shape, json.loads((base_dir / "config.json").read_text()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map, size, total = {}, 0, 0
    files = []

    def flush() -> None:
        nonlocal size
        name = f"part-{len(files) + 1}.safetensors"
        save_file(shards[0], out / name, metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shards[0]})
        shards[0], size = {}, 0

    for name, dims, norm in tensors(config):
        t = torch.ones(dims, dtype=torch.bfloat16) if norm else \
            torch.empty(dims, dtype=torch.bfloat16).normal_(0.0, std, generator=generator)
        nbytes = t.numel() * 2
        if size and size + nbytes > SHARD_BYTES:
            flush()
        shards[0][name] = t
        size, total = size + nbytes, total + nbytes
    flush()
    n = len(files)
    renamed = {f: f"model-{i:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files, 1)} if n > 1 else \
        {files[0]: "model.safetensors"}
    for old, new in renamed.items():
        (out / old).rename(out / new)
    if n > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}, indent=2))


def ensure(shape: str) -> str:
    """The store tag of ``shape`` with random weights, built and imported unless the store has it."""
    import bentoml

    from models.embedded import in_store
    from models.importer import import_model

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    name = store_name(shape)
    if in_store(f"{name}:latest"):
        return str(bentoml.models.get(f"{name}:latest").tag)
    if not in_store(BASE):
        from models.config import load_config
        from models.embedded import ensure_available

        ensure_available(load_config())
    base_dir = Path(bentoml.models.get(BASE).path)
    print(f"building {shape} with random weights (bf16) and importing it as {name} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"bentochat-{shape}-") as tmp:
        write(shape, Path(tmp) / shape, base_dir)
        stored = import_model(str(Path(tmp) / shape), name)
    return str(stored.tag)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    print(ensure(parser.parse_args().shape))
