"""`inflight-serve`: serve a model over the OpenAI API.

    inflight-serve [PATH] [--host 127.0.0.1] [--port 8000] [--device auto|cpu|cuda] ...

PATH is an engine directory (from inflight-build) or a Hugging Face checkpoint directory; without it the
bundled model (models/inflight-tiny) is served. Every option can also come from an INFLIGHT_* environment
variable or a --config file (see server/config.py for the precedence).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from server.config import (
    DEVICES,
    DTYPES,
    GENERATION_CONFIGS,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    LOG_LEVELS,
    LOGPROBS_MODES,
    QUANTIZATIONS,
    TOOL_CALL_PARSERS,
    ServerSettings,
    merge_settings,
)
from server.log import configure_logging
from server.process_exit import exit_now

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad command line; reported as one line on stderr with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; every option defaults to "not given" so other sources can fill it."""
    parser = _Parser(
        prog="inflight-serve",
        description="Serve a model over the OpenAI API (completions, chat completions, SSE streaming, /metrics).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("model", nargs="?", metavar="PATH", help="engine or HF checkpoint directory "
                        "(default: the bundled models/inflight-tiny)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", help="port to listen on (default 8000)")
    parser.add_argument("--device", choices=DEVICES, help="where the model runs (default auto)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights and KV cache dtype (default auto)")
    parser.add_argument(
        "--load-format", choices=LOAD_FORMATS, help="dummy: random weights from config.json (benchmarks)"
    )
    parser.add_argument("--max-model-len", help="prompt + output tokens per request (default: the engine's limit)")
    parser.add_argument("--enforce-eager", action="store_true", help="run every step eagerly (no CUDA graphs)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        help="plan and launch the next step while the device runs this one (default on)")
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction,
                        help="reuse the KV cache of prompt prefixes across requests (default on)")
    parser.add_argument("--kv-offload-gib", help="host memory (GiB per rank) keeping prefix-cache blocks evicted from "
                        "the GPU, copied back on a hit (default 0: off; no effect on the CPU)")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction,
                        help="run the engine core in its own process, apart from the HTTP server (default on)")
    parser.add_argument("--cpu-threads", help="torch intra-op threads of the engine on this node, shared by its "
                        "tensor-parallel ranks; the API process uses 1 (default: $OMP_NUM_THREADS, else the cores "
                        "this process may use less 1 for the API process)")
    parallel = parser.add_argument_group("tensor parallelism")
    parallel.add_argument("--tensor-parallel-size", "-tp", help="ranks (GPUs) to split the model over (default 1)")
    parallel.add_argument("--nnodes", help="hosts the ranks are spread over (default 1)")
    parallel.add_argument("--node-rank", help="this host's index, 0 to nnodes-1 (default 0)")
    parallel.add_argument("--master-addr", help="node 0's address, where the ranks meet (default 127.0.0.1)")
    parallel.add_argument("--master-port", help="node 0's rendezvous port; the next port is used too "
                          "(default: free ports, one node only)")
    parallel.add_argument("--headless", action="store_true",
                          help="nodes other than 0: run this node's workers only, no HTTP server")
    parser.add_argument("--served-model-name", help="the name clients use in \"model\" (default: directory name)")
    parser.add_argument("--max-num-seqs", help="requests running together in one step (default 256)")
    parser.add_argument("--max-num-batched-tokens", help="tokens in one step (default 2048)")
    kv = parser.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-memory-fraction", help="share of free device memory for the KV cache (default 0.9)")
    kv.add_argument("--num-kv-blocks", help="exact number of KV cache blocks")
    parser.add_argument("--block-size", help="tokens per KV cache block (default 16)")
    parser.add_argument("--max-queued-requests", help="waiting requests before new ones get 429 (default 1024)")
    parser.add_argument(
        "--max-queue-time", help="seconds a request may wait before it runs; then 503 (default: no limit)"
    )
    parser.add_argument("--max-request-body-bytes", help="larger request bodies get 413 (default 4194304)")
    parser.add_argument("--api-key", action="append", help="require 'Authorization: Bearer KEY' on /v1 routes; "
                        "repeat it or separate keys with commas to accept several")
    parser.add_argument("--protect-metrics", action="store_true", help="/metrics needs an API key too")
    parser.add_argument("--drain-timeout", help="seconds running requests may take to finish on SIGTERM/SIGINT; "
                        "the rest end with finish_reason \"abort\" (default 30)")
    parser.add_argument("--engine-stall-timeout", help="seconds without a finished engine step while requests are "
                        "pending before the engine counts as dead: /health 503, pending requests end with an error "
                        "(default 120)")
    parser.add_argument("--header-read-timeout", help="seconds a client may take to send a request's headers before "
                        "its connection is closed (default 15)")
    parser.add_argument(
        "--max-connections", help="open HTTP connections; further ones are closed at once (default 2048)"
    )
    parser.add_argument("--enable-docs", action="store_true", help="serve the API docs at /docs and /redoc")
    parser.add_argument("--generation-config", type=str.lower, choices=GENERATION_CONFIGS,
                        help="auto: requests that omit temperature, top_p, top_k, min_p, repetition_penalty or "
                        "max_tokens get the model's generation_config.json values; none: the OpenAI defaults "
                        "(default auto)")
    parser.add_argument("--logprobs-mode", type=str.lower, choices=LOGPROBS_MODES,
                        help="returned logprobs: of the model's raw distribution, or of the processed one sampled "
                        "from (after temperature, penalties, top-k/top-p) (default raw_logprobs)")
    parser.add_argument("--quantization", "-q", type=str.lower, choices=(*QUANTIZATIONS, "none"),
                        help="fp8: quantize a checkpoint's linear layers to FP8 while loading (an engine directory "
                        "runs as inflight-build built it; default none)")
    parser.add_argument("--kv-cache-dtype", type=str.lower, choices=KV_CACHE_DTYPES,
                        help="fp8: store the KV cache in FP8 (e4m3) with the checkpoint's per-layer KV scales (else "
                        "1.0): twice the tokens of a bfloat16 cache, whatever the weights' quantization; auto: the "
                        "model dtype (default auto)")
    parser.add_argument("--tool-call-parser", type=str.lower, choices=(*TOOL_CALL_PARSERS, "none"),
                        help="parse chat replies into tool_calls in this model family's format (default none)")
    parser.add_argument("--special-tokens-in-input", action="store_true",
                        help="tokenize the text users send with special tokens as control tokens (default: as plain "
                        "text, so users cannot forge chat roles)")
    parser.add_argument("--config", help="YAML or TOML file of options (names as above, with - or _)")
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, help="default info")
    return parser


