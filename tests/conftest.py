"""Shared fixtures: free loopback ports, tiny random models with a tokenizer, real uvicorn servers.

    tiny_llama_dir ── random LlamaForCausalLM + tokenizer (+ chat template), saved as an HF checkpoint
    tiny_llama_server ── the real server (its engine core in a thread: it can be inspected) on it, uvicorn
                         on 127.0.0.1:<free port>, in a thread
    start_server / serve_app ── fixtures returning functions that start more servers
    serve_cli_fn ── `inflight-serve ARGS` in a subprocess (optionally with slowed-down engine steps)

Test modules take everything here as fixtures, never by `import conftest`: with several conftest.py
files and no packages, that name is ambiguous.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO_ROOT / "models" / "inflight-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# `inflight-serve ARGS` with every engine step slowed down by STEP_SECONDS (the tiny models alone finish before a
# test can act). The patch is at the top of the main script, so that the engine core process (spawned: it imports
# the main script as __mp_main__) is patched too.
SLOW_SERVE = (
    "import os, sys, time\n"
    "from server.engine.core.engine_core import EngineCore\n"
    "step, seconds = EngineCore.step, float(os.environ['INFLIGHT_TEST_STEP_SECONDS'])\n"
    "EngineCore.step = lambda self: (time.sleep(seconds), step(self))[1]\n"
    "if __name__ == '__main__':\n"
    "    from server.cli import main\n"
    "    main(sys.argv[1:])\n"
)


def serve_cli(args: list[str], log: Path, port: int, *, step_seconds: float | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `inflight-serve ARGS` on `port` in a subprocess whose output goes to `log`; return once /health is 200.

    Args:
        args: the command line (the port comes from $INFLIGHT_PORT unless args give --port).
        log: the server's stdout and stderr.
        port: where it listens.
        step_seconds: slow every engine step down by this much (in the engine core process too).
        env: more environment variables (INFLIGHT_* of the test run are dropped).
    """
    environ = {key: value for key, value in os.environ.items() if not key.startswith("INFLIGHT_")}
    environ.update({"PYTHONPATH": str(REPO_ROOT), "INFLIGHT_PORT": str(port), **(env or {})})
    command = [sys.executable, "-m", "server"]
    if step_seconds is not None:
        script = log.parent / "slow_serve.py"
        script.write_text(SLOW_SERVE)
        command = [sys.executable, str(script)]
        environ["INFLIGHT_TEST_STEP_SECONDS"] = str(step_seconds)
    process = subprocess.Popen([*command, *args], cwd=REPO_ROOT, env=environ, stdout=log.open("w"),
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    pytest.fail(f"the server did not start:\n{log.read_text()}")


@pytest.fixture(scope="session")
def serve_cli_fn():
    """serve_cli(args, log, port, step_seconds=None, env=None) -> the running `inflight-serve` subprocess."""
    return serve_cli


@pytest.fixture
def port() -> int:
    """A free loopback port."""
    return free_port()


@pytest.fixture(scope="session")
def free_port_fn():
    """free_port() -> a free loopback port, for tests that start several servers."""
    return free_port


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """models/inflight-tiny, the model the repository ships."""
    return BUNDLED_MODEL


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with only a tokenizer (and chat template): the bundled model's."""
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(directory)
    return directory


def save_tokenizer(directory: Path) -> None:
    """Copy the bundled model's tokenizer (byte-level BPE with a chat template) into `directory`."""
    for name in TOKENIZER_FILES:
        if (BUNDLED_MODEL / name).exists():
            shutil.copy(BUNDLED_MODEL / name, directory / name)


def save_tiny_llama(directory: Path, max_position_embeddings: int = 256, seed: int = 0) -> Path:
    """A random-initialised tiny Llama checkpoint with a tokenizer and chat template.

    Args:
        directory: where to write it (created).
        max_position_embeddings: the model's context length.
        seed: torch seed for the weights.

    Returns:
        `directory`.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    save_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    # pyright: ignore: transformers' stubs type PreTrainedModel.to as if `self` were its first argument.
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(directory)  # pyright: ignore[reportArgumentType]
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@dataclass
class RunningServer:
    """A uvicorn server running in a background thread."""

    url: str  # e.g. http://127.0.0.1:40123
    server: Any  # uvicorn.Server
    thread: threading.Thread

    @property
    def api_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(server: Any, url: str, timeout: float = 60.0) -> RunningServer:
    """Run `server` (uvicorn.Server) in a daemon thread and wait until /health answers 200.

    Returns:
        The RunningServer; call .stop() when done.
    """
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the server thread exited during start-up (see the log above)")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return RunningServer(url=url, server=server, thread=thread)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.should_exit = True
    raise RuntimeError(f"the server at {url} did not become healthy within {timeout} s")


def serve_app(app: Any, timeout: float = 60.0) -> RunningServer:
    """Serve a FastAPI app with uvicorn on a free loopback port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    return start_server(server, f"http://127.0.0.1:{port}", timeout)


@pytest.fixture(scope="session")
def start_server_fn():
    """start_server(uvicorn.Server, url) -> RunningServer, for tests that need their own server."""
    return start_server


@pytest.fixture(scope="session")
def serve_app_fn():
    """serve_app(FastAPI app) -> RunningServer on a free port."""
    return serve_app


@pytest.fixture(scope="session")
def tiny_llama_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    """The real server (its engine core in a thread) serving the tiny random Llama on CPU."""
    from server.config import ServerSettings
    from server.launch import build_server

    port = free_port()
    settings = ServerSettings(model=tiny_llama_dir, port=port, device="cpu", dtype="float32",
                              served_model_name="tiny-llama", num_kv_blocks=512, max_num_seqs=64,
                              max_num_batched_tokens=512, log_level="warning", engine_process=False)
    running = start_server(build_server(settings), settings.url)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def tiny_server_fn(tiny_llama_dir: Path):
    """tiny_server(**settings) -> RunningServer of the real server on the tiny Llama with those settings.

    Defaults: CPU, float32, model name "tiny-llama", 128 KV blocks, 8 running requests, the engine in a thread
    (engine_process=False: tests inspect it and inject faults). Stop it with .stop().
    """
    from server.config import ServerSettings
    from server.launch import build_server

    def tiny_server(**overrides: Any) -> RunningServer:
        values = dict(model=tiny_llama_dir, port=free_port(), device="cpu", dtype="float32",
                      served_model_name="tiny-llama", num_kv_blocks=128, max_num_seqs=8,
                      max_num_batched_tokens=256, log_level="warning", engine_process=False)
        settings = ServerSettings(**{**values, **overrides})
        return start_server(build_server(settings), settings.url)

    return tiny_server


def engine_of(running: RunningServer) -> Any:
    """The engine client behind a RunningServer built by build_server (`.core`: its EngineCore, in a thread)."""
    return running.server.config.app.state.serving.engine


@pytest.fixture(scope="session")
def engine_of_fn():
    """engine_of(RunningServer) -> its engine client (to inject faults or inspect the KV cache through `.core`)."""
    return engine_of


def hf_greedy(model: Any, prompt: list[int], max_tokens: int, eos_ids: list[int]) -> list[int]:
    """transformers' greedy continuation of `prompt` on `model`'s device, cut after the first EOS (where ours stops)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=max_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=model.device),
                             eos_token_id=eos_ids)
    tokens = out[0, len(prompt):].tolist()
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


@pytest.fixture(scope="session")
def hf_greedy_fn():
    """hf_greedy(model, prompt, max_tokens, eos_ids) -> transformers' greedy tokens, cut after the first EOS."""
    return hf_greedy
