"""Import a model into the BentoML model store as an ordinary Hugging Face directory.

Sources: a local Hugging Face directory (safetensors, or sharded ``*.bin`` with
``pytorch_model.bin.index.json``), a hub id (only when the machine can reach the hub), or a
``.gguf`` file. Whatever the source, the stored model is config + safetensors weights + tokenizer
files + ``generation_config.json`` (+ the model's own ``*.py`` with ``trust_remote_code``), so
loading it later needs neither the network nor a conversion. A GGUF file's Q8_0, Q4_0, Q4_1 and Q4_K
linear weights stay as they are (int8, 4 bits), and ``--quantize int8`` or ``int4`` stores any model's
so (``runners/engine/loader.py``'s ``from_quantized_checkpoint`` reads them).

A PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``)
is stored the same way, as ``adapter_config.json`` + ``adapter_model.safetensors``, with its base
model recorded (``base_model``: ``--base``, else what its config names).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import bentoml
from tqdm.auto import tqdm

from models.config import DEFAULT_CONTEXT_LENGTH
from runners.engine.adapter_files import read_config, read_weights, weight_file
from runners.engine.errors import AdapterError

logger = logging.getLogger("bentochat.models")

# Weights that are converted to safetensors rather than copied.
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SKIPPED = {".gitattributes", ".git"}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                "model_max_length", "max_sequence_length", "n_ctx")


class ImportFailed(RuntimeError):
    pass


def import_model(source: str, name: str, *, trust_remote_code: bool = False, base: str | None = None,
                 quantize: str | None = None, keep_quantized: bool = True) -> bentoml.Model:
    """Import ``source`` into the store under ``name``; return the stored model. ``quantize`` (``int8``,
    ``int4``): its linear layers' weights stored so (:func:`_quantize`). ``keep_quantized=False``: a GGUF
    file's quantized weights dequantized all the same (the embedded chat model, served in bfloat16)."""
    path = Path(source).expanduser()
    if quantize not in (None, "int8", "int4"):
        raise ImportFailed(f"--quantize {quantize}: int8 or int4")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        if quantize:
            raise ImportFailed("--quantize is for models; a LoRA adapter is stored as it is")
        return import_adapter(path, name, base)
    if base is not None:
        raise ImportFailed(f"--base is for LoRA adapters; {source} has no adapter_config.json")
    if path.is_file() and path.suffix == ".gguf":
        builder, origin, steps = (lambda dst, step: _from_gguf(path, dst, trust_remote_code, step, keep_quantized)), \
            f"gguf:{path}", 4
    elif path.is_dir():
        builder, origin, steps = (lambda dst, step: _from_directory(path, dst, trust_remote_code, step)), f"dir:{path}", 2
    elif path.exists():
        raise ImportFailed(f"{source} is neither a Hugging Face model directory nor a .gguf file")
    elif "/" in source and not source.startswith((".", "/")):
        local = _download_from_hub(source)
        builder, origin, steps = (lambda dst, step: _from_directory(local, dst, trust_remote_code, step)), \
            f"hub:{source}", 2
    else:
        raise ImportFailed(f"{source} does not exist (expected a directory, a .gguf file or a hub id)")

    with tempfile.TemporaryDirectory(prefix="bentochat-import-") as staging, \
            _steps(f"importing {name}", steps + 1 + bool(quantize)) as step:
        staged = Path(staging)
        builder(staged, step)
        if quantize:
            _quantize(staged, step, quantize)
        step("storing")
        metadata = describe(staged, origin, trust_remote_code)
        with bentoml.models.create(name, metadata=metadata, labels={"kind": metadata["kind"]}) as ref:
            for item in staged.iterdir():
                shutil.move(str(item), os.path.join(ref.path, item.name))
    stored = bentoml.models.get(ref.tag)
    logger.info("imported %s as %s (%s)", source, stored.tag, metadata["architecture"])
    return stored


