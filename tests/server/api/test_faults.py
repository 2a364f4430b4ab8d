"""Fault isolation on the real server (tiny random Llama): an injected failure in one request's processing
fails that request alone (500 + error JSON); a failed step (e.g. out of memory) fails its requests and the
engine recovers; an engine that keeps failing is declared dead (/health 503) and no request hangs."""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import httpx
import pytest

MODEL = "tiny-llama"
POISON = [5, 6, 7, 8]  # the prompt (token ids) of the request the tests make fail
PROMPTS = ["Return the number of", "Create a new", "The default value", "If the file is"]


def body(prompt: Any, **extra: Any) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}


@pytest.fixture(scope="module")
def running(tiny_server_fn) -> Any:
    server = tiny_server_fn()
    yield server
    server.stop()


@pytest.fixture
def engine(running: Any, engine_of_fn) -> Any:
    engine = engine_of_fn(running)
    executor = engine.core.executor
    launch, collect, process = executor.launch, executor.collect, engine.core._process_token
    yield engine
    executor.launch, executor.collect, engine.core._process_token = launch, collect, process  # undo the injection


def completion(running: Any, request: dict) -> httpx.Response:
    return httpx.post(running.api_url + "/completions", json=request, timeout=60)


def stream_events(running: Any, request: dict) -> list[str]:
    with httpx.stream("POST", running.api_url + "/completions", json={**request, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        return [line.removeprefix("data: ") for line in r.iter_lines() if line]


def run_together(running: Any, requests: list[dict]) -> list[httpx.Response]:
    """Send the requests at the same time (one thread each); the responses in the same order."""
    responses: list[Any] = [None] * len(requests)

    def send(index: int) -> None:
        responses[index] = completion(running, requests[index])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return responses


def assert_500_names_only_the_request_id(response: httpx.Response, detail: str, caplog: Any) -> None:
    """A 500 tells the client its request id (body and X-Request-Id), not `detail`; the log has both."""
    request_id = response.headers["x-request-id"]
    error = response.json()["error"]
    assert response.status_code == 500 and error["type"] == "server_error"
    assert request_id in error["message"] and detail not in error["message"]
    log = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    assert request_id in log and detail in log


def assert_idle(running: Any, engine: Any) -> None:
    assert httpx.get(running.url + "/health").status_code == 200
    assert engine.core.scheduler.num_running == 0 and engine.core.scheduler.num_waiting == 0
    assert engine.core.kv_cache_manager.num_used_blocks == 0


def test_one_request_failing_in_processing_leaves_the_others_running(running: Any, engine: Any, caplog) -> None:
    alone = [completion(running, body(prompt)).json()["choices"][0]["text"] for prompt in PROMPTS]
    process = engine.core._process_token

    def failing_process(request: Any, result: Any) -> Any:
        if request.prompt_token_ids == POISON and request.num_output_tokens == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer failure")
        return process(request, result)

    engine.core._process_token = failing_process
    responses = run_together(running, [body(POISON)] + [body(prompt) for prompt in PROMPTS])
    assert_500_names_only_the_request_id(responses[0], "injected detokenizer failure", caplog)
    assert [r.json()["choices"][0]["text"] for r in responses[1:]] == alone
    events = stream_events(running, body(POISON))  # streamed: the failure is an error event, then [DONE]
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    assert_idle(running, engine)


def test_non_finite_sampling_fails_that_request_only(running: Any, engine: Any) -> None:
    alone = completion(running, body(PROMPTS[0], logprobs=1)).json()["choices"][0]
    collect = engine.core.executor.collect

    def nan_collect() -> Any:
        result = collect()
        for request_id, logprobs in result.logprobs.items():
            request = engine.core.scheduler.requests.get(request_id)  # None: it finished while its step ran
            if request is not None and request.prompt_token_ids == POISON:
                logprobs[0].logprob = math.nan
        return result

    engine.core.executor.collect = nan_collect
    poisoned, healthy = run_together(running, [body(POISON, logprobs=1), body(PROMPTS[0], logprobs=1)])
    assert poisoned.status_code == 500 and "failed" in poisoned.json()["error"]["message"]
    assert healthy.status_code == 200
    choice = healthy.json()["choices"][0]
    assert (choice["text"], choice["logprobs"]["tokens"]) == (alone["text"], alone["logprobs"]["tokens"])
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(alone["logprobs"]["token_logprobs"], abs=1e-4)
    assert_idle(running, engine)


def test_nan_logits_fail_that_request_only(running: Any, engine: Any, monkeypatch) -> None:
    alone = completion(running, body(PROMPTS[1])).json()["choices"][0]
    executor = engine.core.executor
    launch, forward = executor.launch, type(engine.core.executor.runner.backend).forward
    step: dict[str, Any] = {}

    def remembering_launch(plan: Any) -> None:
        step["rows"] = [engine.core.scheduler.requests[request_id]
                        for request_id, sample in zip(plan.request_ids, plan.needs_sample) if sample]
        launch(plan)

    def nan_forward(model: Any, batch: Any, kv_caches: Any) -> Any:  # the model goes wrong on one request
        logits = forward(model, batch, kv_caches)
        for row, request in enumerate(step["rows"]):
            if request.prompt_token_ids == POISON and logits.shape[0] == len(step["rows"]):
                logits[row] = math.nan
        return logits

    executor.launch = remembering_launch
    monkeypatch.setattr(type(engine.core.executor.runner.backend), "forward", nan_forward)
    poisoned, healthy = run_together(running, [body(POISON, temperature=0.7), body(PROMPTS[1])])
    assert poisoned.status_code == 500 and "failed" in poisoned.json()["error"]["message"]
    assert healthy.status_code == 200 and healthy.json()["choices"][0] == alone
    assert_idle(running, engine)


def test_failed_step_fails_its_requests_and_the_engine_recovers(running: Any, engine: Any, caplog) -> None:
    launch = engine.core.executor.launch
    fail_at = {"step": 1}  # fail the n-th step from now, once

    def oom_launch(plan: Any) -> None:
        fail_at["step"] -= 1
        if fail_at["step"] == 0:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        launch(plan)

    engine.core.executor.launch = oom_launch
    response = completion(running, body(PROMPTS[0]))
    assert_500_names_only_the_request_id(response, "out of memory", caplog)
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    fail_at["step"] = 3  # streamed: tokens, then the error event, then [DONE]
    events = stream_events(running, body(PROMPTS[1]))
    message = json.loads(events[-2])["error"]["message"]  # the stream's error event: the request id, not the text
    assert events[-1] == "[DONE]" and "request id req_" in message and "out of memory" not in message
    assert any(json.loads(event).get("choices") for event in events[:-2])
    assert completion(running, body(PROMPTS[2])).status_code == 200  # recovered
    assert_idle(running, engine)
    metrics = httpx.get(running.url + "/metrics").text
    assert "inflight_engine_step_failures_total 2.0" in metrics and "inflight_engine_healthy 1.0" in metrics
    assert 'inflight_request_success_total{finished_reason="error"}' in metrics


def test_request_that_cannot_be_added_fails_alone(running: Any, engine: Any, caplog) -> None:
    add_request = engine.core.add_request

    def failing_add(request_id: str, prompt_token_ids: list[int], *args: Any) -> None:
        if prompt_token_ids == POISON:
            raise RuntimeError("injected failure while setting the request up")
        add_request(request_id, prompt_token_ids, *args)

    engine.core.add_request = failing_add
    try:
        poisoned, healthy = run_together(running, [body(POISON), body(PROMPTS[0])])
    finally:
        del engine.core.add_request
    assert_500_names_only_the_request_id(poisoned, "setting the request up", caplog)
    assert healthy.status_code == 200 and engine.is_running
    assert_idle(running, engine)


def test_tokenizer_failure_is_500_with_the_error_json(running: Any, engine: Any, monkeypatch, caplog) -> None:
    tokenizer = engine.tokenizer
    encode = tokenizer.encode

    def failing_encode(text: str, *args: Any, **kwargs: Any) -> Any:
        if "poison" in text:
            raise RuntimeError("injected tokenizer failure")
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", failing_encode)
    assert_500_names_only_the_request_id(completion(running, body("poison pill")), "injected tokenizer failure",
                                         caplog)
    assert completion(running, body(PROMPTS[0])).status_code == 200


def test_engine_that_keeps_failing_is_dead_and_nothing_hangs(tiny_server_fn, engine_of_fn) -> None:
    server = tiny_server_fn()
    try:
        engine = engine_of_fn(server)

        def broken_launch(plan: Any) -> None:
            raise RuntimeError("device lost (injected)")

        engine.core.executor.launch = broken_launch
        responses = run_together(server, [body(prompt) for prompt in PROMPTS])  # all end, none hangs
        assert {r.status_code for r in responses} <= {500, 503} and len(responses) == len(PROMPTS)
        while engine.is_running:  # each request above is its own failed step until three in a row
            assert completion(server, body(PROMPTS[0])).status_code in (500, 503)
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json() == {"status": "dead"}
        refused = completion(server, body(PROMPTS[0]))
        assert refused.status_code == 503 and "not running" in refused.json()["error"]["message"]
        assert "inflight_engine_healthy 0.0" in httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
    assert not server.thread.is_alive()
