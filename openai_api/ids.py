"""Ids: of the request being handled (``x-request-id``, which every log line names), of its client (the
API key it was accepted with, its tenant and account, and whether that tenant may use a model), of the
objects the API returns (``chatcmpl-…``, ``resp_…``), and of a sequence in its runner. Imports nothing of
the project."""

from __future__ import annotations

import contextvars
import uuid

# The request being handled, set by middleware.RequestIds for everything that runs on its behalf.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("bentochat_request_id", default=None)
# The ASGI scope's entry holding the API key a request was accepted with, set by middleware.ApiKeys
# (absent without keys): the Responses API keeps each stored response to its key.
API_KEY = "bentochat.api_key"
# The tenant a request is served for and its weight, (name, weight), set by the key middleware where
# tenants are configured (None otherwise): the runner shares its batch between tenants by weight.
TENANT: contextvars.ContextVar[tuple[str, float] | None] = contextvars.ContextVar("bentochat_tenant", default=None)
# The request's account with its tenant's quotas (a ``quotas.Account``), set by the key middleware where
# keys are configured (None otherwise): the routes admit a model request with it, and count its tokens.
ACCOUNT: contextvars.ContextVar = contextvars.ContextVar("bentochat_account", default=None)


def allowed(model_id: str, base_id: str) -> bool:
    """Whether the request's tenant (if any) may use the model ``model_id`` (an adapter of ``base_id``, or
    ``base_id`` itself)."""
    account = ACCOUNT.get()
    return account is None or account.allows(model_id, base_id)


def new_id(prefix: str) -> str:
    """A new object id: ``prefix`` with its separator, as OpenAI writes each kind (``chatcmpl-``, ``resp_``)."""
    return f"{prefix}{uuid.uuid4().hex}"


def sequence_id() -> str:
    """A sequence's id in its runner: the request's own (x-request-id), so that the runner's log lines
    name it, and a suffix that keeps choices and retries apart."""
    return f"{REQUEST_ID.get() or new_id('req-')}-{uuid.uuid4().hex[:8]}"
