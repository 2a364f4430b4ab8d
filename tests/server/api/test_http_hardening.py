"""The HTTP layer as an attacker meets it, on real uvicorn servers (tiny random Llama): auth before the body, the
OpenAPI security scheme, docs without outside scripts, no redirect to a forged Host, request ids instead of
exception text, Allow on 405, /health as JSON, and the limits against slow clients (raw sockets)."""

from __future__ import annotations

import json
import socket
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

MODEL = "tiny-llama"
KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHORT = {"model": MODEL, "prompt": "Create a new", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def plain(tiny_server_fn) -> Any:
    """The server as it starts by default: no key, no docs."""
    server = tiny_server_fn()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed(tiny_server_fn) -> Any:
    """With two API keys and --enable-docs."""
    server = tiny_server_fn(api_key=f"{KEY},other-key", enable_docs=True)
    yield server
    server.stop()


def raw_exchange(url: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a new socket and read until the server closes it or `timeout` passes."""
    parts = urlsplit(url)
    assert parts.port is not None, url
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received and _body_complete(received):
                    break
        except TimeoutError:
            pass
        return received


def _body_complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


# --- auth ----------------------------------------------------------------------------------------------------------


def test_unauthenticated_request_is_401_before_its_body_is_read(keyed: Any) -> None:
    malformed = httpx.post(keyed.api_url + "/completions", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 401 and malformed.json()["error"]["code"] == "invalid_api_key"
    assert malformed.headers["www-authenticate"] == "Bearer"
    too_large = httpx.post(keyed.api_url + "/completions", content=b"x" * (5 << 20))  # over the 4 MiB limit
    assert too_large.status_code == 401
    # headers announce 1000 bytes that never come: the answer cannot wait for them
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{")
    assert raw_exchange(keyed.url, head, timeout=3).startswith(b"HTTP/1.1 401 ")
    with_key = httpx.post(keyed.api_url + "/completions", content=b"{not json", headers={
        **AUTH, "content-type": "application/json"})
    assert with_key.status_code == 400
    assert httpx.post(keyed.api_url + "/completions", json=SHORT, headers={"Authorization": "Bearer other-key"}
                      ).status_code == 200


def test_only_health_metrics_schema_and_docs_are_open(keyed: Any) -> None:
    for path in ("/health", "/metrics", "/openapi.json", "/docs", "/redoc"):
        assert httpx.get(keyed.url + path).status_code == 200, path
    for path in ("/v1/models", "/v1/nothing", "/nothing", "/health/", "/v1/models/"):
        assert httpx.get(keyed.url + path).status_code == 401, path
    assert httpx.get(keyed.url + "/v1/nothing", headers=AUTH).status_code == 404


def test_openapi_declares_the_bearer_scheme(keyed: Any, plain: Any) -> None:
    schema = httpx.get(keyed.url + "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["type"] == "http"
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            expected = [{"bearer": []}] if path.startswith("/v1/") else None
            assert operation.get("security") == expected, path
    unkeyed = httpx.get(plain.url + "/openapi.json").json()  # no --api-key: the scheme exists, nothing needs it
    assert "bearer" in unkeyed["components"]["securitySchemes"]
    assert all("security" not in op for ops in unkeyed["paths"].values() for op in ops.values())


# --- docs ----------------------------------------------------------------------------------------------------------


class AssetLinks(HTMLParser):
    """The src of every <script> and the href of every <link> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href"}.get(tag)
        self.urls += [value for name, value in attrs if name == wanted and value]


def test_docs_are_off_by_default(plain: Any) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect", "/docs/swagger-ui-bundle.js"):
        response = httpx.get(plain.url + path)
        assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found", path


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_their_scripts_and_styles_from_this_server(keyed: Any, page: str) -> None:
    html = httpx.get(keyed.url + page)
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    parser = AssetLinks()
    parser.feed(html.text)
    assert any(url.endswith(".js") for url in parser.urls)
    for url in parser.urls:
        absolute = urljoin(keyed.url + page, url)
        assert urlsplit(absolute).netloc == urlsplit(keyed.url).netloc, url  # same origin
        asset = httpx.get(absolute)
        assert asset.status_code == 200 and len(asset.content) > 100, url
    assert "http://" not in html.text and "https://" not in html.text


# --- redirects, 405, request ids, /health --------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/models/"), ("GET", "/health/"), ("GET", "/metrics/"),
                                              ("POST", "/v1/completions/"), ("GET", "//evil.example/")])
def test_trailing_slash_is_404_never_a_redirect_to_the_host_header(plain: Any, method: str, path: str) -> None:
    response = httpx.request(method, plain.url + path, headers={"Host": "evil.example"}, json=SHORT,
                             follow_redirects=False)
    assert response.status_code == 404 and "location" not in response.headers
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_405_lists_the_allowed_methods(plain: Any) -> None:
    for method, path, allowed in (("GET", "/v1/completions", "POST"), ("POST", "/health", "GET, HEAD"),
                                  ("DELETE", "/v1/models", "GET, HEAD"), ("HEAD", "/v1/completions", "POST")):
        response = httpx.request(method, plain.url + path)
        assert response.status_code == 405 and response.headers["allow"] == allowed, path
        assert method == "HEAD" or response.json()["error"]["message"] == "Method Not Allowed"  # HEAD: no body