def import_adapter(path: Path, name: str, base: str | None = None) -> bentoml.Model:
    """Store a PEFT LoRA adapter directory: its config and weights (pickled ``.bin`` as safetensors),
    after checking that they are readable and consistent (the base model's fit is checked when it is
    served)."""
    try:
        config = read_config(path)
        weights = read_weights(path, config)
        file = weight_file(path)
    except AdapterError as e:
        raise ImportFailed(str(e)) from e
    metadata = {
        "kind": "adapter",
        "peft_type": "LORA",
        "base_model": base or str(config.get("base_model_name_or_path") or ""),
        "rank": max(a.shape[0] for a, _, _ in weights.values()),
        "modules": len(weights),
        "source": f"dir:{path}",
    }
    with bentoml.models.create(name, metadata=metadata, labels={"kind": "adapter"}) as ref:
        shutil.copy2(path / "adapter_config.json", os.path.join(ref.path, "adapter_config.json"))
        if file.suffix == ".safetensors":
            shutil.copy2(file, os.path.join(ref.path, file.name))
        else:
            import torch
            from safetensors.torch import save_file

            state = torch.load(file, map_location="cpu", weights_only=True)
            save_file({k: v.contiguous() for k, v in state.items()},
                      os.path.join(ref.path, "adapter_model.safetensors"), metadata={"format": "pt"})
    stored = bentoml.models.get(ref.tag)
    logger.info("imported LoRA adapter %s as %s (base %s, rank %s)", path, stored.tag, metadata["base_model"] or "?",
                metadata["rank"])
    return stored


def describe(model_dir: Path, source: str, trust_remote_code: bool) -> dict:
    """Metadata recorded on the stored model: architecture, context length, dtype, source."""
    config = _read_json(model_dir / "config.json")
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    architecture = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    context = next((int(config[k]) for k in CONTEXT_KEYS if isinstance(config.get(k), int)), None)
    if context is None and isinstance(tokenizer_config.get("model_max_length"), int):
        context = min(int(tokenizer_config["model_max_length"]), 1 << 20)
    return {
        "architecture": architecture,
        "model_type": config.get("model_type", "unknown"),
        "kind": "chat" if _generates(config, architecture) else "embedding",
        "context_length": context or DEFAULT_CONTEXT_LENGTH,
        "dtype": str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        "source": source,
        "trust_remote_code": trust_remote_code,
    }


def _generates(config: dict, architecture: str) -> bool:
    # ChatGLM's architecture is "ChatGLMModel", but its auto_map names a causal LM class.
    return architecture.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) or \
        "AutoModelForCausalLM" in (config.get("auto_map") or {})


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _from_gguf(path: Path, dst: Path, trust_remote_code: bool, step, keep: bool = True) -> None:
    """A GGUF file as config + tokenizer + safetensors. For the lean forward's families, a linear
    layer's Q8_0 weight is kept as it is (``keep``): its int8 values and its scales (float16, stored as
    float32; ``runners.engine.native.Int8Weight``), its Q4_0, Q4_1 and Q4_K weights in 4 bits
    (``Int4Weight``); every other tensor is dequantized to float32. The names and
    the llama.cpp layout of q and k are transformers' (its GGUF tensor map and processors). A file of
    another architecture is dequantized whole by transformers (whose processors for some of them merge
    or rename tensors)."""
    step("loading transformers")
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, read_field)

    # torch: the engine's rules, for weights converted here only
    from runners.engine.loader import MIN_SUFFIX, SCALE_SUFFIX, STORED_QUANTIZATION, unsupported
    from runners.engine.native import GROUP, quantize_int8

    kwargs = {"gguf_file": path.name, "trust_remote_code": trust_remote_code}
    step("reading the GGUF tokenizer and config")  # most of it parsing the file's metadata, twice
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    config = AutoConfig.from_pretrained(path.parent, **kwargs)
    step("reading the GGUF weights")
    if unsupported(config):
        model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
        model.hf_quantizer = None  # (dequantized already: saved as plain weights)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        step("writing safetensors")
        model.save_pretrained(dst, safe_serialization=True)
        tokenizer.save_pretrained(dst)
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    reader = GGUFReader(path)
    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(
        config=config.to_dict())
    names = get_gguf_hf_weights_map(skeleton, processor)
    linear = _linear_weights(skeleton)
    tensors = {}
    for tensor in tqdm(reader.tensors, desc="reading GGUF tensors", unit="tensor"):
        name = names.get(tensor.name)
        if name is None:
            continue
        rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1
        kept = _gguf_blocks(tensor, rows) if keep and name in linear else None
        if kept is None:
            kept = {"": dequantize(tensor.data, tensor.tensor_type)}
        for suffix, array in kept.items():  # the weight (and its scales and offsets), in transformers' layout
            array = processor.process(weights=array, name=tensor.name).weights
            tensors[name + suffix] = torch.from_numpy(np.array(array, dtype=np.float32 if array.dtype.kind == "f" else None))
    step("writing safetensors")
    config.architectures, config.dtype = [type(skeleton).__name__], torch.float32
    if any(name.endswith(SCALE_SUFFIX) for name in tensors):  # the file's other linear weights in int8 too
        for name in linear & tensors.keys():
            if name + SCALE_SUFFIX not in tensors and tensors[name].shape[1] % GROUP == 0:  # (as _quantize)
                tensors[name], tensors[name + SCALE_SUFFIX] = quantize_int8(tensors[name])
        setattr(config, STORED_QUANTIZATION, "int4" if any(name.endswith(MIN_SUFFIX) for name in tensors) else "int8")
    _save_weights(tensors, dst / "model.safetensors")
    config.save_pretrained(dst)
    GenerationConfig.from_model_config(config).save_pretrained(dst)
    tokenizer.save_pretrained(dst)


