"""One error shape everywhere: OpenAI's ``{"error": {"message", "type", "param", "code"}}``, and one factory
per error a request can meet. Imports nothing of the project."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("bentochat.api")

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ErrorJSONResponse(JSONResponse):
    """ASCII-escaped JSON: an error may quote what the client sent, and must render whatever it was."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.kind = kind  # the error's type where OpenAI's differs from its status's (insufficient_quota)

    @property
    def type(self) -> str:
        return self.kind or ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return ErrorJSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


# One factory per error code a request can meet on its way to a model and back, one message each.

def invalid_value(param: str | None, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def context_length_exceeded(context: int, prompt_tokens: int, param: str, max_tokens: int | None = None) -> OpenAIError:
    asked = f" and max_tokens asks for {max_tokens} more" if max_tokens is not None else ""
    return OpenAIError(400, f"This model's maximum context length is {context} tokens; `{param}` holds {prompt_tokens} "
                            f"tokens{asked}.", param="max_tokens" if max_tokens is not None else param,
                       code="context_length_exceeded")


def model_not_found(model_id: str) -> OpenAIError:
    """Unknown, or one the key's tenant may not use: OpenAI's one answer for both."""
    return OpenAIError(404, f"The model `{model_id}` does not exist or you do not have access to it.", param="model",
                       code="model_not_found")


def model_not_supported(model_id: str, kind: str, hint: str = "does not support this endpoint",
                        param: str = "model") -> OpenAIError:
    return OpenAIError(400, f"The model `{model_id}` is an {kind} model and {hint}.", param=param,
                       code="model_not_supported")


def model_unavailable(model_id: str) -> OpenAIError:
    """None of the model's runners answers, or the one generating the answer stopped answering."""
    return OpenAIError(503, f"The model `{model_id}` is not available right now: its runners do not answer. "
                            "Retry later.", code="model_unavailable")


def queue_full(model_id: str, retry_after: int) -> OpenAIError:
    return OpenAIError(429, f"The model `{model_id}` is at capacity: its queue is full. Retry after {retry_after} s.",
                       code="queue_full", headers={"Retry-After": str(retry_after)})


def admin_only(what: str) -> OpenAIError:
    return OpenAIError(403, f"{what} is for admin keys; this key's tenant is not an admin.", code="admin_only")


def generation_failed(model_id: str, reason: str) -> OpenAIError:
    return OpenAIError(500, f"Generation with `{model_id}` failed: {reason}", code="generation_failed")


def adapter_load_failed(name: str, model_id: str, reason: str) -> OpenAIError:
    """A runner failed while loading an adapter, by a fault of its own (not of the adapter's files)."""
    return OpenAIError(500, f"Loading the adapter `{name}` on `{model_id}` failed on its runner: {reason}",
                       code="adapter_load_failed")


def client_closed() -> OpenAIError:
    return OpenAIError(499, "The client closed the request.", code="client_closed_request")


# Parts of a pydantic error location that name a member of a union type, not a field.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
_PARAM = re.compile(r"[A-Za-z_]\w*(\[\d+\]|\.[A-Za-z_]\w*)*")


def _param(loc: list) -> str:
    """``("messages", 0, "content", "str")`` -> ``messages[0].content``."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _TYPE_TAGS or not str(part).isidentifier():
            break
        else:
            param += ("." if param else "") + part
    return param


def _from_validation(exc: RequestValidationError) -> OpenAIError:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return OpenAIError(400, f"Invalid JSON in request body: {err.get('ctx', {}).get('error', err['msg'])}",
                           code="invalid_json")
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    param = _param([p for p in err.get("loc", ()) if p != "body"])
    # A model validator names the field it is about first: "content: a user message needs content".
    head, sep, rest = message.partition(": ")
    if sep and _PARAM.fullmatch(head):
        param, message = (f"{param}.{head}" if param else head), rest
    return OpenAIError(400, f"{param}: {message}" if param else message, param=param or None, code="invalid_value")


def install(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return _from_validation(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):  # 404, 405 (with its Allow header)
        return OpenAIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("unhandled error")
        return OpenAIError(500, "The server had an error while processing your request.").response()
