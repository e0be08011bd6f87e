"""`python -m models import` on locally built models: sharded pickles, sentencepiece, remote code, GGUF."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from models.importer import ImportFailed, import_model


@pytest.fixture(scope="module")
def imported(tiny_model_dir):
    return import_model(str(tiny_model_dir), "tiny-import-test", trust_remote_code=True)


def test_sharded_bin_becomes_safetensors_with_index(imported, tiny_model_dir):
    files = {p.name for p in Path(imported.path).iterdir()}
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"} <= files
    assert not any(f.endswith(".bin") or f == "pytorch_model.bin.index.json" for f in files)
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, trust_remote_code=True).state_dict()
    stored = AutoModelForCausalLM.from_pretrained(imported.path, trust_remote_code=True).state_dict()
    assert original.keys() == stored.keys()
    assert all(torch.equal(original[k], stored[k]) for k in original)


def test_remote_code_tokenizer_loads_offline_from_the_store(imported, tiny_model_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    files = {p.name for p in Path(imported.path).iterdir()}
    assert {"tokenizer.model", "tokenization_tiny.py", "configuration_tiny.py", "modeling_tiny.py",
            "tokenizer_config.json", "generation_config.json"} <= files
    tok = AutoTokenizer.from_pretrained(imported.path, trust_remote_code=True)
    assert type(tok).__name__ == "TinyTokenizer"
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    text = "Hello world, 你好"
    assert tok(text)["input_ids"] == [1] + sp.encode(text)


def test_metadata_is_recorded(imported, tiny_model_dir):
    meta = imported.info.metadata
    assert meta["architecture"] == "TinyBaichuanForCausalLM" and meta["kind"] == "chat"
    assert meta["context_length"] == 256 and meta["dtype"] == "float32"
    assert meta["source"] == f"dir:{tiny_model_dir}" and meta["trust_remote_code"] is True
    assert imported.info.labels["kind"] == "chat"


def test_code_is_left_out_without_trust_remote_code(tiny_model_dir):
    m = import_model(str(tiny_model_dir), "tiny-no-code")
    assert not list(Path(m.path).glob("*.py"))
    assert m.info.metadata["trust_remote_code"] is False


def test_gguf_import_of_the_embedded_chat_model(embedded_models):
    import bentoml

    m = bentoml.models.get("smollm2-135m-instruct:latest")
    assert m.info.metadata["source"].startswith("gguf:") and m.info.metadata["context_length"] == 8192
    files = {p.name for p in Path(m.path).iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(f.endswith(".gguf") for f in files)
    config = json.loads((Path(m.path) / "config.json").read_text())  # (dequantized: served in bfloat16)
    assert "bentochat_quantization" not in config


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(ImportFailed, match="could not download 'some-org/some-model' from the Hugging Face hub"):
        import_model("some-org/some-model", "x")


def test_cli_reports_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "models", "import", str(tmp_path), "--name", "empty"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "no config.json" in r.stderr and "Traceback" not in r.stderr


def test_a_model_whose_auto_map_names_a_causal_lm_is_a_chat_model(tmp_path):
    """ChatGLM3's architecture is "ChatGLMModel"; its auto_map names the class that generates."""
    from models.importer import describe

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "seq_length": 8192,
        "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}}))
    meta = describe(tmp_path, "dir:/models/chatglm3-6b", trust_remote_code=True)
    assert (meta["kind"], meta["context_length"]) == ("chat", 8192)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    assert describe(tmp_path, "dir:/models/bert", trust_remote_code=False)["kind"] == "embedding"
