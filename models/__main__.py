"""``python -m models import SOURCE --name NAME [--trust-remote-code] [--base MODEL]``; ``python -m models
reference`` prints the configuration reference (docs/configuration.md); ``python -m models kubernetes`` the
Kubernetes manifests for a bento built from bentochat.yaml (deploy/kubernetes/bentochat.yaml)."""

from __future__ import annotations

import argparse
import logging
import sys

from pathlib import Path

from models.config import config_path
from models.kubernetes import IMAGE, MAX_REPLICAS, manifests
from models.reference import reference
from models.importer import ImportFailed, import_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description="BentoChat model store tools")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import a model into the BentoML model store")
    imp.add_argument("source", help="local Hugging Face directory, .gguf file, hub id (org/name), or a PEFT "
                                    "LoRA adapter directory")
    imp.add_argument("--name", required=True, help="model store name, e.g. qwen-7b-chat")
    imp.add_argument("--trust-remote-code", action="store_true",
                     help="keep the model's own *.py code (custom tokenizer/modeling) in the stored model")
    imp.add_argument("--base", help="adapters: the base model to record (default: the one adapter_config.json "
                                    "names)")
    imp.add_argument("--quantize", choices=["int8", "int4"],
                     help="store the linear layers' weights in int8 (a scale per 32 weights, as GGUF's Q8_0: about "
                          "half of bfloat16's size) or in 4 bits (a scale and an offset per 32, the logits' weight "
                          "in int8); served so (Llama, Mistral, Qwen2, Qwen3). A GGUF file's Q8_0 and Q4 weights are "
                          "kept as they are without it")
    imp.add_argument("--dequantize", action="store_true",
                     help="a GGUF file: every weight dequantized (float32), served in the configured dtype")
    sub.add_parser("reference", help="print the configuration reference, from the settings' own descriptions")
    kube = sub.add_parser("kubernetes", help="print the Kubernetes manifests for a bento built from a bentochat.yaml")
    kube.add_argument("--config", type=Path, default=config_path(), help="its bentochat.yaml (default: $BENTOCHAT_CONFIG, "
                                                                       "else the repository's)")
    kube.add_argument("--image", default=IMAGE, help=f"the bento's image (default: {IMAGE})")
    kube.add_argument("--max-replicas", type=int, default=MAX_REPLICAS,
                      help=f"the most pods of each runner (default: {MAX_REPLICAS}); the gateway lists each")
    args = parser.parse_args(argv)
    if args.command == "reference":
        print(reference(), end="")
        return 0
    if args.command == "kubernetes":
        try:
            print(manifests(args.config, args.image, args.max_replicas), end="")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model = import_model(args.source, args.name, trust_remote_code=args.trust_remote_code, base=args.base,
                             quantize=args.quantize, keep_quantized=not args.dequantize)
    except ImportFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"imported {model.tag} -> {model.path}")
    print("  " + ", ".join(f"{k}={v}" for k, v in model.info.metadata.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
