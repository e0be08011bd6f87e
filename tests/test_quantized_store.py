"""Models stored quantized: a GGUF file's Q8_0, Q4_0, Q4_1 and Q4_K weights kept as they are at import,
and any model quantized at import (``python -m models import --quantize int8|int4``); loaded without a
dequantization into the weights BentoChat's int8 and int4 kernels run, the same as quantizing the
full-precision weights at load gives."""

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


def requantized(source: Path, target: Path, types) -> Path:
    """``source`` (a GGUF file) with each 2-D tensor that ``types(name, shape)`` gives a type requantized to
    it, as llama.cpp's ``llama-quantize`` would write it (Q4_K, which gguf-py cannot quantize: blocks of
    random 4-bit values, 6-bit scales and offsets, and float16 factors); its metadata copied."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    random = np.random.default_rng(0)
    for tensor in reader.tensors:
        weights = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        kind = types(tensor.name, weights.shape) if weights.ndim == 2 else None
        if kind == gguf.GGMLQuantizationType.Q4_K:
            blocks = random.integers(0, 256, (weights.shape[0], weights.shape[1] // 256, 144), dtype=np.uint8)
            blocks[..., :4] = np.array([0.01, 0.005], dtype=np.float16).view(np.uint8)  # d, dmin
            writer.add_tensor(tensor.name, blocks.reshape(weights.shape[0], -1), raw_dtype=kind)
        elif kind is not None:
            writer.add_tensor(tensor.name, gguf.quantize(weights, kind), raw_dtype=kind)
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
    import gguf

    return requantized(EMBEDDED["smollm2-135m-instruct"](), tmp_path_factory.mktemp("gguf") / "smollm2-q8_0.gguf",
                       lambda name, shape: gguf.GGMLQuantizationType.Q8_0 if shape[1] % 32 == 0 else None)


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


def test_a_gguf_files_4_bit_blocks_are_stored_and_packed_as_they_are(tmp_path):
    """Q4_0, Q4_1 and Q4_K weights stored in 4 bits with their scales and offsets, the file's Q8_0 ones in
    int8, every one dequantizing exactly to what transformers reads from the file; a layer whose inputs
    mix 4 and 8 bits (q, k and v here) runs in int8, the others in 4 bits on AMX, packed as stored."""
    import gguf
    from transformers import AutoModelForCausalLM


    Q = gguf.GGMLQuantizationType
    kinds = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1, "ffn_gate": Q.Q4_1,
             "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_K}
    file = requantized(EMBEDDED["smollm2-135m-instruct"](), tmp_path / "smollm2-q4.gguf",
                       lambda name, shape: next((k for part, k in kinds.items() if f".{part}." in name), None))
    stored = Path(import_model(str(file), "smollm2-q4").path)
    assert json.loads((stored / "config.json").read_text())[STORED_QUANTIZATION] == "int4"
    reference = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).state_dict()
    with safe_open(stored / "model.safetensors", framework="pt") as f:
        for name in (f"model.layers.3.{module}.weight" for module in
                     ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "self_attn.v_proj")):
            q, scales = f.get_tensor(name), f.get_tensor(name + "_scale")
            four = name + "_min" in f.keys()
            weight = native.Int4Weight(q, scales, f.get_tensor(name + "_min"), torch.float32) if four else \
                native.Int8Weight(q, scales, torch.float32)
            assert four == ("v_proj" not in name) and q.dtype == (torch.uint8 if four else torch.int8)
            assert torch.equal(weight.dequantize(), reference[name])
    lean = load_causal_lm(str(stored), forward="lean", dtype="bfloat16")
    layer = lean.layers[3]
    if native.int4_runs(torch.bfloat16):
        assert layer.qkv.own.dtype == torch.int8 and layer.o.own.dtype == layer.gate_up.own.dtype == torch.uint8
        gate_up = torch.cat([reference[f"model.layers.3.mlp.{n}_proj.weight"] for n in ("gate", "up")])
        assert torch.equal(native.unpack_int4(layer.gate_up.own, *gate_up.shape), gate_up)
    assert len(greedy(lean)[1]) == 8


def test_int4_at_import_is_int4_at_load(tiny_llama_dir, tmp_path):
    """``--quantize int4`` stores the linear weights in 4 bits (the logits' in int8); loading gives what
    ``quantization: int4`` gives from the full-precision model (here in bfloat16): the same packed weights
    and answers."""
    import shutil

    from transformers import AutoModelForCausalLM

    for file in tiny_llama_dir.iterdir():  # (its tokenizer's files)
        if file.suffix not in (".bin", ".safetensors", ".json") or file.name.startswith("tokenizer"):
            shutil.copy(file, tmp_path)
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(tmp_path)
    stored = Path(import_model(str(tmp_path), "tiny-llama-int4", quantize="int4").path)
    with safe_open(stored / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.uint8
    ours = load_causal_lm(str(stored), forward="lean", dtype="bfloat16")
    at_load = load_causal_lm(str(tmp_path), forward="lean", dtype="bfloat16", quantization="int4")
    assert ours.lm_head.own.dtype == torch.int8
    assert (ours.layers[0].down.own.dtype == torch.uint8) == native.int4_runs(torch.bfloat16)
    if native.int4_runs(torch.bfloat16):
        assert all(torch.equal(a, b) for a, b in zip(int8_weights(ours), int8_weights(at_load)))
        assert greedy(ours) == greedy(at_load)
    else:  # 4 bits run in int8 here: the stored 4-bit weights in int8, and the full-precision ones (not alike)
        assert at_load.layers[0].down.own.dtype == torch.int8
