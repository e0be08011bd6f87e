"""Tenants' quotas, checked before a request is queued: the models a tenant may use, its concurrency cap,
its requests per minute and its token budgets (per calendar minute, day or month, UTC; prompt and
completion counted apart). Each model request is an ``Account``: the key middleware opens it
(``ids.ACCOUNT``), the route admits it once it knows the model, the prompt's tokens and ``max_tokens``
(``Account.admit``: refused with OpenAI's 429, else its prompt and ``max_tokens`` reserved), the text
stream counts what is generated, and the middleware closes it when the response has been sent:
the reservation is released, the tokens used counted, one record appended to the usage ledger and
the tenant's Prometheus counters advanced. At start the budgets' state is rebuilt from the ledger.

A completion budget admits a request while some of it is left: the request may pass it by at most
its own ``max_tokens``, since every other request under way holds its own ``max_tokens`` reserved.
A prompt budget is exact: a prompt that would pass it is refused.
"""

from __future__ import annotations

import calendar
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.cookies import CookieError, SimpleCookie

import bentoml

from ledger import Ledger
from models.tenants import Budget, TenantConfig, key_digest, key_id
from openai_api.errors import OpenAIError, model_not_found

PROMPT, COMPLETION = 0, 1
KINDS = ("prompt", "completion")
REQUESTS = bentoml.metrics.Counter("bentochat_tenant_requests", "Model requests per tenant, by HTTP status",
                                   labelnames=["tenant", "model", "status"])
TOKENS = bentoml.metrics.Counter("bentochat_tenant_tokens", "Tokens used per tenant (kind: prompt or completion)",
                                 labelnames=["tenant", "model", "kind"])


def window(period: str, now: float) -> tuple[float, float]:
    """The calendar minute, day or month (UTC) holding ``now``: its start and end, epoch seconds."""
    if period == "minute":
        start = now // 60 * 60
        return start, start + 60
    if period == "day":
        start = now // 86400 * 86400
        return start, start + 86400
    t = datetime.fromtimestamp(now, timezone.utc)
    start = datetime(t.year, t.month, 1, tzinfo=timezone.utc).timestamp()
    return start, start + calendar.monthrange(t.year, t.month)[1] * 86400


def duration(seconds: float) -> str:
    """As OpenAI's x-ratelimit-reset-* headers write a time: ``20ms``, ``59s``, ``6m0s``, ``2h3m0s``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = math.ceil(seconds)
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s"


@dataclass
class Window:
    """One budget's use within its current period; ``reserved`` is what requests under way hold."""

    budget: Budget
    start: float = 0.0
    end: float = 0.0
    used: list[int] = field(default_factory=lambda: [0, 0])
    reserved: list[int] = field(default_factory=lambda: [0, 0])

    def roll(self, now: float) -> None:
        if now >= self.end:
            self.start, self.end = window(self.budget.period, now)
            self.used = [0, 0]

    def limit(self, kind: int) -> int | None:
        return self.budget.prompt_tokens if kind == PROMPT else self.budget.completion_tokens

    def left(self, kind: int) -> int | None:
        limit = self.limit(kind)
        return None if limit is None else limit - self.used[kind] - self.reserved[kind]

    def counts(self, model: str, adapter: str | None) -> bool:
        models = self.budget.models
        return not models or model in models or (adapter is not None and adapter in models)


class TenantState:
    """A tenant's requests under way, its requests in the current minute and its budgets' windows."""

    def __init__(self, tenant: TenantConfig):
        self.tenant = tenant
        self.windows = [Window(b) for b in tenant.budgets]
        self.in_flight = 0
        self.minute = Window(Budget(period="minute"))  # used[0]: requests admitted within it

    def roll(self, now: float) -> None:
        for w in (*self.windows, self.minute):
            w.roll(now)


