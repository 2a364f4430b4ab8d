"""API errors and the handlers that turn every failure into OpenAI's error JSON.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

User errors are InvalidRequestError here and the engine's InvalidRequest (both carry the parameter); FastAPI's
422 for a body that does not parse or match the schema becomes a 400 like OpenAI's. Any other exception, a
ValueError from a bug included, is a 500 that names only the request id. The statuses an operator sees:

    400 invalid_request_error   a bad parameter (named in "param"), malformed JSON, a wrong type
    401 invalid_api_key         --api-key is set and the request has no or a wrong Bearer key
    404 model_not_found         "model" names another model
    413 request_too_large       the body is over --max-request-body-bytes
    429 rate_limit_exceeded     --max-queued-requests are already waiting (Retry-After: 1)
    405 invalid_request_error   a method the path does not take (Allow: lists those it takes)
    500 server_error            this request failed in the engine (the others keep running), or a bug; the
                                message names the request id (also in X-Request-Id), the log has the details
    503 server_error            the engine is not running, the server is draining for shutdown, or the
                                request waited longer than --max-queue-time (Retry-After: 1)

Every 4xx is logged at info (error_json): the request id, method and path, status, param and the message the client
got, so that the X-Request-Id a client reports finds the reason in the server log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.protocol import ErrorInfo, ErrorResponse
from server.api.request_id import current_request_id, current_request_line, new_request_id
from server.engine.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequest,
    QueueTimeoutError,
    RequestFailedError,
)

logger = logging.getLogger(__name__)
UNION_TAG = re.compile(r"str|int|float|bool|none|(list|dict|function-\w+|union|tagged-union)\[.*\]|[A-Z]\w*")


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


class InvalidRequestError(APIError, ValueError):
    """A request the server understood but cannot serve: a bad value of `param`."""

    status = HTTPStatus.BAD_REQUEST
    type = "invalid_request_error"


class ModelNotFoundError(APIError, ValueError):
    status = HTTPStatus.NOT_FOUND
    type = "invalid_request_error"
    code = "model_not_found"


class AuthenticationError(APIError):
    status = HTTPStatus.UNAUTHORIZED
    type = "invalid_request_error"
    code = "invalid_api_key"


class EngineUnavailableError(APIError):
    """The engine is not running (starting, stopped or failed), the server is draining, or the queue timed out."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, reason: str = "engine_unavailable") -> None:
        super().__init__(message, param)
        self.reason = reason  # the inflight_requests_rejected_total label


class OverloadedError(APIError):
    """--max-queued-requests are already waiting: retry later (429, like OpenAI's rate limit)."""

    status = HTTPStatus.TOO_MANY_REQUESTS
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class RequestTooLargeError(APIError):
    """The request body is larger than --max-request-body-bytes."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    type = "invalid_request_error"
    code = "request_too_large"


class ClientDisconnected(Exception):
    """The client went away before the response was ready; nobody is left to answer."""


RETRY_AFTER_SECONDS = 1  # what 429 and 503 answers suggest in Retry-After


def error_json(error: APIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The OpenAI error JSON of `error` with its status, `headers`, and WWW-Authenticate or Retry-After where they
    apply. A client error (4xx) is logged at info with the request id and its message: a 400 an operator is asked
    about can be found by the X-Request-Id the client got (500s are logged where they happen, with the details)."""
    if 400 <= error.status < 500:
        log_client_error(error)
    headers = dict(headers or {})
    if error.status == HTTPStatus.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    elif error.status in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE):
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return JSONResponse(error.to_response().model_dump(), status_code=error.status, headers=headers)


def log_client_error(error: APIError) -> None:
    """One info line for a 4xx: request id, method and path, status, param and the message the client got."""
    param = f" (param {error.param})" if error.param else ""
    logger.info("request %s (%s): %d %s%s: %s", current_request_id() or "-", current_request_line() or "-",
                error.status, error.code or error.type, param, error.message)