def parse_settings(argv: Sequence[str] | None, environ: dict[str, str] | None = None) -> ServerSettings:
    """Turn a command line and environment into settings.

    Args:
        argv: arguments after the program name; None reads sys.argv.
        environ: the environment; None reads os.environ.

    Returns:
        The merged, validated settings. Raises UsageError or ValueError naming the problem.
    """
    given: dict[str, Any] = vars(build_parser().parse_args(argv))
    if "api_key" in given:  # repeated --api-key: several keys
        given["api_key"] = ",".join(given["api_key"])
    config_file = given.pop("config", None)
    return merge_settings(given, os.environ if environ is None else environ,
                          Path(config_file) if config_file is not None else None)


def _fail(message: str) -> NoReturn:
    print(f"inflight-serve: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind the server's TCP socket before the model loads; `_load_and_serve` listens on it once the model is loaded.

    Bound but not yet listening, the port is taken (a server that is listening there, or starts to, makes the bind
    fail) while connections to it are refused, as they would be with nothing there, until the model has loaded.

    Args:
        host: the address to bind (a name, an IPv4 or an IPv6 address).
        port: the TCP port.

    Returns:
        The bound socket. Raises ValueError naming host:port and what to do when it cannot be bound.
    """
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ValueError(_cannot_listen(host, port, error)) from None
    return listener


def _cannot_listen(host: str, port: int, error: OSError) -> str:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    hints: dict[int | None, str] = {
        errno.EADDRINUSE: "address already in use; stop what listens there or choose another --port",
        errno.EADDRNOTAVAIL: "no interface of this machine has that address; choose another --host",
        errno.EACCES: "permission denied; ports below 1024 need privileges, choose another --port",
    }
    reason = hints.get(error.errno, f"{error.strerror or error}; check --host and --port")
    return f"cannot listen on {address}: {reason}"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `inflight-serve`: parse, load the model, serve until interrupted."""
    if argv is None:
        argv = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in argv):
        build_parser().print_help()
        return
    try:
        settings = parse_settings(argv)
    except (UsageError, ValueError) as error:
        _fail(str(error))
    if settings.headless:  # another node's ranks: no HTTP server, no port
        configure_logging(settings.log_level)
        from server.launch import serve_headless

        try:
            exit_now(serve_headless(settings))
        except ValueError as error:
            _fail(str(error))
    try:
        listener = bind_listener(settings.host, settings.port)  # a port in use fails now, not after loading
    except ValueError as error:
        _fail(str(error))
    with listener:
        _load_and_serve(settings, listener)


def _load_and_serve(settings: ServerSettings, listener: socket.socket) -> None:
    """Load the model, then serve on `listener` until SIGTERM/SIGINT has drained the server."""
    configure_logging(settings.log_level)
    from server.engine import cpu_threads
    from server.launch import build_server

    previous_handler = signal.signal(signal.SIGTERM, _interrupt)  # while loading: stop now (nothing to drain)
    try:
        server = build_server(settings)
    except (ValueError, OSError) as error:  # the model cannot be loaded, the device is missing
        _fail(str(error).strip().splitlines()[0])
    except KeyboardInterrupt:  # SIGTERM or Ctrl-C while loading; the engine core process is gone already
        logging.getLogger("server").info("stopped while loading the model")
        # Not `return`: an interrupt that passed through C code which ran Python (PyRun_*) leaves CPython's
        # "unhandled KeyboardInterrupt" flag set even though it was caught here, and a normal exit then
        # re-raises SIGINT on the process (exit status -2, seen in CI). Nothing is left to tear down.
        exit_now(0)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    cpu_threads.apply(cpu_threads.api_threads(settings.cpu_threads, settings.engine_process, os.environ), "API")
    try:  # a second server bound the same port while this one loaded and listens there already
        listener.listen()
    except OSError as error:
        _fail(_cannot_listen(settings.host, settings.port, error))  # the engine core process is killed at exit
    try:
        server.run(sockets=[listener])  # returns after the drain that SIGTERM/SIGINT started (server/api/shutdown.py)
    except KeyboardInterrupt:  # Ctrl-C before the server installed its handlers
        pass
    exit_now(0)  # stopped and drained, the engine core process gone: skip the interpreter's slow teardown


if __name__ == "__main__":
    main()
