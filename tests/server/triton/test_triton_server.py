"""The `inflight` model behind a real Triton Inference Server (the tritonserver 2.51 of the nvidia-pytriton wheel,
Python backend, decoupled) on the bundled model on CPU, driven with tritonclient over HTTP and gRPC: greedy text
equals inflight-serve's, streams carry one token per response and add up to the same text, 32 concurrent streams
are batched in flight and all finish, and a cancelled stream frees its KV blocks.

pytriton and numpy<2 (its backend stubs are built against NumPy 1.x) are installed once into a cache folder
(~/.cache/inflight-tests, or $INFLIGHT_TRITON_SITE); the tests skip when pip cannot fetch them.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from server.config import BUNDLED_MODEL
from server.triton.repository import (
    MODEL_NAME,
    assemble_python_backend,
    build_repository,
    make_triton_python,
    tritonserver_binary,
    tritonserver_environment,
)

grpcclient: Any = pytest.importorskip("tritonclient.grpc")
httpclient: Any = pytest.importorskip("tritonclient.http")
prometheus_parser: Any = pytest.importorskip("prometheus_client.parser")

pytestmark = pytest.mark.slow

PYTRITON = "nvidia-pytriton==0.7.0"
PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hello"]
MAX_TOKENS = 24
NUM_KV_BLOCKS = 256


def triton_site() -> Path:
    """A `pip install --target` folder with pytriton and numpy<2 (installed on first use)."""
    site = Path(os.environ.get("INFLIGHT_TRITON_SITE")
                or Path.home() / ".cache" / "inflight-tests" / f"triton-site-{PYTRITON.split('==')[1]}")
    if (site / "pytriton" / "tritonserver" / "bin" / "tritonserver").exists():
        return site
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                             PYTRITON, "numpy<2"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot install {PYTRITON} and numpy<2: {result.stderr.strip().splitlines()[-1:]}")
    return site


class Triton:
    """A running tritonserver with the `inflight` model, and the addresses of its services."""

    def __init__(self, process: subprocess.Popen, http: str, grpc: str, metrics: str, log: Path) -> None:
        self.process, self.http, self.grpc, self.metrics, self.log = process, http, grpc, metrics, log

    def inflight_metrics(self) -> dict[str, float]:
        """Inflight's own Prometheus metrics (the model's metrics_port): sample name -> value, labels ignored."""
        text = httpx.get(self.metrics, timeout=5).text
        return {sample.name: sample.value for family in prometheus_parser.text_string_to_metric_families(text)
                for sample in family.samples}


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory, free_port_fn) -> Iterator[Triton]:
    site = triton_site()
    root = tmp_path_factory.mktemp("triton")
    ports = [free_port_fn() for _ in range(4)]
    while len(set(ports)) < 4:
        ports = [free_port_fn() for _ in range(4)]
    http_port, grpc_port, triton_metrics_port, inflight_metrics_port = ports
    build_repository(BUNDLED_MODEL, root / "repository",
                     {"device": "cpu", "max_num_seqs": "64", "num_kv_blocks": str(NUM_KV_BLOCKS),
                      "metrics_port": str(inflight_metrics_port)})
    assemble_python_backend(root / "backends", site)
    env = {**os.environ, **tritonserver_environment(make_triton_python(root / "python", site), site)}
    log = root / "tritonserver.log"
    process = subprocess.Popen(
        [str(tritonserver_binary(site)), "--model-repository", str(root / "repository"),
         "--backend-directory", str(root / "backends"), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
         "--metrics-port", str(triton_metrics_port), "--exit-timeout-secs", "10"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    http = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{http}/v2/models/{MODEL_NAME}/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"tritonserver did not get the model ready:\n{log.read_text()[-4000:]}")
    yield Triton(process, http, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{inflight_metrics_port}/metrics", log)
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=60) == 0, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, serve_cli_fn, free_port_fn) -> Iterator[dict[str, str]]:
    """inflight-serve's greedy completion of every prompt (the bundled model on CPU). Without the checkpoint's sampling
    defaults (--generation-config none): the Triton backend takes the parameters its client sends, no others (its
    greedy requests have no repetition penalty; generation_config.json has 1.1)."""
    port = free_port_fn()
    process = serve_cli_fn(["--device", "cpu", "--generation-config", "none"],
                           tmp_path_factory.mktemp("serve") / "serve.log", port)
    try:
        texts = {}
        for prompt in PROMPTS:
            body = {"model": "inflight-tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            texts[prompt] = response.json()["choices"][0]["text"]
        yield texts
    finally:
        process.terminate()
        process.wait(timeout=60)


def grpc_inputs(prompt: str, max_tokens: int, stream: bool, min_tokens: int = 0) -> list[Any]:
    values: list[tuple[str, str, np.ndarray]] = [
        ("text_input", "BYTES", np.array([prompt.encode()], dtype=np.object_)),
        ("max_tokens", "INT32", np.array([max_tokens], dtype=np.int32)),
        ("temperature", "FP32", np.array([0.0], dtype=np.float32)),
        ("stream", "BOOL", np.array([stream], dtype=bool)),
        ("min_tokens", "INT32", np.array([min_tokens], dtype=np.int32)),
    ]
    inputs = []
    for name, kind, value in values:
        tensor = grpcclient.InferInput(name, list(value.shape), kind)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def is_final(result: Any) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def test_model_metadata_over_http_client(triton: Triton) -> None:
    client = httpclient.InferenceServerClient(triton.http.removeprefix("http://"))
    assert client.is_server_live() and client.is_model_ready(MODEL_NAME)
    metadata = client.get_model_metadata(MODEL_NAME)
    assert "text_input" in {tensor["name"] for tensor in metadata["inputs"]}
    assert {tensor["name"] for tensor in metadata["outputs"]} == {"text_output", "output_ids"}
    config = client.get_model_config(MODEL_NAME)
    assert config["model_transaction_policy"]["decoupled"] is True


def test_generate_equals_inflight_serve(triton: Triton, reference: dict[str, str]) -> None:
    for prompt in PROMPTS:
        response = httpx.post(f"{triton.http}/v2/models/{MODEL_NAME}/generate",
                              json={"text_input": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["text_output"] == reference[prompt]


def test_generate_stream_yields_the_same_text_token_by_token(triton: Triton, reference: dict[str, str]) -> None:
    prompt = PROMPTS[0]
    events = []
    body = {"text_input": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": True}
    with httpx.stream("POST", f"{triton.http}/v2/models/{MODEL_NAME}/generate_stream", json=body, timeout=60) as sse:
        assert sse.status_code == 200
        events = [json.loads(line.removeprefix("data: ")) for line in sse.iter_lines() if line.startswith("data: ")]
    assert all("error" not in event for event in events), events
    assert len(events) > 1
    assert all(isinstance(event["output_ids"], int) for event in events)  # one token per response
    assert "".join(event["text_output"] for event in events) == reference[prompt]


def stream_all(triton: Triton, requests: dict[str, str], timeout: float) -> dict[str, list[tuple[str, list[int]]]]:
    """Send every request (id -> prompt) on one gRPC stream, greedy, streamed; wait for every final response.

    Returns:
        Per request id, its responses before the final one: (text_output, output_ids).
    """
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    responses: dict[str, list[tuple[str, list[int]]]] = {request_id: [] for request_id in requests}
    try:
        for request_id, prompt in requests.items():
            client.async_stream_infer(MODEL_NAME, grpc_inputs(prompt, MAX_TOKENS, stream=True),
                                      request_id=request_id, enable_empty_final_response=True)
        finished: set[str] = set()
        while len(finished) < len(requests):
            result, error = results.get(timeout=timeout)
            assert error is None, error
            request_id = result.get_response().id
            if is_final(result):
                finished.add(request_id)
            else:
                responses[request_id].append((result.as_numpy("text_output")[0].decode(),
                                              result.as_numpy("output_ids").tolist()))
    finally:
        client.stop_stream()
    return responses


def test_grpc_stream_equals_inflight_serve(triton: Triton, reference: dict[str, str]) -> None:
    responses = stream_all(triton, {prompt: prompt for prompt in PROMPTS}, timeout=60)
    for prompt in PROMPTS:
        assert all(len(ids) == 1 for _, ids in responses[prompt])  # one token per response
        assert "".join(text for text, _ in responses[prompt]) == reference[prompt]
        assert len(responses[prompt]) <= MAX_TOKENS


def test_32_concurrent_streams_are_batched_and_all_finish(triton: Triton, reference: dict[str, str]) -> None:
    running_seen: list[float] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            running_seen.append(triton.inflight_metrics()["inflight_requests_running"])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    requests = {f"r{i}": PROMPTS[i % len(PROMPTS)] for i in range(32)}
    try:
        responses = stream_all(triton, requests, timeout=120)
    finally:
        sampling.set()
        sampler.join()
    assert all("".join(text for text, _ in responses[request_id]) == reference[prompt]
               for request_id, prompt in requests.items())
    assert max(running_seen) > 1, "the requests ran one at a time"


def test_cancelled_stream_frees_its_kv_blocks(triton: Triton) -> None:
    long = 400  # min_tokens keeps the model from ending first; 400 tokens take seconds on the CPU
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    tokens_before = triton.inflight_metrics()["inflight_generation_tokens_total"]
    client.async_stream_infer(MODEL_NAME, grpc_inputs(PROMPTS[0], long, stream=True, min_tokens=long),
                              request_id="cancel-me", enable_empty_final_response=True)
    received = 0
    while received < 3:
        _, error = results.get(timeout=60)
        assert error is None, error
        received += 1
    assert triton.inflight_metrics()["inflight_kv_cache_blocks_used"] > 0
    client.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = triton.inflight_metrics()
        if metrics["inflight_kv_cache_blocks_used"] == 0 and metrics["inflight_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert metrics["inflight_kv_cache_blocks_used"] == 0
    assert metrics["inflight_kv_cache_blocks_free"] == NUM_KV_BLOCKS
    assert metrics["inflight_generation_tokens_total"] - tokens_before < long  # it ended early
    assert "a Triton request was cancelled" in triton.log.read_text()
