"""PEFT LoRA adapter directories: ``adapter_config.json`` and the weights read and checked against a
model's linear layers (``Part``s), into an :class:`Adapter` the engine can serve (``lora.py``). Loads no
torch until weights are read, so that the importer and the gateway's start-up checks use it too."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from runners.engine.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass(eq=False)  # compared and hashed by identity: one loaded adapter, even if another takes its name later
class Adapter:
    """One adapter known to the engine: where its files are, and what it changes."""

    name: str
    path: Path
    base_model: str  # as its adapter_config.json names it
    rank: int  # the largest of its layers'
    modules: tuple[str, ...]  # the linear layers it changes, transformers' names

    def describe(self) -> dict:
        return {"source": str(self.path), "base_model": self.base_model, "rank": self.rank,
                "modules": len(self.modules)}


def read_config(path: Path) -> dict:
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{path} has no {CONFIG_FILE}: not a PEFT adapter directory")
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path / CONFIG_FILE} cannot be read: {e}") from e
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{path} is a {config.get('peft_type')} adapter; only LoRA adapters are served")
    for key, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (GPT-2 Conv1D layers)"),
                      ("lora_bias", "LoRA biases")):
        if config.get(key):
            raise AdapterError(f"{path}: {what} is not supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save ({config['modules_to_save']}) replace whole layers of the "
                           "base model; only LoRA layers can be shared in a batch")
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


def read_weights(path: Path, config: dict | None = None) -> dict[str, tuple]:
    """Each changed layer's ``(A, B, scale)`` (two tensors and a float), from the adapter's files, on the CPU."""
    config = config or read_config(path)
    file = weight_file(path)
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
            raise AdapterError(f"{where}: it changes {module}, a linear layer this model does not have "
                               "(an adapter for another architecture?)")
        if a.shape[1] != part.in_features or b.shape[0] != part.out_features:
            raise AdapterError(f"{where}: {module} is {b.shape[0]}x{a.shape[1]} in the adapter but "
                               f"{part.out_features}x{part.in_features} in this model: the adapter was trained for "
                               "another base model")


def read_adapter(name: str, path: str | Path, parts: dict) -> Adapter:
    """Read and check an adapter directory against the model's layers; raises :class:`AdapterError`."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a directory")
    config = read_config(path)
    weights = read_weights(path, config)
    check(weights, parts, f"adapter {name!r} ({path})")
    return Adapter(name, path, str(config.get("base_model_name_or_path") or ""),
                   max(a.shape[0] for a, _, _ in weights.values()), tuple(sorted(weights)))
