"""HTTP routes; each one hands its request to serving and returns what it gives back."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from server.api.errors import AuthenticationError
from server.api.openapi import GENERATE_ERROR_RESPONSES, V1_ERROR_RESPONSES
from server.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)
from server.api.serving import unless_disconnected
from server.api.streaming import HEADERS, MEDIA_TYPE


def key_matches(given: str, keys: tuple[str, ...]) -> bool:
    """True if `given` is one of `keys`; every key is compared, each in constant time, so timing tells nothing."""
    given_bytes = given.encode()
    matches = [hmac.compare_digest(given_bytes, key.encode()) for key in keys]
    return any(matches)


def require_api_key(request: Request) -> None:
    """Dependency of the /v1 routes: with --api-key set, the request must carry `Authorization: Bearer <key>`."""
    keys: tuple[str, ...] = request.app.state.api_keys
    if not keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key_matches(given.strip(), keys):
        raise AuthenticationError("missing or wrong API key: send 'Authorization: Bearer <key>'")


def require_api_key_for_metrics(request: Request) -> None:
    """Dependency of /metrics: a key is needed only with --protect-metrics."""
    if request.app.state.protect_metrics:
        require_api_key(request)


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=V1_ERROR_RESPONSES)
# stream=true: SSE events, each `data: <a chunk's JSON, or an error JSON>`, the last `data: [DONE]`
STREAM = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}}}


def to_response(result: BaseModel | AsyncIterator[str]) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(result, media_type=MEDIA_TYPE, headers=HEADERS)


@v1.post("/completions", responses={
    200: {"model": CompletionResponse, "content": STREAM}, **GENERATE_ERROR_RESPONSES})
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    serving = raw_request.app.state.serving_completion
    return to_response(await unless_disconnected(serving.create(request), raw_request))


@v1.post("/chat/completions", responses={
    200: {"model": ChatCompletionResponse, "content": STREAM}, **GENERATE_ERROR_RESPONSES})
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    serving = raw_request.app.state.serving_chat
    return to_response(await unless_disconnected(serving.create(request), raw_request))


@v1.get("/models")
async def list_models(raw_request: Request) -> ModelList:
    return raw_request.app.state.serving.models()


@router.get("/health", response_class=Response, responses={200: {"description": "Serving (empty body)"},
                                   503: {"description": "Loading, draining for shutdown, or the engine died"}})
async def health(raw_request: Request) -> Response:
    """200 while new requests are served; 503 while loading, draining for shutdown, or after the engine died."""
    ready = raw_request.app.state.serving.is_ready
    return Response(status_code=200 if ready else 503)


@router.get("/metrics", dependencies=[Depends(require_api_key_for_metrics)],
            responses={200: {"content": {"text/plain": {}}}, 401: {"model": ErrorResponse}})
async def metrics(raw_request: Request) -> Response:
    return Response(generate_latest(raw_request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


router.include_router(v1)
