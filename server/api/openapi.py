"""The OpenAPI document as clients meet the server: OpenAI error responses instead of FastAPI's 422, and its auth.

FastAPI documents a 422 for every route with a body; this server answers 400 (see errors.py). The routes
declare their statuses with `ERROR_RESPONSES`; `install_openapi` drops the 422s and the schemas only they use.
The bearer scheme is always declared (components.securitySchemes.bearer); the operations that need a key
(every /v1 one, /metrics with --protect-metrics) require it when --api-key is set, as the server does.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.api.protocol import ErrorResponse

_ERROR = {"model": ErrorResponse}
# Statuses every /v1 route may answer, each with the OpenAI error JSON.
V1_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {**_ERROR, "description": "Missing or wrong API key (--api-key)"},
    503: {**_ERROR, "description": "The engine is not running or the server is shutting down"},
}
# Statuses of the generating routes, on top of V1_ERROR_RESPONSES.
GENERATE_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "A bad parameter (named in error.param), malformed JSON or a wrong type"},
    404: {**_ERROR, "description": "The model is not served here"},
    413: {**_ERROR, "description": "The body is larger than --max-request-body-bytes"},
    429: {**_ERROR, "description": "--max-queued-requests are already waiting; retry after Retry-After seconds"},
    500: {**_ERROR, "description": "This request failed in the engine"},
    503: {**_ERROR, "description": "The engine is not running, the server is shutting down, or the request "
                                   "waited longer than --max-queue-time"},
}
_FASTAPI_ONLY_SCHEMAS = ("HTTPValidationError", "ValidationError")
SECURITY_SCHEME = "bearer"
BEARER = {"type": "http", "scheme": "bearer", "description": "One of the keys given with --api-key"}


def install_openapi(app: FastAPI, open_paths: frozenset[str] | None) -> None:
    """Make app.openapi() document 400s instead of FastAPI's 422s, and the bearer key where one is needed.

    Args:
        app: the application.
        open_paths: the paths served without a key (ApiKeyAuth's); None when --api-key is not set.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            for route_path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
                    if open_paths is not None and route_path not in open_paths:
                        operation["security"] = [{SECURITY_SCHEME: []}]
            components = schema.setdefault("components", {})
            for name in _FASTAPI_ONLY_SCHEMAS:
                components.get("schemas", {}).pop(name, None)
            components["securitySchemes"] = {SECURITY_SCHEME: BEARER}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

