"""API errors and the handlers that turn every failure into OpenAI's error JSON.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

User errors are `ValueError`s (InvalidRequestError carries the parameter); FastAPI's 422 for a body
that does not parse or match the schema becomes a 400 like OpenAI's.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.protocol import ErrorInfo, ErrorResponse
from server.engine.errors import EngineDeadError, EngineOverloadedError

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
    """The engine is not running (starting, stopped or failed) or refused the request for capacity."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "server_error"


class ClientDisconnected(Exception):
    """The client went away before the response was ready; nobody is left to answer."""


def error_json(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == HTTPStatus.UNAUTHORIZED else None
    return JSONResponse(error.to_response().model_dump(), status_code=error.status, headers=headers)


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
    """The first schema error of a request body as a 400 naming the parameter."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    location = tuple(first.get("loc", ()))
    param = param_of(location)
    if first.get("type") == "missing":
        return InvalidRequestError(f"'{param}' is a required parameter", param)
    value = first.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) and param is not None else ""
    return InvalidRequestError(f"'{param}': {first.get('msg')}{shown}" if param else str(first.get("msg")), param)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error an OpenAI error JSON: APIError, ValueError, schema errors, 404/405, the unexpected."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_json(exc)

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; never read by anyone

    @app.exception_handler(RequestValidationError)
    async def _schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_json(validation_error(exc))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error_json(EngineUnavailableError(f"the engine is not running: {exc}"))

    @app.exception_handler(EngineOverloadedError)
    async def _overloaded(request: Request, exc: EngineOverloadedError) -> JSONResponse:
        response = error_json(EngineUnavailableError(f"the server is overloaded, retry later: {exc}"))
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
        return error_json(InvalidRequestError(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(str(exc.detail))
        error.status = HTTPStatus(exc.status_code)
        error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_json(error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        return error_json(APIError(f"internal server error: {type(exc).__name__}: {exc}"))
