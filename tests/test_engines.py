"""`engine` and `vllm` in bentochat.yaml: which engine a chat model gets, what cannot go to vLLM, and how the
model's settings become vLLM's engine arguments (no vLLM needed: tests/test_vllm.py runs it)."""

from __future__ import annotations

import pytest

from models.config import ConfigError, LoRAConfig, ServedModel, load_config
from models.engines import resolve_engine, vllm_installed
from runners.vllm_engine import engine_args


def served(**kw) -> ServedModel:
    return ServedModel(id="m", model="m:1", **kw)


def test_auto_is_vllm_on_gpus_where_it_is_installed_else_bentochat():
    assert resolve_engine("auto", []) == "bentochat"
    assert resolve_engine("auto", [0]) == ("vllm" if vllm_installed() else "bentochat")
    assert resolve_engine("bentochat", [0]) == "bentochat" and resolve_engine("vllm", []) == "vllm"


@pytest.mark.parametrize("entry, words", [
    ("{id: m, model: m, engine: vllm, quantization: int8}", "engine vllm has no quantization: int8"),
    ("{id: m, model: m, engine: vllm, forward: transformers, matmul: onednn}",
     "engine vllm has no forward: transformers, matmul: onednn"),
    ("{id: m, model: m, kind: embedding, engine: vllm}", "engine vllm runs a chat model served here"),
    ("{id: m, model: m, engine: vllm, vllm: {tensor_parallel: 2}}", "tensor_parallel"),
])
def test_what_vllm_cannot_run_stops_the_start_naming_the_key(tmp_path, entry, words):
    path = tmp_path / "bentochat.yaml"
    path.write_text(f"models:\n  - {entry}\n")
    with pytest.raises(ConfigError, match=words):
        load_config(path)


def test_the_models_settings_map_onto_vllms_arguments():
    on_cpu = engine_args(served(engine="vllm", dtype="float32", max_concurrency=8, kv_cache_memory="1GiB",
                                prefix_cache_tokens=0, vllm={"max_model_len": 512, "enforce_eager": True}),
                         "/store/m", 8192, lora=False)
    assert on_cpu["kv_cache_memory_bytes"] == 1 << 30 and on_cpu["max_num_seqs"] == 8
    assert on_cpu["max_model_len"] == 512 and on_cpu["enforce_eager"] and not on_cpu["enable_prefix_caching"]
    assert on_cpu["dtype"] == "float32" and "tensor_parallel_size" not in on_cpu
    speculative = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
    on_gpus = engine_args(served(engine="vllm", gpus=[0, 1], max_loras=2,
                                 vllm={"gpu_memory_utilization": 0.8, "kv_cache_dtype": "fp8", "quantization": "awq",
                                       "speculative": speculative}), "/store/m", 8192, lora=True)
    assert on_gpus["tensor_parallel_size"] == 2 and on_gpus["gpu_memory_utilization"] == 0.8
    assert on_gpus["max_model_len"] == 8192 and on_gpus["kv_cache_dtype"] == "fp8" and on_gpus["quantization"] == "awq"
    assert on_gpus["speculative_config"] == speculative and on_gpus["enable_lora"] and on_gpus["max_loras"] == 2
    assert "kv_cache_memory_bytes" not in on_gpus
    assert engine_args(served(engine="vllm", gpus=[0, 1], vllm={"tensor_parallel_size": 1}),
                       "/store/m", 8192, lora=False)["tensor_parallel_size"] == 1


@pytest.mark.skipif(vllm_installed(), reason="vLLM is installed here")
def test_engine_vllm_without_vllm_stops_the_start_saying_what_to_install():
    from runners.chat import chat_runner

    with pytest.raises(ConfigError, match=r"vLLM is not installed \(pip install 'bentochat\[vllm\]'"):
        chat_runner(served(engine="vllm"), LoRAConfig())
