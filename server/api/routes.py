"""HTTP routes; each one hands its request to serving and returns what it gives back.

A generation request first gets the model's sampling defaults for the fields it omits (generation_defaults.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

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

HEALTHY_BODY = b'{"status":"ok"}'


def health_status(app_state: Any) -> str:
    """Why new requests cannot be served now ("loading", "draining", "dead"), or "ok"."""
    serving = app_state.serving
    if serving.draining:
        return "draining"
    if not app_state.engine_started:
        return "loading"
    return "ok" if serving.engine.is_running else "dead"


router = APIRouter()
v1 = APIRouter(prefix="/v1", responses=V1_ERROR_RESPONSES)  # the key (--api-key) is checked by auth.ApiKeyAuth
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
    request = raw_request.app.state.generation_defaults.apply(request)
    return to_response(await unless_disconnected(serving.create(request), raw_request))


@v1.post("/chat/completions", responses={
    200: {"model": ChatCompletionResponse, "content": STREAM}, **GENERATE_ERROR_RESPONSES})
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    serving = raw_request.app.state.serving_chat
    request = raw_request.app.state.generation_defaults.apply(request)
    return to_response(await unless_disconnected(serving.create(request), raw_request))


@v1.get("/models")
async def list_models(raw_request: Request) -> ModelList:
    return raw_request.app.state.serving.models()


HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Serving", "content": {"application/json": {"example": {"status": "ok"}}}},
    503: {"description": "Not serving: the engine is loading, the server is draining for shutdown, or the engine "
                         "died", "content": {"application/json": {"example": {"status": "draining"}}}},
}


@router.get("/health", response_class=Response, responses=HEALTH_RESPONSES)
async def health(raw_request: Request) -> Response:
    """{"status": "ok"} with 200 while new requests are served; else 503 and the reason: loading, draining, dead."""
    status = health_status(raw_request.app.state)
    if status == "ok":
        return Response(HEALTHY_BODY, media_type="application/json")
    return JSONResponse({"status": status}, status_code=503)


@router.get("/metrics", responses={200: {"content": {"text/plain": {}}}, 401: {"model": ErrorResponse}})
async def metrics(raw_request: Request) -> Response:
    """Prometheus metrics; with --api-key and --protect-metrics a key is needed."""
    return Response(generate_latest(raw_request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


router.include_router(v1)

