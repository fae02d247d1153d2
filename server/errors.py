"""One error object for every error the server sends (DESIGN section 5):

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

in a JSON body with a 4xx/5xx status, or as the last event of a stream before `[DONE]`. This
module holds that object (its schema for the OpenAPI document too), the exception endpoints raise
to send one, and the handlers that turn every other failure (bad JSON, unknown path, wrong
method, validation, an unhandled exception) into it. Messages quote at most a short prefix of a
bad value, so a huge invalid body never earns a huge error.
"""

from __future__ import annotations

from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

QUOTE_LIMIT = 40  # characters of a bad value an error message may repeat

# The `type` of an error, by status, when the raiser names none (OpenAI's names where they exist).
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed",
         500: "internal_error", 503: "unavailable"}

DESCRIPTIONS = {400: "The body is not valid JSON", 401: "Missing or wrong API key",
                404: "Unknown path or model", 405: "Method not allowed on this path",
                413: "Body, prompt or text too large", 422: "A field is invalid (the message names it)",
                429: "Too many requests waiting; retry after Retry-After seconds",
                499: "The client closed the connection first", 500: "The engine failed",
                503: "Shutting down or not ready; retry after Retry-After seconds"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail = Field(description="what went wrong; `param` names the field at fault")


class APIError(Exception):
    """Raise to answer with the error object: status, message, optional param, type, code, headers."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 headers: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers, self.code = status, message, param, headers, code
        self.type = type_ or TYPES.get(status, "internal_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    # A message quoting a client's value may hold a lone surrogate, which no UTF-8 body can carry.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return APIError(status, message, type_, param, headers).response()


def error_responses(*statuses: int) -> dict:
    """The `responses=` of a route: each status it can send, with the error object's schema."""
    return {s: {"model": ErrorResponse, "description": DESCRIPTIONS[s]} for s in statuses}


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """repr of a value cut to `limit` characters (with how much was left out)."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 8:
        text = repr(value)[:limit]
        return f"{text}... ({len(value)} items)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# pydantic names the member of a union in an error's location ("list[int]", "str", ...)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "tuple", "bytes", "none"}


def _location(err: dict) -> list[str]:
    """The field path of an error: names and list indexes, without "body"/"query" or union tags."""
    return [str(p) for p in err.get("loc", ())[1:]
            if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]


def _param(err: dict) -> str | None:
    return ".".join(p for p in _location(err) if not p.isdigit()) or None


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors: the first one, its value quoted short, and how
    many other fields are also wrong (a union's other members do not count)."""
    if not errors:
        return "invalid request", None
    err = errors[0]
    param = _param(err)
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if "prompt and token_ids" in msg or "text and token_ids" in msg:
        msg, param = msg, "prompt" if "prompt" in msg else "text"
    elif param is not None:
        if err.get("type") == "missing":
            msg = f"{param} is required"
        else:
            msg = f"{'.'.join(_location(err))}={quote(err.get('input'))} is invalid: {msg}"
    others = len({_param(e) for e in errors[1:]} - {param})
    if others:
        msg += f" (and {others} more field{'s' if others > 1 else ''} with problems)"
    return msg, param


def install_error_handlers(app: FastAPI, count: Callable[[str], None] = lambda reason: None) -> None:
    """Every error the app sends becomes the error object; `count(reason)` sees each rejection."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        if errors and errors[0].get("type") == "json_invalid":
            count("bad_json")
            pos = errors[0].get("loc", ("body", "?"))[-1]
            return error_response(400, f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')} "
                                       f"(at character {pos})")
        count("validation")
        message, param = validation_message(errors)
        return error_response(422, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = e.detail if isinstance(e.detail, str) else "request failed"
        if e.status_code == 404:
            message = f"no route {request.url.path[:QUOTE_LIMIT]!r}: see /docs for the API"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path[:QUOTE_LIMIT]!r}"
        elif e.status_code == 400:
            message = "the body could not be read"
        return error_response(e.status_code, message, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unhandled(request: Request, e: Exception):
        # (the server logs the traceback: Starlette re-raises after this response is sent)
        return error_response(500, f"internal error: {type(e).__name__}")
