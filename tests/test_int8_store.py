"""Models stored in int8: a GGUF file's Q8_0 weights kept as they are at import, and any model quantized
at import (``python -m models import --quantize int8``); loaded without a dequantization into the weights
BentoChat's int8 kernel runs, the same as quantizing the full-precision weights at load gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import ROOT
from models.embedded import EMBEDDED
from models.importer import import_model
from runners.engine import LLMEngine, ModelRunner, SamplingParams, native
from runners.engine.loader import STORED_QUANTIZATION, load_causal_lm

pytestmark = pytest.mark.skipif(native.ops() is None, reason="no native kernels on this machine (CPU or compiler)")
PROMPTS = [[1, 7, 9, 300, 500], list(range(100, 140))]  # (the tiny Llama has 592 tokens)


def q8_0_copy(source: Path, target: Path) -> Path:
    """``source`` (a GGUF file) with every 2-D tensor whose rows are whole blocks of 32 requantized to
    Q8_0, as llama.cpp's ``llama-quantize ... Q8_0`` would write it; its metadata copied."""
    import gguf

    reader = gguf.GGUFReader(source)
    architecture = gguf.GGUFReader(source).fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, architecture)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        weights = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if weights.ndim == 2 and weights.shape[1] % 32 == 0:
            writer.add_tensor(tensor.name, gguf.quantize(weights, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(tensor.name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.fixture(scope="module")
def q8_0_gguf(tmp_path_factory) -> Path:
    """The embedded chat model (SmolLM2-135M-Instruct, Q4_1) as a Q8_0 GGUF file."""
    return q8_0_copy(EMBEDDED["smollm2-135m-instruct"](), tmp_path_factory.mktemp("gguf") / "smollm2-q8_0.gguf")


def int8_weights(lean) -> list[torch.Tensor]:
    return [linear.own for linear in lean._matmuls()]


def greedy(lean) -> list[list[int]]:
    engine = LLMEngine(ModelRunner(lean), max_num_seqs=4, max_model_len=256)
    return engine.generate_batch(PROMPTS, [SamplingParams(max_tokens=8, temperature=0)] * len(PROMPTS))


def test_a_gguf_files_q8_0_weights_are_stored_and_run_as_they_are(q8_0_gguf):
    """The Q8_0 file's linear weights stored in int8 beside their float32 scales (a third of the
    float32 import's size); loaded, they are bit for bit the weights BentoChat's int8 kernel gets from
    transformers' own reading of the file (dequantized) quantized again, q and k in transformers'
    layout; the other tensors equal transformers'; the answers are the same."""
    from transformers import AutoModelForCausalLM

    from runners.engine.lean import LeanCausalLM

    stored = import_model(str(q8_0_gguf), "smollm2-q8-0")
    path = Path(stored.path)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        scales = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        dense = {name: f.get_tensor(name) for name in f.keys() if "norm" in name or "embed" in name}
    assert q.dtype == torch.int8 and q.shape == (576, 576) and scales.dtype == torch.float32 and scales.shape == (576, 18)
    assert json.loads((path / "config.json").read_text())[STORED_QUANTIZATION] == "int8"
    assert stored.info.metadata["kind"] == "chat" and stored.info.metadata["architecture"] == "LlamaForCausalLM"

    ours = load_causal_lm(str(path), forward="lean", dtype="float32")
    assert ours.native is not None  # the native forward, on the int8 kernel
    reference = AutoModelForCausalLM.from_pretrained(q8_0_gguf.parent, gguf_file=q8_0_gguf.name, dtype=torch.float32)
    state = reference.state_dict()
    assert all(torch.equal(tensor, state[name]) for name, tensor in dense.items())
    theirs = LeanCausalLM(reference, int8=True)
    assert all(torch.equal(a, b) for a, b in zip(int8_weights(ours), int8_weights(theirs)))
    assert greedy(ours) == greedy(theirs)


def test_a_model_quantized_at_import_loads_as_quantized_at_load(tiny_llama_dir):
    """``--quantize int8`` (the CLI) stores the tiny Llama's linear weights in int8; loading that gives the
    weights and answers that ``quantization: int8`` gives from the full-precision model, and asking for
    another quantization of it is a clear error."""
    subprocess.run([sys.executable, "-m", "models", "import", str(tiny_llama_dir), "--name", "tiny-llama-int8",
                    "--quantize", "int8"], cwd=ROOT, check=True)
    import bentoml

    path = bentoml.models.get("tiny-llama-int8:latest").path
    index = json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"]  # (two shards)
    for name, dtype in (("model.layers.0.mlp.down_proj.weight", torch.int8), ("model.embed_tokens.weight", torch.float32),
                        ("model.layers.1.self_attn.k_proj.weight_scale", torch.float32)):
        with safe_open(Path(path) / index[name], framework="pt") as f:
            assert f.get_tensor(name).dtype == dtype
    stored = load_causal_lm(path, forward="lean", dtype="float32")
    at_load = load_causal_lm(str(tiny_llama_dir), forward="lean", dtype="float32", quantization="int8")
    assert all(torch.equal(a, b) for a, b in zip(int8_weights(stored), int8_weights(at_load)))
    assert greedy(stored) == greedy(at_load)
    with pytest.raises(ValueError, match="stored in int8"):
        load_causal_lm(path, forward="lean", quantization="int4")
