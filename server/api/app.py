"""The FastAPI application: engine lifetime (lifespan), middleware, error handlers, routes; and its uvicorn config.

    an engine client (server/launch.py builds it) ─▶ build_app ─▶ uvicorn_config ─▶ GracefulServer

A request passes, outermost first: LimitedH11Protocol (connection limit, header read timeout) ─▶
RecentErrorsMiddleware (the last error responses, for /dashboard) ─▶ RequestIdMiddleware (X-Request-Id, 500s) ─▶
ApiKeyAuth (401 before the body is read) ─▶ BodySizeLimit (413) ─▶ HeadAsGet (HEAD: the GET without its body) ─▶
the routes. Paths are exact: a trailing slash is a 404, never a redirect (Starlette builds the redirect's Location
from the client's Host header). Every 4xx is logged at info with its request id (errors.error_json).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from server.api.auth import ApiKeyAuth
from server.api.body_limit import BodySizeLimit
from server.api.dashboard import STATS_PATH, install_dashboard
from server.api.docs import install_docs
from server.api.errors import install_error_handlers, internal_error_json
from server.api.generation_defaults import GenerationDefaults
from server.api.head_requests import HeadAsGet
from server.api.http_protocol import limited_protocol
from server.api.metrics import Metrics
from server.api.openapi import install_openapi
from server.api.recent_errors import RecentErrors, RecentErrorsMiddleware
from server.api.request_id import RequestIdMiddleware
from server.api.routes import router
from server.api.serving import OpenAIServing
from server.api.serving_chat import OpenAIServingChat
from server.api.serving_completions import OpenAIServingCompletion
from server.config import ServerSettings
from server.engine.protocol import EngineClient

logger = logging.getLogger("server")


def build_app(settings: ServerSettings, engine: EngineClient, metrics: Metrics, *, device: str, dtype: str,
              vocab_size: int) -> FastAPI:
    """The application serving `engine`; it starts the engine on startup and stops it on shutdown.

    Args:
        settings: the server settings (model name, api keys, docs, body limit, address for the start-up log).
        engine: the engine client (not started yet).
        metrics: the Metrics whose registry /metrics serves.
        device, dtype: where and how the model runs, for the start-up log.
        vocab_size: the model's vocabulary size; token ids in requests must be below it.

    Returns:
        The FastAPI app.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        app.state.engine_started = True
        logger.info(
            "serving model %r from %s on %s (%s), %d KV blocks of %d tokens, max model len %d, at %s",
            settings.model_name, settings.model, device, dtype, engine.num_kv_blocks, engine.block_size,
            engine.max_model_len, settings.url,
        )
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="Inflight", summary="OpenAI-compatible LLM inference server", lifespan=lifespan,
                  docs_url=None, redoc_url=None, redirect_slashes=False)  # docs: install_docs, from this server
    app.state.generation_defaults = defaults = GenerationDefaults.load(settings.model, settings.generation_config)
    logger.info("generation config %s: %s", settings.generation_config, defaults.describe())
    serving = OpenAIServing(engine, settings.model_name, vocab_size, settings.special_tokens_in_input,
                            default_max_tokens=defaults.max_new_tokens)
    app.state.serving = serving
    app.state.serving_completion = OpenAIServingCompletion(serving)
    app.state.serving_chat = OpenAIServingChat(serving, tool_call_parser=settings.tool_call_parser)
    app.state.metrics = metrics
    app.state.recent_errors = RecentErrors()
    app.state.engine_started = False  # /health says "loading" until the lifespan started the engine
    install_error_handlers(app)
    app.include_router(router)
    open_paths = {"/health", "/openapi.json", *(install_docs(app) if settings.enable_docs else ())}
    # the dashboard's numbers are /metrics' (and need a key when it does); error messages only behind a key or none
    open_paths.update(install_dashboard(app, model=settings.model_name,
                                        with_error_messages=settings.protect_metrics or not settings.api_keys))
    if not settings.protect_metrics:
        open_paths.update(("/metrics", STATS_PATH))
    install_openapi(app, frozenset(open_paths) if settings.api_keys else None)
    app.add_middleware(HeadAsGet)  # the last added runs first: this one next to the routes
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=settings.api_keys, open_paths=open_paths)
    app.add_middleware(RequestIdMiddleware, error_response=internal_error_json)
    app.add_middleware(RecentErrorsMiddleware, errors=app.state.recent_errors)
    return app


def uvicorn_config(app: FastAPI, settings: ServerSettings) -> uvicorn.Config:
    """The uvicorn config serving `app` at settings.host:port, with the limits against slow clients.

    Always the h11 protocol (uvicorn's httptools one would lack the limits; uvicorn picks uvloop when installed).
    """
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          access_log=settings.log_level == "debug", timeout_graceful_shutdown=5,
                          http=limited_protocol(settings.header_read_timeout, settings.max_connections))
