"""PEFT LoRA adapter directories: ``adapter_config.json`` and the weights read and checked against a
model's linear layers (``Part``s), into an :class:`Adapter` the engine can serve (``lora.py``). Loads no
torch until weights are read, so that the importer and the gateway's start-up checks use it too."""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from runners.engine.errors import AdapterError, AdapterMismatch

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_CONFIG_BYTES = 1 << 20  # PEFT writes about 1 KB; a larger file is not read at all
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass(eq=False)  # compared and hashed by identity: one loaded adapter, even if another takes its name later
class Adapter:
    """One adapter known to the engine: where its files are, and what it changes."""

    name: str
    path: Path
    base_model: str  # as its adapter_config.json names it
    rank: int  # the largest of its layers'
    modules: tuple[str, ...]  # the linear layers it changes, transformers' names
    weights: Path  # the weights file read (again after an eviction)

    def describe(self) -> dict:
        return {"source": str(self.path), "base_model": self.base_model, "rank": self.rank,
                "modules": len(self.modules)}


def _regular_file(file: Path, limit: int | None = None) -> int:
    """``file``'s size, once it is known to be a regular file (not a FIFO or a device, which reading
    could block on or never end) of at most ``limit`` bytes."""
    try:
        st = file.stat()
    except (OSError, ValueError) as e:
        raise AdapterError(f"{file} cannot be read: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise AdapterError(f"{file} is not a regular file")
    if limit is not None and st.st_size > limit:
        raise AdapterError(f"{file} holds {st.st_size} bytes, more than the {limit} an adapter's config may")
    return st.st_size


def read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterError(f"{path} has no {CONFIG_FILE}: not a PEFT adapter directory")
    _regular_file(file, MAX_CONFIG_BYTES)
    try:
        with open(file, "rb") as f:
            config = json.loads(f.read(MAX_CONFIG_BYTES + 1)[:MAX_CONFIG_BYTES])  # the file may grow meanwhile
    except (OSError, ValueError) as e:  # JSON's errors say where, never what
        raise AdapterError(f"{file} cannot be read: {e}") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{file} is not a JSON object")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{path} is not a LoRA adapter (its peft_type); only LoRA adapters are served")
    for key, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (GPT-2 Conv1D layers)"),
                      ("lora_bias", "LoRA biases")):
        if config.get(key):
            raise AdapterError(f"{path}: {what} is not supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save replace whole layers of the base model; only LoRA layers "
                           "can be shared in a batch")
    return config


def weight_file(path: Path) -> Path:
    found = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if found is None:
        raise AdapterError(f"{path} holds no adapter weights ({' or '.join(WEIGHT_FILES)})")
    return found


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern: the first key that names the module (or a suffix of it)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def read_weights(path: Path, config: dict | None = None, file: Path | None = None) -> dict[str, tuple]:
    """Each changed layer's ``(A, B, scale)`` (two tensors and a float), from the adapter's files (its
    weights ``file``, else the one it holds), on the CPU. A ``.bin`` file is a pickle: it is read with
    ``weights_only=True``, which builds tensors and nothing else."""
    config = config or read_config(path)
    file = file or weight_file(path)
    _regular_file(file)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file  # torch: loaded where weights are read, not on import

            state = load_file(str(file))
        else:
            import torch

            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(f"{file} cannot be read: {e}") from e
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None:
            kind = "embedding LoRA" if "lora_embedding" in key else "DoRA" if "magnitude" in key else "a tensor"
            raise AdapterError(f"{file}: {key} is {kind} this server does not apply (only lora_A/lora_B of "
                               "linear layers are)")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    if not pairs:
        raise AdapterError(f"{file} holds no LoRA weights")
    weights = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{file}: {module} has lora_{next(iter(ab))} without its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{file}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                               "which do not multiply")
        rank = a.shape[0]
        configured = _pattern(config.get("rank_pattern"), module, config.get("r", rank))
        if configured != rank:
            raise AdapterError(f"{file}: {module} has rank {rank}, its adapter_config.json says {configured}")
        alpha = _pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        weights[module] = (a, b, float(scale))
    return weights


def check(weights: dict, parts: dict, where: str) -> None:
    """Refuse an adapter whose layers the model does not have, or has in other shapes (an adapter
    trained for another base model)."""
    for module, (a, b, _) in weights.items():
        part = parts.get(module)
        if part is None:
            raise AdapterMismatch(f"{where}: it changes {module}, a linear layer this model does not have "
                                  "(an adapter for another architecture?)")
        if a.shape[1] != part.in_features or b.shape[0] != part.out_features:
            raise AdapterMismatch(f"{where}: {module} is {b.shape[0]}x{a.shape[1]} in the adapter but "
                                  f"{part.out_features}x{part.in_features} in this model: the adapter was trained "
                                  "for another base model")


def read_adapter(name: str, path: str | Path, parts: dict, pickles: bool = True) -> Adapter:
    """Read and check an adapter directory against the model's layers; raises :class:`AdapterError`.
    ``pickles=False`` refuses an adapter whose weights are only in ``adapter_model.bin``."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a directory")
    config = read_config(path)
    file = weight_file(path)
    if not pickles and file.suffix == ".bin":
        raise AdapterError(f"{file} is a pickle, not read at run time (python -m models import converts it)")
    weights = read_weights(path, config, file)
    check(weights, parts, f"adapter {name!r} ({path})")
    return Adapter(name, path, str(config.get("base_model_name_or_path") or ""),
                   max(a.shape[0] for a, _, _ in weights.values()), tuple(sorted(weights)), file)


def inside(source: str, roots: list[str]) -> Path | None:
    """The directory ``source`` names when it lies inside one of the directories ``roots``: an absolute
    path without ``..``, inside a root as written and again once its symlinks are resolved; else None.
    A path outside every root is refused before the file system is asked anything about it."""
    if "\0" in source or not os.path.isabs(source) or ".." in Path(source).parts:
        return None
    path = os.path.normpath(source)
    for root in roots:
        root = os.path.normpath(os.path.abspath(os.path.expanduser(root)))
        if os.path.commonpath([root, path]) != root:
            continue
        try:
            real, real_root = os.path.realpath(path, strict=True), os.path.realpath(root, strict=True)
        except (OSError, ValueError):
            return None
        if os.path.commonpath([real_root, real]) == real_root and os.path.isdir(real):
            return Path(real)
    return None
