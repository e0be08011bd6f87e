"""Who may call the gateway, and how much: ``tenants`` of bentochat.yaml, each with its API keys, a
weight (its share of a model's batch under contention), a concurrency cap, a request rate, token
budgets and the models it may use; and ``usage``, where the usage ledger is written.

A key is given as itself or as its SHA-256 (``sha256:<64 hex digits>``), in the file, in a file
(``keys_file``, one a line) or in an environment variable (``keys_env``, comma-separated), so that no
secret needs to sit in the bento. Plain ``api_keys`` (and ``BENTOCHAT_API_KEYS``) are one more tenant,
``default``: an admin with no limits.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TENANT = "default"
_HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")


def key_digest(key: str) -> str:
    """A key's SHA-256, hex: what keys are matched by (and a hashed key is given as)."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(digest: str) -> str:
    """What the ledger and the logs name a key by: the first 12 hex digits of its SHA-256, never the key."""
    return f"key-{digest[:12]}"


class Budget(BaseModel):
    """Tokens a tenant may use within a calendar period (UTC), prompt and completion counted apart."""

    model_config = ConfigDict(extra="forbid")

    period: Literal["minute", "day", "month"] = Field(description="the window, a calendar minute, day or month "
                                                                  "(UTC); it starts empty at each new one")
    prompt_tokens: int | None = Field(default=None, ge=0, description="prompt tokens within the period; unset: "
                                      "no limit. A prompt that would pass it is refused")
    completion_tokens: int | None = Field(default=None, ge=0, description="generated tokens within the period; "
                                          "unset: no limit. A request is admitted while some are left, its "
                                          "max_tokens reserved until it ends: the budget is passed by at most that")
    models: list[str] = Field(default_factory=list, description="only these model ids or adapter names count; "
                                                                "empty: all")


class TenantConfig(BaseModel):
    """One team, or one application: the keys it calls with and what it may use."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="what usage, metrics and logs "
                      "name it by")
    keys: list[str] = Field(default_factory=list, description="its API keys, each the key or `sha256:<hex>` of it")
    keys_env: str | None = Field(default=None, description="an environment variable holding more keys (or "
                                 "sha256: hashes), comma-separated")
    keys_file: str | None = Field(default=None, description="a file holding more keys (or sha256: hashes), one a "
                                  "line; blank lines and lines starting with # are skipped")
    admin: bool = Field(default=False, description="may load and unload adapters, read /v1/stats, /metrics and "
                                                   "every tenant's usage")
    weight: float = Field(default=1.0, gt=0, description="its share of a model's batch when tenants contend for it")
    max_concurrency: int | None = Field(default=None, ge=1, description="requests generating at once; beyond, 429 "
                                        "(rate_limit_exceeded); unset: no cap")
    requests_per_minute: int | None = Field(default=None, ge=1, description="model requests within a calendar "
                                            "minute; beyond, 429 (rate_limit_exceeded); unset: no limit")
    budgets: list[Budget] = Field(default_factory=list, description="token budgets, each per minute, day or month; "
                                  "spent, 429 (insufficient_quota) until the period ends")
    models: list[str] = Field(default_factory=list, description="the model ids it may use (an adapter also by its "
                                                                "base model's id); empty: all")

    def digests(self) -> list[str]:
        """The SHA-256 of each of its keys, from the file, ``keys_file`` and ``keys_env``."""
        entries = list(self.keys)
        if self.keys_env:
            entries += os.environ.get(self.keys_env, "").split(",")
        if self.keys_file:
            entries += [line for line in Path(self.keys_file).expanduser().read_text(encoding="utf-8").splitlines()
                        if not line.strip().startswith("#")]
        digests = []
        for entry in (e.strip() for e in entries):
            if entry:
                hashed = _HASHED.fullmatch(entry)
                digests.append(hashed.group(1).lower() if hashed else key_digest(entry))
        return digests

    def allows(self, model_id: str, base_id: str) -> bool:
        return not self.models or model_id in self.models or base_id in self.models


class UsageConfig(BaseModel):
    """The usage ledger: one JSON line per model request, appended to `ledger_dir/usage.jsonl`."""

    model_config = ConfigDict(extra="forbid")

    ledger_dir: str | None = Field(default=None, description="where the ledger is written (a persistent volume in "
                                   "a container); unset: `usage` in the BentoML home. Written only with tenants or "
                                   "api_keys set")
    rotate_mb: float = Field(default=64, gt=0, description="past this many MiB the file is renamed "
                                                           "usage-<UTC time>.jsonl and a new one begun")


def check_tenants(tenants: list[TenantConfig]) -> list[TenantConfig]:
    """Tenant names unique, and ``default`` left to the plain ``api_keys``."""
    names = [t.name for t in tenants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tenant names must be unique, repeated: {', '.join(repeated)}")
    if DEFAULT_TENANT in names:
        raise ValueError(f"the tenant name {DEFAULT_TENANT!r} is the plain api_keys'; pick another")
    return tenants


def with_plain_keys(tenants: list[TenantConfig], api_keys: list[str]) -> list[TenantConfig]:
    """The configured tenants, and the plain ``api_keys`` as the admin tenant ``default``."""
    return tenants + ([TenantConfig(name=DEFAULT_TENANT, keys=api_keys, admin=True)] if api_keys else [])


def key_table(tenants: list[TenantConfig]) -> dict[str, TenantConfig]:
    """SHA-256 of a key -> its tenant; a key of two tenants is an error."""
    table: dict[str, TenantConfig] = {}
    for tenant in tenants:
        for digest in tenant.digests():
            if table.get(digest, tenant) is not tenant:
                raise ValueError(f"a key ({key_id(digest)}) belongs to tenants {table[digest].name} and {tenant.name}")
            table[digest] = tenant
    return table

