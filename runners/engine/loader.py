"""Loading a stored causal LM for the engine. Which forward pass, dtype, matmul kernels and attention it
runs on is decided once, here (``plan``), from its config, ``bentochat.yaml``'s options and this
machine, and logged in one line; the model is then loaded and wrapped so.

The forwards, fastest first: ``native`` (BentoChat's whole pass in one C++ call, ``kernels/forward.cpp``,
on its own matmuls: bfloat16 on AMX or AVX-512 BF16, float32 on AVX-512, int8 weights on AVX-512), ``lean`` (BentoChat's Python
pass, ``lean.py``: oneDNN's packed matmuls or int8, torch's fused attention in the decode step) and
``transformers`` (the model's own forward, for every other family, remote code, and weights spread over
several GPUs).
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from runners.engine import native
from runners.engine.lean import FUSED_DECODE_DTYPES, LeanCausalLM
from runners.engine.linear import cpu_bf16, packs

logger = logging.getLogger("bentochat.engine")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# A stored model whose config.json names this key holds its linear layers' weights in that quantization
# (``int8``: each ``weight`` beside its ``weight_scale``; ``int4``: some of them in 4 bits, with a
# ``weight_min`` too, see from_quantized_checkpoint); models/importer.py writes it.
STORED_QUANTIZATION, SCALE_SUFFIX, MIN_SUFFIX = "bentochat_quantization", "_scale", "_min"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def unsupported(config) -> str | None:
    """Why a model of this transformers config cannot run on the lean forward, or None when it can."""
    if config.model_type not in FAMILIES or type(config).__module__.split(".")[0] != "transformers":
        return f"architecture {config.model_type} (the lean forward runs transformers' {', '.join(FAMILIES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    return None


def resolve_dtype(dtype: str, checkpoint_dtype: str | None, on_gpu: bool, lean: bool = False,
                  native_pass: bool = False) -> torch.dtype:
    """The torch dtype to load in. ``auto``: on a GPU the checkpoint's own; on a CPU with bfloat16
    instructions (AVX-512 BF16, AMX) bfloat16 for a model on the lean forward, whose packed bfloat16
    matmuls are faster than float32 at every batch size; so too on the AVX2 level's native pass
    (``native_pass``: the lean forward with ``matmul: auto`` and ``attention: fused``), where bfloat16 is
    widened in registers: half the bytes to read, as fast as float32 or faster but at long prefills
    (docs/performance.md), and half the memory; float32 otherwise (transformers' bfloat16 path, and
    oneDNN's without those instructions, are slower than float32, and half precision is often
    unsupported)."""
    if dtype != "auto":
        return DTYPES[dtype]
    if on_gpu:
        return DTYPES.get(str(checkpoint_dtype), torch.float16)
    native_bf16 = native_pass and native.level() == "avx2"
    return torch.bfloat16 if lean and (cpu_bf16() or native_bf16) else torch.float32


@dataclass(frozen=True)
class Plan:
    """How one model runs: its dtype, forward (native, lean, transformers), matmul kernels (amx,
    avx512-bf16, avx512, avx2, int8 for BentoChat's own on the native forward; onednn, int8 (torch's), torch) and attention (native, fused, eager,
    transformers), and why it is not on a faster forward."""

    dtype: torch.dtype
    forward: str
    matmul: str
    attention: str
    why: str = ""

    def __str__(self) -> str:
        line = (f"{str(self.dtype).removeprefix('torch.')}, {self.forward} forward, {self.matmul} matmuls, "
                f"{self.attention} attention")
        return f"{line} ({self.why})" if self.why else line


def plan(config, *, dtype: str = "auto", gpus: list[int] | tuple = (), spread: bool = False,
         forward: str = "transformers", quantization: str | None = None, attention: str = "fused",
         matmul: str = "auto") -> Plan:
    """The one decision of how a model of ``config`` runs, from the options of ``bentochat.yaml``
    (``spread``: its weights are placed over several devices, ``device_map``). A quantization the
    chosen forward cannot run is a ValueError."""
    why = unsupported(config) if forward == "lean" else "forward: transformers"
    if why is None and spread:
        why = "the weights are spread over several devices"
    if quantization and why is not None:
        raise ValueError(f"quantization: {quantization} runs on the lean forward, for {', '.join(FAMILIES)} models "
                         f"on one device, with forward: lean; this one is {config.model_type} with forward: "
                         f"{forward} ({why})")
    torch_dtype = resolve_dtype(dtype, getattr(config, "dtype", None), bool(gpus), why is None,
                                why is None and not gpus and matmul == "auto" and attention == "fused")
    if why is not None:
        return Plan(torch_dtype, "transformers", "torch", "transformers", why)
    native_forward = not gpus and matmul == "auto" and attention == "fused" and native.runs(torch_dtype)
    if quantization in ("int8", "int4"):
        if native_forward:  # BentoChat's int8 and int4 kernels (kernels/int8_linear.cpp)
            if quantization == "int4" and not native.int4_runs(torch_dtype):
                return Plan(torch_dtype, "native", "int8", "native", "int4 runs in bfloat16 on AMX, AVX-512 VNNI or AVX2")
            return Plan(torch_dtype, "native", quantization, "native")
        return Plan(torch_dtype, "lean", "int8", _python_attention(torch_dtype, gpus, attention),
                    "int4 runs on the native forward" if quantization == "int4" else "")
    if native_forward:
        kernels = ("avx2" if native.level() == "avx2" else "avx512" if torch_dtype == torch.float32 else
                   "amx" if native.amx() else "avx512-bf16")
        return Plan(torch_dtype, "native", kernels, "native")
    why = ("matmul: onednn" if matmul != "auto" else "attention: eager" if attention != "fused" else
           "no native kernels for this dtype on this machine" if not gpus else "")
    cpu_packed = not gpus and packs(torch.empty(0, dtype=torch_dtype))
    return Plan(torch_dtype, "lean", "onednn" if cpu_packed else "torch",
                _python_attention(torch_dtype, gpus, attention), why)


def _python_attention(dtype: torch.dtype, gpus, attention: str) -> str:
    """The lean Python pass's decode attention: torch's fused kernel on the CPU in float32 and bfloat16
    (``lean.fused_decode``, which may still decline it where it is not batch-invariant), else eager."""
    return "fused" if attention == "fused" and not gpus and dtype in FUSED_DECODE_DTYPES else "eager"


def load_causal_lm(path: str, *, dtype: str = "auto", gpus: list[int] | None = None,
                   max_gpu_memory: str | None = None, trust_remote_code: bool = False, forward: str = "transformers",
                   quantization: str | None = None, attention: str = "fused", matmul: str = "auto"):
    """Load a stored causal LM onto the configured GPUs (FastChat's --gpus/--max-gpu-memory) or the CPU,
    as :func:`plan` decides: on BentoChat's lean forward (``lean.LeanCausalLM``, with ``forward="lean"``,
    its weights in int8 with ``quantization="int8"``, FastChat's --load-8bit: on the native forward where it
    runs, else on torch's int8 matmul and the Python pass) or on transformers'."""
    gpus = list(gpus or [])
    if gpus:
        # Pin this process to the configured GPUs before CUDA initializes; they are then cuda:0..n-1.
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        if not torch.cuda.is_available():
            raise RuntimeError(f"gpus {gpus} are configured but CUDA is not available in this process")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    stored = getattr(config, STORED_QUANTIZATION, None)
    if stored is not None:  # (weights stored quantized run so)
        if quantization not in (None, stored):
            raise ValueError(f"{path} is stored in {stored}; quantization: {quantization} cannot run it")
        quantization = stored
    spread = len(gpus) > 1 or bool(max_gpu_memory)
    chosen = plan(config, dtype=dtype, gpus=gpus, spread=spread, forward=forward, quantization=quantization,
                  attention=attention, matmul=matmul)
    # The lean forward on the CPU converts each layer as it takes it: loaded in the file's own dtype, the
    # checkpoint's tensors are its mapped pages, and no converted copy of the whole model is held (float32
    # from a bfloat16 file, 6.85 GB of weights at 1.7B: a peak of 8.5 GB, against 15.0 GB converted whole).
    lean_on_cpu = chosen.forward != "transformers" and not gpus and stored is None
    kwargs: dict = {"dtype": (lean_on_cpu and file_dtype(path)) or chosen.dtype, "trust_remote_code": trust_remote_code}
    if spread:
        kwargs["device_map"] = "auto"
        if max_gpu_memory:
            kwargs["max_memory"] = {i: max_gpu_memory for i in range(len(gpus))}
    if stored is not None:
        model = from_quantized_checkpoint(path, config, chosen.dtype, trust_remote_code, dequantize=bool(gpus))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if len(gpus) == 1 and not max_gpu_memory:
        model.to("cuda:0")
    model.eval()
    logger.info("%s (%s) on %s: %s", path, config.model_type, f"GPUs {gpus}" if gpus else "the CPU", chosen)
    if chosen.forward == "transformers":
        return model
    lean = LeanCausalLM(model, int8=chosen.matmul in ("int8", "int4"), int4=chosen.matmul == "int4",
                        fused_attention=chosen.attention in ("native", "fused"),
                        matmul="auto" if chosen.forward == "native" else "onednn",
                        consumed=None if gpus else ReleaseTaken(), dtype=chosen.dtype)
    del model  # the checkpoint's tensors: the lean forward holds its own copies (packed)
    return_freed_memory()
    return lean


def from_quantized_checkpoint(path: str, config, dtype: torch.dtype, trust_remote_code: bool,
                              dequantize: bool = False):
    """The transformers model of a checkpoint stored quantized (``models/importer.py``: GGUF's Q8_0 and
    Q4 blocks kept, or quantized at import): each quantized linear layer's ``weight`` beside its
    ``weight_scale`` (int8: ``native.Int8Weight``), and its ``weight_min`` (4 bits, two to a byte:
    ``native.Int4Weight``); ``dequantize``: as the dtype's weight, for a GPU. The other tensors in
    ``dtype``. transformers cannot load those; the model is made without memory (meta) and filled here."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors = mapped_tensors(file)
        for name in sorted(n for n in tensors if not n.endswith((SCALE_SUFFIX, MIN_SUFFIX))):
            holder, attr = name.rsplit(".", 1)
            module, tensor = model.get_submodule(holder), tensors[name]
            if name + MIN_SUFFIX in tensors:
                tensor = native.Int4Weight(tensor, tensors[name + SCALE_SUFFIX], tensors[name + MIN_SUFFIX], dtype)
            elif name + SCALE_SUFFIX in tensors:
                tensor = native.Int8Weight(tensor, tensors[name + SCALE_SUFFIX], dtype)
            if isinstance(tensor, native.QUANTIZED):
                if not dequantize:
                    del module._parameters[attr]
                    setattr(module, attr, tensor)
                    continue
                tensor = tensor.dequantize()
            module._parameters[attr] = torch.nn.Parameter(tensor.to(dtype), requires_grad=False)
    model.tie_weights()
    rotary = model.model.rotary_emb  # (its tables are not stored: made again from the config)
    model.model.rotary_emb = type(rotary)(config=model.config)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return model


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
                      "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


def safetensors_header(file: Path) -> tuple[int, dict]:
    """A safetensors file's header (each tensor's dtype, shape and offsets) and its length in bytes."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return length, json.loads(f.read(length))


def file_dtype(path: str) -> torch.dtype | None:
    """The dtype of a checkpoint's floating-point tensors as its (first) safetensors file stores them;
    None where it has no such file or tensor."""
    files = sorted(Path(path).glob("*.safetensors"))
    header = safetensors_header(files[0])[1] if files else {}
    dtypes = [SAFETENSORS_DTYPES.get(entry["dtype"]) for name, entry in header.items() if name != "__metadata__"]
    return next((d for d in dtypes if d is not None and d.is_floating_point), None)


def mapped_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as views of its private mapping, as transformers loads them: read
    from the file as they are used, nothing copied (ReleaseTaken drops their pages once packed)."""
    length, header = safetensors_header(file)
    data = torch.empty(0, dtype=torch.uint8).set_(
        torch.UntypedStorage.from_file(str(file), shared=False, nbytes=file.stat().st_size))
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = (8 + length + offset for offset in entry["data_offsets"])
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        raw = data[start:end] if start % dtype.itemsize == 0 else data[start:end].clone()  # (views stay aligned)
        tensors[name] = raw.view(dtype).view(entry["shape"])
    return tensors


class ReleaseTaken:
    """Called with each layer whose weights the lean forward has taken (packed copies): releases the
    layer's own. Its tensors of the checkpoint's mapped files have their pages dropped from this
    process's memory (``MADV_DONTNEED``; the file is not written, and a page read again would be read
    from it); tensors of its own (converted to another dtype while loading, as float32 from a bfloat16
    checkpoint) are freed. Without it, loading holds the whole checkpoint beside the packed weights
    until the end: measured on a 1.7B model, a peak of 7.7 GB for 3.4 GB of weights in bfloat16; in
    float32 from a bfloat16 checkpoint converted whole at load, 15.0 GB for 6.8 GB, and 10.5 GB with
    this alone (8.5 GB once each layer is converted as it is taken, see load_causal_lm)."""

    DONTNEED, PAGE = 4, os.sysconf("SC_PAGE_SIZE")

    def __init__(self):
        self.files = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) == 6 and fields[5].endswith(".safetensors"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    self.files.append((start, end))
        self.madvise = ctypes.CDLL(None, use_errno=True).madvise if self.files else None

    def __call__(self, layer: torch.nn.Module) -> None:
        for module in layer.modules():
            tensors = [t for t in module._parameters.values() if t is not None]
            if isinstance(getattr(module, "weight", None), native.QUANTIZED):  # (a stored int8 model's, packed now)
                tensors += [t for t in vars(module.weight).values() if isinstance(t, torch.Tensor)]
                module.weight = None
            for name in module._parameters:  # (the layer's references: the tensors go with the last one)
                module._parameters[name] = None
            for tensor in tensors:
                self._drop_pages(tensor)
        del tensors
        return_freed_memory(collect=False)  # (the layer's converted copies, freed to the heap)

    def _drop_pages(self, tensor: torch.Tensor) -> None:
        start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
        if not any(a <= start and end <= b for a, b in self.files):
            return
        first, last = -(-start // self.PAGE) * self.PAGE, end // self.PAGE * self.PAGE  # whole pages within
        if last > first:
            self.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), self.DONTNEED)


def return_freed_memory(collect: bool = True) -> None:
    """Give the memory freed while loading back to the system: glibc's malloc keeps freed blocks of
    its heap (under its threshold for mapping allocations of their own, which grows to 32 MB as large
    blocks are freed) for later allocations; ``malloc_trim`` returns them. Measured on a 1.7B model in
    bfloat16: 0.4 GB of the runner's memory at the end; in float32, 0.8 GB of the peak when returned
    after each layer. ``collect``: first collect the garbage in reference cycles."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
