"""The composition root: settings -> the engine (in its own process or a thread) -> the app -> the uvicorn server.

    ServerSettings ─▶ EngineCoreClient, its core in a spawned process (or a thread) ─▶ build_app ─▶ GracefulServer

Only this module knows every layer; the layers below know nothing of it (server/cli.py calls it).
"""

from __future__ import annotations

import logging

from server.api.app import build_app, uvicorn_config
from server.api.shutdown import GracefulServer
from server.config import ServerSettings, parallel_config
from server.engine.core_args import CoreArgs, EngineLoadArgs
from server.engine.engine_config import EngineConfig

logger = logging.getLogger("server")


def kv_offload_bytes(settings: ServerSettings) -> int:
    """--kv-offload-gib in bytes; 0 on the CPU, where the KV cache is in host memory already (said in the log)."""
    if not settings.kv_offload_gib:
        return 0
    import torch

    if settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available()):
        logger.warning("--kv-offload-gib %g has no effect on the CPU: the KV cache is in host memory already",
                       settings.kv_offload_gib)
        return 0
    return int(settings.kv_offload_gib * (1 << 30))


def core_args(settings: ServerSettings) -> CoreArgs:
    """What the engine core (and every tensor-parallel rank) is started with."""
    load = EngineLoadArgs(
        model=settings.model, device=settings.device, dtype=None if settings.dtype == "auto" else settings.dtype,
        load_format=settings.load_format, max_seq_len=settings.max_model_len, max_batch_size=settings.max_num_seqs,
        max_num_tokens=settings.max_num_batched_tokens, quantization=settings.quantization,
        kv_cache_dtype=settings.kv_cache_dtype,
    )
    config = EngineConfig(
        block_size=settings.block_size,
        num_kv_blocks=settings.num_kv_blocks,
        kv_cache_memory_fraction=settings.kv_cache_memory_fraction,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_queued_requests=settings.max_queued_requests,
        enforce_eager=settings.enforce_eager,
        async_scheduling=settings.async_scheduling,
        logprobs_mode=settings.logprobs_mode,
        enable_prefix_caching=settings.prefix_caching,
        kv_offload_bytes=kv_offload_bytes(settings),
    )
    return CoreArgs(load=load, config=config, max_queue_time=settings.max_queue_time, log_level=settings.log_level,
                    parallel=parallel_config(settings), cpu_threads=settings.cpu_threads)


def serve_headless(settings: ServerSettings) -> int:
    """Run this node's tensor-parallel ranks for node 0 (no HTTP server); returns the exit code."""
    from server.runner.multiproc_executor import run_headless_node

    return run_headless_node(core_args(settings))


def build_server(settings: ServerSettings) -> GracefulServer:
    """Load the model and build the uvicorn server for it (call .run(), or run it in a thread).

    With settings.engine_process (the default) the engine core is spawned in its own process, which loads the
    model; this process loads only the tokenizer. Otherwise the same core runs in a thread of this process.

    Args:
        settings: validated settings.

    Returns:
        A GracefulServer (a uvicorn.Server that drains on SIGTERM/SIGINT), not started. Raises
        ValueError when the model cannot be loaded.
    """
    from server.api.metrics import Metrics
    from server.engine.client.core_client import EngineCoreClient
    from server.engine.client.transports import ProcessTransport, ThreadTransport

    args = core_args(settings)
    metrics = Metrics()
    logger.info("loading %s on %s%s", settings.model, settings.device,
                " in the engine core process" if settings.engine_process else "")
    transport = ProcessTransport(args) if settings.engine_process else ThreadTransport(args)
    engine = EngineCoreClient(args, metrics, engine_stall_timeout=settings.engine_stall_timeout, transport=transport)
    engine.launch()
    app = build_app(settings, engine, metrics, device=engine.device, dtype=engine.dtype, vocab_size=engine.vocab_size)
    return GracefulServer(uvicorn_config(app, settings), app.state.serving, settings.drain_timeout)
