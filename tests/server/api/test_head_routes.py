"""HEAD on every GET route of the real server (the GET's status and headers, no body), and every 4xx in the server
log at info with its request id and the message the client got."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

GET_PATHS = ["/health", "/metrics", "/v1/models", "/openapi.json", "/dashboard"]
VOLATILE = {"date", "x-request-id", "content-length"}  # differ between two responses; content-length for /metrics


@pytest.mark.parametrize("path", GET_PATHS)
def test_head_answers_like_get_without_a_body(tiny_llama_server: Any, path: str) -> None:
    get = httpx.get(tiny_llama_server.url + path)
    head = httpx.head(tiny_llama_server.url + path)
    assert get.status_code == 200, get.text
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert {k: v for k, v in head.headers.items() if k not in VOLATILE} == {
        k: v for k, v in get.headers.items() if k not in VOLATILE}
    assert head.headers["x-request-id"].startswith("req_")


def test_head_announces_the_length_of_the_get_body(tiny_llama_server: Any) -> None:
    get = httpx.get(tiny_llama_server.url + "/v1/models")
    head = httpx.head(tiny_llama_server.url + "/v1/models")
    assert int(head.headers["content-length"]) == len(get.content) > 0


def test_head_is_listed_in_allow_of_a_405(tiny_llama_server: Any) -> None:
    response = httpx.post(tiny_llama_server.url + "/health")
    assert response.status_code == 405
    assert {method.strip() for method in response.headers["allow"].split(",")} == {"GET", "HEAD"}


def test_head_of_a_post_route_is_still_405(tiny_llama_server: Any) -> None:
    assert httpx.head(tiny_llama_server.url + "/v1/completions").status_code == 405


def client_error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "server.api.errors" and record.levelno == logging.INFO]


def test_a_400_is_logged_with_its_request_id_and_reason(tiny_llama_server: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.api.errors")
    response = httpx.post(tiny_llama_server.api_url + "/completions",
                          json={"model": "tiny-llama", "prompt": "hi", "temperature": 5})
    assert response.status_code == 400
    request_id = response.headers["x-request-id"]
    message = response.json()["error"]["message"]
    (line,) = [line for line in client_error_lines(caplog) if request_id in line]
    assert "POST /v1/completions" in line and "400" in line and "param temperature" in line
    assert message in line


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("POST", "/v1/completions", b"{not json", 400),
    ("GET", "/no/such/path", None, 404),
    ("DELETE", "/v1/models", None, 405),
])
def test_every_4xx_is_logged(tiny_llama_server: Any, caplog: pytest.LogCaptureFixture, method: str, path: str,
                             body: Any, status: int) -> None:
    caplog.set_level(logging.INFO, logger="server.api.errors")
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body} if body else {}
    response = httpx.request(method, tiny_llama_server.url + path, **kwargs)
    assert response.status_code == status
    lines = [line for line in client_error_lines(caplog) if response.headers["x-request-id"] in line]
    assert len(lines) == 1 and f"{method} {path}" in lines[0] and str(status) in lines[0], client_error_lines(caplog)
    assert response.json()["error"]["message"] in lines[0]


def test_a_successful_request_logs_no_client_error(tiny_llama_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.api.errors")
    response = httpx.get(tiny_llama_server.api_url + "/models")
    assert response.status_code == 200
    assert not [line for line in client_error_lines(caplog) if response.headers["x-request-id"] in line]


def test_a_400_reaches_the_log_of_inflight_serve(tmp_path: Any, port: int, serve_cli_fn: Any) -> None:
    import signal

    log = tmp_path / "server.log"
    process = serve_cli_fn(["--device", "cpu", "--num-kv-blocks", "64", "--max-num-seqs", "4",
                            "--max-num-batched-tokens", "64"], log, port)
    try:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                              json={"model": "inflight-tiny", "prompt": "hi", "max_tokens": 0.5})
        assert response.status_code == 400
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    request_id = response.headers["x-request-id"]
    (line,) = [line for line in log.read_text().splitlines() if request_id in line]
    assert " INFO server.api.errors: " in line and "400" in line and "max_tokens" in line, line