@dataclass
class Account:
    """One request of a tenant's key, from the middleware's opening to its closing."""

    quotas: Quotas
    tenant: TenantConfig
    key_id: str
    started: float = field(default_factory=time.monotonic)
    model: str | None = None  # admitted (or refused) for this model: a ledger record is due
    adapter: str | None = None
    admitted: bool = False
    reserved: tuple[int, int] = (0, 0)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those the runner's prefix cache gave
    completion_tokens: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def allows(self, model_id: str, base_id: str) -> bool:
        return self.tenant.allows(model_id, base_id)

    def admit(self, model_id: str, base_id: str, prompt_tokens: int, max_tokens: int) -> None:
        """Reserve ``prompt_tokens`` and ``max_tokens`` (all choices') for a request on ``model_id`` (an
        adapter of ``base_id``, or ``base_id`` itself), or raise the OpenAI error that refuses it."""
        self.quotas.admit(self, model_id, base_id, prompt_tokens, max_tokens)

    def generated(self, tokens: int, cached: int = 0) -> None:
        """A sequence has ended with ``tokens`` generated, its prompt's ``cached`` tokens from the prefix cache."""
        self.completion_tokens += tokens
        self.cached_tokens += cached

    def close(self, status: int) -> None:
        self.quotas.close(self, status)

    def budget_text(self) -> str:
        """The tenant's budgets as a line for the chat page: what is left of each, and when it renews."""
        now = self.quotas.clock()
        return "; ".join(
            f"{b[f'{kind}_tokens']['remaining']:,} of {b[f'{kind}_tokens']['limit']:,} {kind} tokens left this "
            f"{b['period']}{' on ' + ', '.join(b['models']) if b['models'] else ''} (renews in "
            f"{duration(b['resets_at'] - now)})"
            for b in self.quotas.budgets(self.tenant.name) for kind in KINDS if b[f"{kind}_tokens"])


class Quotas:
    """Every tenant's quota state, in this gateway process; the ledger its memory across restarts."""

    def __init__(self, tenants: list[TenantConfig], clock=time.time):
        self.states = {t.name: TenantState(t) for t in tenants}
        self.clock = clock
        self.ledger: Ledger | None = None

    def keep(self, ledger: Ledger) -> None:
        """Record every request in ``ledger`` from now on; each budget's use in its current period, and
        the requests of this minute, are read back from it first."""
        self.ledger, now = ledger, self.clock()
        for state in self.states.values():
            state.roll(now)
        since = min((w.start for s in self.states.values() for w in (*s.windows, s.minute)), default=now)
        for record in ledger.records(since):
            state = self.states.get(record.get("tenant"))
            if state is None or record.get("status") == 429:
                continue
            t = record["time"]
            if t >= state.minute.start:
                state.minute.used[0] += 1
            for w in state.windows:
                if t >= w.start and w.counts(record["model"], record.get("adapter")):
                    w.used[PROMPT] += record["prompt_tokens"]
                    w.used[COMPLETION] += record["completion_tokens"]

    def open(self, tenant: TenantConfig, key_id: str) -> Account:
        return Account(self, tenant, key_id)

    def admit(self, account: Account, model_id: str, base_id: str, prompt_tokens: int, max_tokens: int) -> None:
        if not account.allows(model_id, base_id):
            raise model_not_found(model_id)
        state, now = self.states[account.tenant.name], self.clock()
        state.roll(now)
        account.model, account.adapter = base_id, (model_id if model_id != base_id else None)
        windows = [w for w in state.windows if w.counts(base_id, account.adapter)]
        tenant = account.tenant
        try:
            if tenant.max_concurrency is not None and state.in_flight >= tenant.max_concurrency:
                raise _refused("requests", f"Tenant `{tenant.name}` has {state.in_flight} requests under way, its "
                                           f"limit (max_concurrency); retry when one has ended.", 1)
            if tenant.requests_per_minute is not None and state.minute.used[0] >= tenant.requests_per_minute:
                raise _refused("requests", f"Tenant `{tenant.name}` has made its {tenant.requests_per_minute} requests "
                                           "of this minute (requests_per_minute).", state.minute.end - now)
            for w in windows:
                prompt_left, completion_left = w.left(PROMPT), w.left(COMPLETION)
                if prompt_left is not None and prompt_tokens > prompt_left:
                    raise _spent(tenant.name, w, "prompt", f"{max(prompt_left, 0)} are left and the prompt holds "
                                                           f"{prompt_tokens}", now)
                if completion_left is not None and completion_left <= 0 and max_tokens:  # embeddings generate none
                    raise _spent(tenant.name, w, "completion", "none are left", now)
        except OpenAIError:
            account.headers = self._headers(state, windows, now)
            raise
        state.in_flight += 1
        state.minute.used[0] += 1
        account.admitted, account.reserved, account.prompt_tokens = True, (prompt_tokens, max_tokens), prompt_tokens
        for w in windows:
            w.reserved[PROMPT] += prompt_tokens
            w.reserved[COMPLETION] += max_tokens
        account.headers = self._headers(state, windows, now)

    def close(self, account: Account, status: int) -> None:
        """The request has been answered with ``status``: release what it reserved, count what it used,
        and record it."""
        if account.model is None:
            return
        state, now = self.states[account.tenant.name], self.clock()
        if account.admitted:
            state.in_flight -= 1
            for w in state.windows:
                if w.counts(account.model, account.adapter):
                    w.reserved[PROMPT] -= account.reserved[PROMPT]
                    w.reserved[COMPLETION] -= account.reserved[COMPLETION]
                    w.roll(now)
                    w.used[PROMPT] += account.prompt_tokens
                    w.used[COMPLETION] += account.completion_tokens
        REQUESTS.labels(tenant=account.tenant.name, model=account.model, status=str(status)).inc()
        for kind, tokens in zip(KINDS, (account.prompt_tokens, account.completion_tokens)):
            if tokens:
                TOKENS.labels(tenant=account.tenant.name, model=account.model, kind=kind).inc(tokens)
        if self.ledger is not None:
            self.ledger.append({
                "time": round(now, 3), "tenant": account.tenant.name, "key_id": account.key_id,
                "model": account.model, "adapter": account.adapter, "prompt_tokens": account.prompt_tokens,
                "cached_tokens": account.cached_tokens, "completion_tokens": account.completion_tokens,
                "latency_ms": round((time.monotonic() - account.started) * 1000), "status": status})

    def _headers(self, state: TenantState, windows: list[Window], now: float) -> list[tuple[bytes, bytes]]:
        """OpenAI's x-ratelimit-* headers: requests from requests_per_minute, tokens from the budget (prompt or
        completion) with the fewest tokens left; each only where such a limit is set."""
        headers = []
        if state.tenant.requests_per_minute is not None:
            limit = state.tenant.requests_per_minute
            headers += _limit_headers("requests", limit, limit - state.minute.used[0], state.minute.end - now)
        left = [(w.left(kind), w.limit(kind), w.end) for w in windows for kind in (PROMPT, COMPLETION)
                if w.limit(kind) is not None]
        if left:
            remaining, limit, end = min(left)
            headers += _limit_headers("tokens", limit, remaining, end - now)
        return headers

    def budgets(self, tenant: str) -> list[dict]:
        """A tenant's budgets as they stand: for each, the tokens used, reserved and left of each kind."""
        state, now = self.states[tenant], self.clock()
        state.roll(now)
        return [{"period": w.budget.period, "models": w.budget.models or None, "resets_at": int(w.end),
                 **{f"{name}_tokens": None if w.limit(kind) is None else {
                     "limit": w.limit(kind), "used": w.used[kind], "reserved": w.reserved[kind],
                     "remaining": max(0, w.left(kind))} for kind, name in enumerate(KINDS)}}
                for w in state.windows]