def _gguf_blocks(tensor, rows: int) -> dict | None:
    """A GGUF tensor's quantized blocks as BentoChat keeps them (suffix -> array [rows, ...]), where it can:
    Q8_0 as int8 values and float32 scales (``runners.engine.native.Int8Weight``); Q4_0, Q4_1 and Q4_K as
    4-bit values two to a byte, float32 scales and offsets, w = d q + m (``Int4Weight``). Exactly the
    weights llama.cpp's blocks hold (their float16 factors, and Q4_K's 6-bit ones, multiply exactly in
    float32). None for other types."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import Q4_K

    from runners.engine.loader import MIN_SUFFIX, SCALE_SUFFIX  # torch: see _from_gguf
    from runners.engine.native import pair_nibbles

    sizes = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q4_K: 144}
    if tensor.tensor_type not in sizes:
        return None
    blocks = np.asarray(tensor.data).reshape(-1, sizes[tensor.tensor_type])
    half = lambda a: a.copy().view(np.float16).astype(np.float32)  # noqa: E731
    if tensor.tensor_type == Q.Q8_0:
        return {"": blocks[:, 2:].copy().view(np.int8).reshape(rows, -1), SCALE_SUFFIX: half(blocks[:, :2]).reshape(rows, -1)}
    if tensor.tensor_type == Q.Q4_K:  # 256 weights: d, dmin, 8 6-bit scales and offsets, 8 x 32 values
        d, dmin = half(blocks[:, :2]), half(blocks[:, 2:4])
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        scales, mins = d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
    else:  # 32 weights: d (and Q4_1's m), 16 bytes of two values each
        scales = half(blocks[:, :2])
        mins = half(blocks[:, 2:4]) if tensor.tensor_type == Q.Q4_1 else -8 * scales
        qs = blocks[:, -16:].reshape(-1, 1, 1, 16)
    values = ((qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(rows, -1)
    return {"": pair_nibbles(values), SCALE_SUFFIX: scales.reshape(rows, -1), MIN_SUFFIX: mins.reshape(rows, -1)}


def _linear_weights(model) -> set[str]:
    """The names of a transformers model's linear layers' weights (those int8 may hold)."""
    import torch

    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _save_weights(tensors: dict, file: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, file, metadata={"format": "pt"})


def _quantize(dst: Path, step, kind: str) -> None:
    """The stored model's linear layers' weights quantized, shard by shard, one tensor in float32 at a
    time; config.json says so. ``int8`` (``runners.engine.native.quantize_int8``: one scale per 32 inner
    elements of a feature, as GGUF's Q8_0), each beside its ``weight_scale``; ``int4``: 4 bits with a
    scale and an offset per 32 (``Int4Weight.of``, two values a byte, beside ``weight_scale`` and
    ``weight_min``), the logits' weight (``lm_head``) in int8, as llama.cpp's Q4_K_M keeps it in 6 bits.
    A weight already quantized stays."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    # torch: the engine's rules, for weights converted here only
    from runners.engine.loader import MIN_SUFFIX, SCALE_SUFFIX, STORED_QUANTIZATION, unsupported
    from runners.engine.native import GROUP, Int4Weight, quantize_int8

    config = AutoConfig.from_pretrained(dst)
    why = unsupported(config)
    if why is not None:
        raise ImportFailed(f"--quantize {kind} runs on the lean forward; this model cannot ({why})")
    with torch.device("meta"):
        linear = _linear_weights(AutoModelForCausalLM.from_config(config))
    step(f"quantizing the weights to {kind}")
    index_file = dst / "model.safetensors.index.json"
    index = _read_json(index_file)
    for file in _progress(sorted(dst.glob("*.safetensors")), "quantizing weights"):
        tensors = {}
        with safe_open(file, framework="pt") as f:
            names = set(f.keys())
            for name in names:
                tensor = f.get_tensor(name)
                if name in linear and tensor.dim() == 2 and tensor.shape[1] % GROUP == 0 and \
                        name + SCALE_SUFFIX not in names:
                    if kind == "int4" and name != "lm_head.weight":
                        four = Int4Weight.of(tensor)
                        tensor, tensors[name + SCALE_SUFFIX], tensors[name + MIN_SUFFIX] = four.q, four.scales, four.mins
                    else:
                        tensor, tensors[name + SCALE_SUFFIX] = quantize_int8(tensor)
                    if index:
                        for suffix in (SCALE_SUFFIX, MIN_SUFFIX):
                            if name + suffix in tensors:
                                index["weight_map"][name + suffix] = file.name
                tensors[name] = tensor
        _save_weights(tensors, file)
    if index:
        index_file.write_text(json.dumps(index, indent=2))
    if getattr(config, STORED_QUANTIZATION, None) != "int4":
        setattr(config, STORED_QUANTIZATION, kind)
    config.save_pretrained(dst)


def _from_directory(src: Path, dst: Path, trust_remote_code: bool, step) -> None:
    """Copy a Hugging Face directory, converting pickled ``*.bin`` weights to safetensors."""
    if not (src / "config.json").is_file():
        raise ImportFailed(f"{src} has no config.json: not a Hugging Face model directory")
    code = sorted(p.name for p in src.glob("*.py"))
    if code and not trust_remote_code:
        logger.warning("%s ships its own code (%s); it is left out. Pass --trust-remote-code to keep it.",
                       src, ", ".join(code))
    files = [p for p in src.rglob("*") if p.is_file() and not _skipped(p.relative_to(src), trust_remote_code)]
    has_safetensors = any(p.suffix == ".safetensors" for p in files)
    step("copying the model's files")
    for p in _progress(files, "copying model files"):
        rel = p.relative_to(src)
        if p.name.startswith("pytorch_model") and (p.suffix == ".bin" or p.name in PICKLE_WEIGHTS):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst / rel)
    step("converting pickled weights to safetensors" if not has_safetensors else "checking the files")
    if not has_safetensors:
        _convert_bin_weights(src, dst)


