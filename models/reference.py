"""The configuration reference (docs/configuration.md), generated from every setting's own description in
``models/config.py``: ``python -m models reference > docs/configuration.md``."""

from __future__ import annotations

import json
import types
import typing
from typing import Literal

from pydantic import BaseModel, ByteSize

from models.config import AdapterEntry, GatewayConfig, ServedModel, ServedModels
from models.tenants import Budget, TenantConfig

REFERENCE_HEADER = """# Configuration reference

BentoChat reads `bentochat.yaml` at the repository root, or the file named by `BENTOCHAT_CONFIG`. This
page is generated from the settings' own descriptions in `models/config.py` (`python -m models reference
> docs/configuration.md`); `tests/test_docs.py` keeps the two equal.
"""


def _type_name(annotation) -> str:
    """A field's type as the YAML it takes: ``list[int]`` -> ``list of int``, a Literal -> its values."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", ByteSize: "size (`4GiB`, `500MB`)"}
    return names.get(annotation, str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
    return "unset" if field.default is None else f"`{json.dumps(field.default)}`"


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        group = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        what = field.description or (" ".join(field.annotation.__doc__.split()) if group else "")
        rows.append(f"| `{prefix}{field.alias or name}` | {_type_name(field.annotation)} | {_default(field)} | "
                    f"{what.replace('|', '/')} |")
        if group:
            rows += _rows(field.annotation, f"{prefix}{name}.")
    return rows


def _table(model: type[BaseModel], prefix: str = "") -> str:
    return "\n".join(["| key | takes | default | what it does |", "|---|---|---|---|", *_rows(model, prefix)])


def reference() -> str:
    """The configuration reference, in Markdown, from every setting's description."""
    return "\n".join([
        REFERENCE_HEADER,
        "## `models`: the served models", "",
        "A list; each entry is one model, served by a runner service of its own. " + ServedModels.__doc__.strip(), "",
        _table(ServedModel), "",
        "### `adapters` entries", "",
        " ".join(AdapterEntry.__doc__.split()) + " A plain string is taken as `source`.", "",
        _table(AdapterEntry), "",
        "## The gateway's settings", "",
        " ".join(GatewayConfig.__doc__.split()), "",
        _table(GatewayConfig), "",
        "### `tenants` entries", "",
        " ".join(TenantConfig.__doc__.split()) + " Set up step by step in [teams.md](teams.md).", "",
        _table(TenantConfig), "",
        "### `budgets` entries", "",
        " ".join(Budget.__doc__.split()), "",
        _table(Budget), "",
    ])