def internal_error(what: str, detail: object) -> APIError:
    """A 500 that tells the client `what` failed and the request id, never `detail`; the log gets both.

    Args:
        what: what failed, in words safe for any client ("the request failed in the engine").
        detail: the exception (or its text) for the log only: it may hold paths, prompts, internals.
    """
    request_id = current_request_id() or new_request_id()
    logger.error("request %s: %s: %s", request_id, what, detail)
    return APIError(f"{what} (request id {request_id}; the server log has the details)")


def internal_error_json(request_id: str) -> JSONResponse:
    """The 500 for an exception nobody handled (RequestIdMiddleware logged it with its traceback)."""
    return error_json(APIError(f"internal server error (request id {request_id}; the server log has the details)"))


def api_error_of(error: Exception) -> APIError | None:
    """The APIError the engine's own errors become (None for other exceptions)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, InvalidRequest):
        return InvalidRequestError(str(error), error.param)
    if isinstance(error, EngineOverloadedError):
        return OverloadedError(f"the server is overloaded, retry later: {error}")
    if isinstance(error, QueueTimeoutError):
        return EngineUnavailableError(str(error), reason="queue_timeout")
    if isinstance(error, EngineDeadError):
        return EngineUnavailableError(f"the engine is not running: {error}")
    if isinstance(error, RequestFailedError):
        return internal_error("the request failed in the engine", error)
    return None


def record_rejection(request: Request, error: APIError) -> None:
    """Count a 429 or 503 in inflight_requests_rejected_total."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is None:
        return
    if isinstance(error, OverloadedError):
        metrics.record_rejected("queue_full")
    elif isinstance(error, EngineUnavailableError):
        metrics.record_rejected(error.reason)


def param_of(location: tuple[str | int, ...]) -> str | None:
    """The OpenAI `param` for a pydantic error location: ("body", "messages", 0, "content") -> messages[0].content."""
    parts = [part for part in location if part != "body"]
    if not parts:
        return None
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif UNION_TAG.fullmatch(part):  # which member of a union pydantic tried: not a parameter
            continue
        else:
            text += f".{part}" if text else part
    return text or None


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """The first schema error of a request body as a 400 naming the parameter.

    For a union (stop: a string or a list of strings) pydantic reports one error per member; the error of
    the member whose type the value had (the list is too long, not "should be a string") is the one shown.
    """
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    param = param_of(tuple(first.get("loc", ())))
    if param is not None:
        same_param = [e for e in errors if re.fullmatch(re.escape(param) + r"([.\[].*)?",
                                                         param_of(tuple(e.get("loc", ()))) or "")]
        first = next((e for e in same_param if not str(e.get("type", "")).endswith("_type")), first)
    if first.get("type") == "json_invalid":
        return InvalidRequestError(
            f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip()
        )
    location = tuple(first.get("loc", ()))
    param = param_of(location)
    if first.get("type") == "missing":
        return InvalidRequestError(f"'{param}' is a required parameter", param)
    value = first.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) and param is not None else ""
    return InvalidRequestError(f"'{param}': {first.get('msg')}{shown}" if param else str(first.get("msg")), param)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error an OpenAI error JSON: APIError, the engine's errors, schema errors, 404/405 (its Allow
    lists HEAD with GET)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        record_rejection(request, exc)
        return error_json(exc)

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; never read by anyone

    @app.exception_handler(RequestValidationError)
    async def _schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_json(validation_error(exc))

    async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
        error = api_error_of(exc)
        assert error is not None, type(exc)
        record_rejection(request, error)
        return error_json(error)

    for engine_error in (InvalidRequest, EngineDeadError, EngineOverloadedError, QueueTimeoutError, RequestFailedError):
        app.add_exception_handler(engine_error, _engine_error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(str(exc.detail))
        error.status = HTTPStatus(exc.status_code)
        error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        headers = dict(exc.headers or {})
        allow = [method.strip() for method in headers.get("Allow", "").split(",") if method.strip()]
        if "GET" in allow and "HEAD" not in allow:  # every GET route answers HEAD too (head_requests.py)
            headers["Allow"] = ", ".join([*allow, "HEAD"])
        return error_json(error, headers)  # 405 keeps its Allow
    # Any other exception reaches RequestIdMiddleware: logged with the request id, a 500 naming only the id.