def _limit_headers(what: str, limit: int, remaining: int, reset_s: float) -> list[tuple[bytes, bytes]]:
    return [(f"x-ratelimit-limit-{what}".encode(), str(limit).encode()),
            (f"x-ratelimit-remaining-{what}".encode(), str(max(0, remaining)).encode()),
            (f"x-ratelimit-reset-{what}".encode(), duration(reset_s).encode())]


def _refused(what: str, message: str, retry_after_s: float) -> OpenAIError:
    return OpenAIError(429, message, code="rate_limit_exceeded", kind=what,
                       headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


def _spent(tenant: str, w: Window, kind: str, detail: str, now: float) -> OpenAIError:
    models = f" (on {', '.join(w.budget.models)})" if w.budget.models else ""
    return OpenAIError(429, f"Tenant `{tenant}` has spent its {w.budget.period} budget of {w.limit(KINDS.index(kind))} "
                            f"{kind} tokens{models}: {detail}. It renews in {duration(w.end - now)}.",
                       code="insufficient_quota", kind="insufficient_quota",
                       headers={"Retry-After": str(max(1, math.ceil(w.end - now)))})


class Sessions:
    """The chat page's sessions signed in with a key (Gradio's session token -> the key's SHA-256), so
    that its answers count to the key's tenant as the API's do; the last ``size`` sign-ins remembered."""

    def __init__(self, keys: dict[str, TenantConfig], quotas: Quotas, size: int = 10_000):
        self.keys, self.quotas, self.size = keys, quotas, size
        self._digests: OrderedDict[str, str] = OrderedDict()

    def signed_in(self, token: str, key: str) -> None:
        self._digests[token] = key_digest(key)
        if len(self._digests) > self.size:
            self._digests.popitem(last=False)

    def account(self, cookie: str | None) -> Account | None:
        """A new account for a request of the session whose cookies are ``cookie``; None: not signed in."""
        cookies = SimpleCookie()
        try:
            cookies.load(cookie or "")
        except CookieError:
            return None
        for name, morsel in cookies.items():
            digest = self._digests.get(morsel.value) if name.startswith("access-token-") else None
            if digest in self.keys:
                return self.quotas.open(self.keys[digest], key_id(digest))
        return None
