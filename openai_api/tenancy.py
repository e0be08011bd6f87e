"""What a tenant's key may do on the ``/v1`` routes: the routes for admins only, and ``GET /v1/usage``,
its usage from the ledger (``ledger.py``) and its budgets as they stand (``quotas.py``). The models it
may use are ``ids.allowed``'s, which ``Registry.get`` asks on every route. Without keys there is no
tenant, and every route is everyone's."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import Query, Request

from ledger import usage_page
from openai_api.errors import OpenAIError, admin_only, invalid_value
from openai_api.ids import ACCOUNT


def require_admin(what: str) -> None:
    """Refuses a tenant that is not an admin (403); without keys, everyone is."""
    account = ACCOUNT.get()
    if account is not None and not account.tenant.admin:
        raise admin_only(what)


async def usage(request: Request, start_time: int | None = None, end_time: int | None = None,
                bucket_width: Literal["1m", "1h", "1d"] = "1d", tenants: list[str] = Query(default=[]),
                group_by: list[Literal["model", "key_id"]] = Query(default=[])) -> dict:
    """OpenAI's usage API (completions' shape): tokens and model requests per tenant in time buckets from
    ``start_time`` (unset: today, UTC) to ``end_time`` (unset: now), from the usage ledger. A user key
    sees its own tenant's; an admin key those of ``tenants`` (unset: all). Extension: ``budgets``, the
    budgets of those tenants as they stand."""
    quotas, account = getattr(request.app.state, "quotas", None), ACCOUNT.get()
    if quotas is None or quotas.ledger is None or account is None:
        raise OpenAIError(404, "Usage is recorded only where tenants or api_keys are configured.", code="usage_off")
    if not account.tenant.admin:
        if set(tenants) - {account.tenant.name}:
            raise admin_only("Usage of other tenants")
        tenants = [account.tenant.name]
    start = start_time if start_time is not None else int(time.time()) // 86400 * 86400
    try:
        page = await asyncio.to_thread(usage_page, quotas.ledger, set(tenants) or None, start, end_time, bucket_width,
                                       group_by)
    except ValueError as e:
        raise invalid_value("start_time", str(e)) from None
    page["budgets"] = {name: quotas.budgets(name) for name in sorted(set(tenants) or quotas.states)
                       if name in quotas.states}
    return page
