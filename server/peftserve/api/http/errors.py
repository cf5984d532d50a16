"""The one mapping from peftserve.errors to HTTP statuses, and errors in OpenAI's JSON shape.

Messages are api/status.py's (bounded, INTERNAL for anything outside the hierarchy, logged there), so
a caller reads the same text over HTTP as over gRPC. The body is what the openai client parses into
its typed exceptions: {"error": {"message", "type", "param", "code"}}, code being the gRPC status name.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from peftserve import errors
from peftserve.api.status import retry_after, status_of
from peftserve.errors import quote

_STATUSES: dict[type[errors.PeftServeError], int] = {
    errors.InvalidRequest: 400,
    errors.FailedPrecondition: 400,
    errors.Unauthenticated: 401,
    errors.PermissionDenied: 403,
    errors.AdapterNotFound: 404,
    errors.PayloadTooLarge: 413,
    errors.CapacityExceeded: 429,
    errors.EngineFailure: 500,
    errors.Unavailable: 503,
}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
"""OpenAI's error types by status; any other status is a server_error."""


def http_status(exc: BaseException) -> int:
    """The HTTP status a caller sees for exc (500 for anything outside the hierarchy)."""
    for klass in type(exc).__mro__:
        status = _STATUSES.get(klass)
        if status is not None:
            return status
    return 500


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    error_type = _TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_of(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and body of exc; the message is gRPC's."""
    code, message = status_of(exc)
    status = http_status(exc)
    return status, error_body(status, message, code.name.lower())


def error_response(exc: BaseException) -> JSONResponse:
    """exc as a response, with Retry-After when it carries a hint (the openai client honours it)."""
    status, body = error_of(exc)
    seconds = retry_after(exc)
    return JSONResponse(body, status, headers={"Retry-After": seconds} if seconds is not None else None)


def _param(loc: tuple[Any, ...]) -> str:
    """'messages.0.content' from pydantic's location ('body', 'messages', 0, 'content')."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _validation_message(error: dict[str, Any]) -> tuple[str, str]:
    """A message naming the parameter, and the parameter, for one pydantic error."""
    param = _param(tuple(error.get("loc", ())))
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"unsupported parameter {quote(param)}: peftserve does not implement it", param
    if kind == "json_invalid":
        return "the request body is not valid JSON", "body"
    if kind == "missing":
        return f"{param} is required", param
    message = str(error.get("msg", "is not valid")).removeprefix("Value error, ")
    return f"{param}: {message}", param


async def _on_peftserve_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """Bodies that do not parse are 400 (not FastAPI's 422), naming the first bad parameter."""
    details = exc.errors() if isinstance(exc, RequestValidationError) else []
    message, param = _validation_message(details[0]) if details else ("the request is not valid", None)
    return JSONResponse(error_body(400, message, "invalid_argument", param), 400)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (unknown route, wrong method, body over the limit) in the same shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    message = {404: f"no route {quote(request.url.path)}", 413: "the request body is too large"}.get(
        status, str(detail)
    )
    headers = exc.headers if isinstance(exc, HTTPException) else None
    return JSONResponse(error_body(status, message, f"http_{status}"), status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error an app route raises leaves as OpenAI's error object."""
    app.add_exception_handler(errors.PeftServeError, _on_peftserve_error)
    app.add_exception_handler(Exception, _on_peftserve_error)  # a bug: 500, logged by status_of
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
