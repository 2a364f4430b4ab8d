"""inflight-serve's command line: bad options fail in one line with exit code 2; sources merge."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletionMessageParam

from server.cli import UsageError, parse_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None, python_options: tuple[str, ...] = ()
            ) -> subprocess.CompletedProcess:
    """`python [PYTHON_OPTIONS] -m server ARGS` without the caller's INFLIGHT_* variables."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("INFLIGHT_")}
    environ.update(env or {})
    environ["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, *python_options, "-m", "server", *args], capture_output=True, text=True,
                          env=environ, cwd=REPO_ROOT, timeout=60)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--port", "eighty"], {}, "--port must be an integer, got 'eighty'"),
        (["--device", "tpu"], {}, "argument --device: invalid choice: 'tpu'"),
        (["--no-such-option"], {}, "unrecognized arguments: --no-such-option"),
        (["--num-kv-blocks", "8", "--kv-cache-memory-fraction", "0.5"], {}, "not allowed with argument"),
        (["/definitely/not/a/model"], {}, "model directory '/definitely/not/a/model' does not exist"),
        ([], {"INFLIGHT_PORT": "-1"}, "--port must be between 1 and 65535"),
        (["--config", "/nope.yaml"], {}, "--config file '/nope.yaml' does not exist"),
    ],
)
def test_bad_option_is_one_line_exit_2(args: list[str], env: dict[str, str], expected: str) -> None:
    result = run_cli(*args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("inflight-serve: error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_model_that_cannot_load_is_one_line_exit_2(tmp_path: Path, port: int) -> None:
    (tmp_path / "config.json").write_text("{not json")
    result = run_cli(str(tmp_path), "--device", "cpu", "--port", str(port))  # a free port: it is bound first
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("inflight-serve: error: ")


def test_missing_cuda_is_one_line_exit_2(tmp_path: Path, port: int) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli(str(tmp_path), "--device", "cuda", "--port", str(port))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "inflight-serve: error: device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")


def test_help_exits_0() -> None:
    result = run_cli("--help")
    assert result.returncode == 0 and "--kv-cache-memory-fraction" in result.stdout


def test_help_does_not_import_torch() -> None:
    result = run_cli("--help", python_options=("-X", "importtime"))
    assert result.returncode == 0 and "--engine-stall-timeout" in result.stdout
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert imported and not imported & {"torch", "transformers", "fastapi", "uvicorn"}, sorted(imported)


@pytest.mark.parametrize("host", ["127.0.0.1", "192.0.2.1"])  # a port in use; an address of no interface here
def test_address_that_cannot_be_bound_is_one_line_exit_2_before_loading(host: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        result = run_cli("--host", host, "--port", str(port), "--device", "cpu")
        elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no "loading ..." log line: the model was never loaded
    assert lines[0].startswith(f"inflight-serve: error: cannot listen on {host}:{port}: "), lines[0]
    assert ("address already in use" if host == "127.0.0.1" else "--host") in lines[0]
    assert elapsed < 20, elapsed


def test_port_taken_while_loading_is_one_line_exit_2_and_no_engine_left(bundled_model_dir: Path) -> None:
    with socket.socket() as other:  # a second server that binds as uvicorn does and listens while we load
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", 0))
        port = other.getsockname()[1]
        environ = {key: value for key, value in os.environ.items() if not key.startswith("INFLIGHT_")}
        process = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--device", "cpu"],
                                   cwd=REPO_ROOT, env={**environ, "PYTHONPATH": str(REPO_ROOT)},
                                   stderr=subprocess.PIPE, text=True)
        assert process.stderr is not None
        first_line = process.stderr.readline()
        assert "loading" in first_line, first_line  # it has bound the port and is loading now
        other.listen()
        try:
            stderr = first_line + process.communicate(timeout=120)[1]
        finally:
            process.kill()
    assert process.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("inflight-serve: error: ")]
    assert errors == [(f"inflight-serve: error: cannot listen on 127.0.0.1:{port}: address already in use; stop what "
                       "listens there or choose another --port")], stderr
    assert "Traceback" not in stderr
    (pid,) = re.findall(r"engine core process (\d+) started", stderr)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)


def test_parse_precedence(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f'model = "{model}"\nport = 9001\nlog_level = "debug"\napi_key = "file-key"\n')
    environ = {"INFLIGHT_PORT": "9002", "INFLIGHT_API_KEY": "env-key"}
    settings = parse_settings(["--config", str(config), "--api-key", "cli-key"], environ)
    assert (settings.port, settings.api_key, settings.log_level, settings.model) == (9002, "cli-key", "debug", model)
    settings = parse_settings([str(model), "--config", str(config), "--port", "9003", "--log-level", "WARNING"],
                              environ)
    assert (settings.port, settings.api_key, settings.log_level) == (9003, "env-key", "warning")


def test_parse_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="invalid choice"):
        parse_settings(["--dtype", "int4"], {})


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def test_serve_checkpoint_from_the_command_line(tiny_llama_dir: Path, tmp_path: Path, port: int,
                                                serve_cli_fn) -> None:
    import openai

    log = tmp_path / "server.log"
    config = tmp_path / "serve.yaml"
    config.write_text("num_kv_blocks: 64\nmax_num_seqs: 4\nmax_num_batched_tokens: 64\n")
    process = serve_cli_fn([str(tiny_llama_dir), "--device", "cpu", "--config", str(config),
                            "--served-model-name", "cli-model"], log, port, env={"INFLIGHT_DTYPE": "float32"})
    url = f"http://127.0.0.1:{port}"
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert client.models.list().data[0].id == "cli-model"
        result = client.completions.create(model="cli-model", prompt="Return the", max_tokens=4, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert result.usage is not None and result.usage.completion_tokens == 4
    finally:
        assert stop(process) == 0
    start_up = [line for line in log.read_text().splitlines() if "serving model" in line]
    assert len(start_up) == 1, log.read_text()
    for part in ("'cli-model'", str(tiny_llama_dir), "cpu", "float32", "64 KV blocks", url):
        assert part in start_up[0]
    # the engine core ran in its own process (the default), logged in the server's format, and ended with it
    kv_line = r"^\S+ \S+ INFO server\.runner\.kv_sizing: KV cache: 64 blocks"
    assert re.search(kv_line, log.read_text(), re.MULTILINE)
    (pid,) = re.findall(r"engine core process (\d+) is ready", log.read_text())
    assert int(pid) != process.pid
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)


def test_serve_the_bundled_model_by_default(bundled_model_dir: Path, tmp_path: Path, port: int, serve_cli_fn) -> None:
    import openai

    log = tmp_path / "server.log"
    process = serve_cli_fn(["--device", "cpu", "--num-kv-blocks", "128", "--max-num-seqs", "8",
                            "--max-num-batched-tokens", "256"], log, port)
    url = f"http://127.0.0.1:{port}"
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert client.models.list().data[0].id == "inflight-tiny"
        prompt = "Return the number of"
        whole = client.completions.create(model="inflight-tiny", prompt=prompt, max_tokens=24, temperature=0)
        assert whole.choices[0].text.strip() and whole.choices[0].finish_reason in ("stop", "length")
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model="inflight-tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True))
        assert streamed == whole.choices[0].text
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Describe the function."}]
        chat = client.chat.completions.create(model="inflight-tiny", messages=messages, max_tokens=24, temperature=0)
        chunks = list(client.chat.completions.create(model="inflight-tiny", messages=messages, max_tokens=24,
                                                     temperature=0, stream=True))
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == chat.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    finally:
        assert stop(process) == 0
    assert "'inflight-tiny'" in log.read_text()
