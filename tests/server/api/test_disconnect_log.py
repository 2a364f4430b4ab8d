"""A client that leaves before the first response byte costs at most one log line, never a traceback.

`inflight-serve` runs in a subprocess (its stderr is what an operator reads), with engine steps slowed down so
that no response byte can be ready before the client has gone.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import httpx
import pytest

STEP_SECONDS = 0.05  # per engine step: the first token takes at least this long
REQUESTS = [  # path, body: each sent once streamed and once not
    ("/v1/completions", {"prompt": "hello there", "max_tokens": 40}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 40}),
]


@pytest.fixture(scope="module")
def slow_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory, free_port_fn, serve_cli_fn):
    """(url, log path) of a served tiny Llama whose log goes to a file."""
    log = tmp_path_factory.mktemp("disconnect") / "server.log"
    port = free_port_fn()
    args = [str(tiny_llama_dir), "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "64",
            "--no-engine-process", "--log-level", "info"]
    process = serve_cli_fn(args, log, port, step_seconds=STEP_SECONDS)
    yield f"http://127.0.0.1:{port}", log
    process.terminate()
    process.wait(timeout=30)


def send_and_leave(url: str, path: str, body: dict) -> None:
    """POST `body` on a raw socket and close it at once, before any response byte."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)


def running_requests(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    found = re.search(r"^inflight_requests_running (\S+)$", text, re.MULTILINE)
    assert found is not None, text
    return float(found.group(1))


def test_a_client_leaving_before_the_first_byte_is_at_most_one_log_line(slow_server) -> None:
    url, log = slow_server
    before = log.read_text().splitlines()
    num_disconnects = 0
    for path, body in REQUESTS:
        for stream in (False, True):
            send_and_leave(url, path, {**body, "stream": stream})
            num_disconnects += 1
    deadline = time.monotonic() + 10
    while running_requests(url) and time.monotonic() < deadline:  # the engine aborts what nobody waits for
        time.sleep(0.1)
    assert running_requests(url) == 0
    ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200, ok.text  # and the server still serves
    new_lines = log.read_text().splitlines()[len(before):]
    assert not [line for line in new_lines if "Traceback" in line or "Error" in line], "\n".join(new_lines)
    disconnect_lines = [line for line in new_lines if "disconnect" in line]
    assert len(disconnect_lines) <= num_disconnects, "\n".join(new_lines)
    assert len(new_lines) <= num_disconnects, "\n".join(new_lines)