def test_every_response_carries_its_own_request_id(plain: Any, keyed: Any) -> None:
    responses = [httpx.post(plain.api_url + "/completions", json=SHORT), httpx.get(plain.url + "/health"),
                 httpx.get(plain.url + "/nothing"), httpx.get(keyed.api_url + "/models"),
                 httpx.post(plain.api_url + "/completions", json={**SHORT, "temperature": -1})]
    assert [r.status_code for r in responses] == [200, 200, 404, 401, 400]
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(request_id.startswith("req_") and len(request_id) == 36 for request_id in ids)
    assert len(set(ids)) == len(ids)
    with httpx.stream("POST", plain.api_url + "/completions", json={**SHORT, "stream": True}) as streamed:
        assert streamed.headers["x-request-id"].startswith("req_")


def test_health_is_json_with_the_reason_for_503(plain: Any) -> None:
    healthy = httpx.get(plain.url + "/health")
    assert healthy.status_code == 200 and healthy.json() == {"status": "ok"}
    assert healthy.headers["content-type"] == "application/json"
    serving = plain.server.config.app.state.serving
    serving.draining = True
    try:
        draining = httpx.get(plain.url + "/health")
    finally:
        serving.draining = False
    assert draining.status_code == 503 and draining.json() == {"status": "draining"}


# --- slow clients --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


@pytest.fixture(params=["asyncio", "uvloop"])
def limited(request: pytest.FixtureRequest, tokenizer: Any, start_server_fn, free_port_fn) -> Any:
    """limited(header_read_timeout, max_connections) -> a server (fake engine) on the given event loop."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    from fake_engine import FakeEngine

    from server.api.app import build_app, uvicorn_config
    from server.api.metrics import Metrics
    from server.api.shutdown import GracefulServer
    from server.config import ServerSettings

    servers = []

    def start(header_read_timeout: float, max_connections: int = 2048) -> Any:
        settings = ServerSettings(served_model_name="fake", port=free_port_fn(), log_level="warning",
                                  header_read_timeout=header_read_timeout, max_connections=max_connections)
        app = build_app(settings, FakeEngine(tokenizer, delay=0.02), Metrics(), device="cpu", dtype="float32",
                        vocab_size=len(tokenizer))
        config = uvicorn_config(app, settings)
        config.loop = request.param
        servers.append(start_server_fn(GracefulServer(config, app.state.serving, 1.0), settings.url))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    assert parts.port is not None, url
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def seconds_until_closed(sock: socket.socket, limit: float) -> float | None:
    """How long until the server closes `sock` (reading and dropping what it sends); None if open after `limit`."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def trickle(sock: socket.socket, data: bytes, interval: float) -> float | None:
    """Send `data` a byte every `interval` seconds; the seconds until the server closed `sock` (None: it did not)."""
    start = time.monotonic()
    try:
        for byte in data:
            sock.sendall(bytes([byte]))
            time.sleep(interval)
    except (BrokenPipeError, ConnectionResetError):
        return time.monotonic() - start
    return seconds_until_closed(sock, limit=0.1)


def test_partial_headers_are_closed_after_the_header_read_timeout(limited: Any) -> None:
    server = limited(header_read_timeout=0.5)
    silent, partial, trickling = connect(server.url), connect(server.url), connect(server.url)
    start = time.monotonic()
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends the headers
    with trickling:  # a byte every 50 ms does not restart the timer
        closed_after = trickle(trickling, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40, 0.05)
        assert closed_after is not None and closed_after < 1.5
    for sock in (silent, partial):
        with sock:
            assert seconds_until_closed(sock, limit=3.0) is not None and time.monotonic() - start < 1.5
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # complete requests are served


def test_keep_alive_connection_must_send_its_next_headers_in_time(limited: Any) -> None:
    server = limited(header_read_timeout=0.5)
    with connect(server.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next request never finishes its headers
        closed_after = seconds_until_closed(sock, limit=3.0)
        assert closed_after is not None and closed_after < 2.0


def test_connections_over_the_limit_are_closed_at_once(limited: Any) -> None:
    server = limited(header_read_timeout=30, max_connections=3)
    held = [connect(server.url) for _ in range(3)]
    time.sleep(0.3)  # the server has accepted them
    try:
        with connect(server.url) as extra:
            closed_after = seconds_until_closed(extra, limit=3.0)
            assert closed_after is not None and closed_after < 1.0
        held[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the ones within the limit still work
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(server.url + "/health").status_code == 200  # room again once they closed


def test_a_stream_longer_than_the_header_read_timeout_is_not_cut(limited: Any) -> None:
    server = limited(header_read_timeout=0.3)
    start = time.monotonic()
    body = {"prompt": "hi", "max_tokens": 60, "stream": True}  # 60 tokens at 20 ms each: over a second
    with httpx.stream("POST", server.api_url + "/completions", json=body, timeout=30) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert time.monotonic() - start > 1.0
    assert events[-1] == "[DONE]" and len(events) > 30
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
