"""One error shape everywhere: OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openai_api.protocol import ErrorBody, ErrorResponse

logger = logging.getLogger("bentochat.api")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=ERROR_TYPES.get(self.status, "server_error"),
                                             param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _from_validation(exc: RequestValidationError) -> OpenAIError:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return OpenAIError(400, f"Invalid JSON in request body: {err.get('ctx', {}).get('error', err['msg'])}",
                           code="invalid_json")
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if loc:  # the field, with list indices: messages[1]
        param = str(loc[0]) + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
        message = f"{param}: {message}"
    else:  # model-level validators name their field first: "logprobs: not supported"
        param = message.split(":", 1)[0] if ":" in message else None
    return OpenAIError(400, message, param=param, code="invalid_value")


def install(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return _from_validation(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("unhandled error")
        return OpenAIError(500, "The server had an error while processing your request.").response()