def _skipped(rel: Path, trust_remote_code: bool) -> bool:
    if rel.parts[0] in SKIPPED or rel.suffix in (".md", ".h5", ".msgpack", ".onnx") or rel.name == "handler.py":
        return True
    return rel.suffix == ".py" and not trust_remote_code


def _convert_bin_weights(src: Path, dst: Path) -> None:
    """``pytorch_model.bin`` or its shards + index -> ``model.safetensors`` or shards + index."""
    import torch
    from safetensors.torch import save_file

    index_path = src / "pytorch_model.bin.index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        shards = sorted(set(index["weight_map"].values()))
    elif (src / "pytorch_model.bin").is_file():
        index, shards = None, ["pytorch_model.bin"]
    else:
        raise ImportFailed(f"{src} holds no weights (no *.safetensors, pytorch_model.bin or its index)")

    renamed = {}
    for i, shard in enumerate(_progress(shards, "converting weights to safetensors"), 1):
        state = torch.load(src / shard, map_location="cpu", weights_only=True)
        # Tied weights share storage in a pickle; safetensors wants each tensor on its own.
        state = {k: v.detach().contiguous().clone() for k, v in state.items()}
        out = "model.safetensors" if index is None else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(state, dst / out, metadata={"format": "pt"})
        renamed[shard] = out
    if index is not None:
        index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise ImportFailed(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "On a machine with no hub access, download the model elsewhere and import its directory."
        ) from e


def _progress(items: list, desc: str):
    return tqdm(items, desc=desc, unit="file", disable=len(items) < 2)


@contextlib.contextmanager
def _steps(desc: str, total: int):
    """A progress bar over the ``total`` steps of a long job, redrawn every second so that its clock runs
    while one step takes long (reading a GGUF file's metadata is silent for seconds); yields ``step(name)``,
    which starts the next step."""
    bar = tqdm(total=total, desc=desc, bar_format="{desc}: {n_fmt}/{total_fmt} steps done{postfix} [{elapsed}]")
    done = threading.Event()

    def tick() -> None:
        while not done.wait(1):
            bar.refresh()

    threading.Thread(target=tick, daemon=True).start()

    def step(name: str) -> None:
        if bar.postfix:  # a step is under way: it is done
            bar.update(1)
        bar.set_postfix_str(name)

    try:
        yield step
        bar.set_postfix_str("done")
        bar.update(bar.total - bar.n)
    finally:
        done.set()
        bar.close()
