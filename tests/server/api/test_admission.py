"""Admission limits of the real server on a tiny random Llama: a full queue is 429 with Retry-After, a request
that waited longer than --max-queue-time is 503, a body over --max-request-body-bytes is 413, API keys."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import pytest

MODEL = "tiny-llama"
LONG = {"model": MODEL, "prompt": "The default value", "max_tokens": 60, "ignore_eos": True, "temperature": 0}
SHORT = {"model": MODEL, "prompt": "Create a new", "max_tokens": 4, "temperature": 0}


def slow_steps(engine: Any, seconds: float) -> None:
    """Make every engine step take at least `seconds` (so that requests pile up in the queue)."""
    launch = engine.core.executor.launch

    def slow_launch(plan: Any) -> None:
        time.sleep(seconds)
        launch(plan)

    engine.core.executor.launch = slow_launch


def post_in_thread(url: str, body: dict, results: list, headers: dict | None = None) -> threading.Thread:
    def run() -> None:
        results.append(httpx.post(url, json=body, headers=headers, timeout=60))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_queue_is_429_and_long_wait_is_503(tiny_server_fn, engine_of_fn) -> None:
    running = tiny_server_fn(max_num_seqs=1, max_queued_requests=2, max_queue_time=2.0)
    engine = engine_of_fn(running)
    slow_steps(engine, 0.08)
    url = running.api_url + "/completions"
    try:
        results: list[httpx.Response] = []
        first = post_in_thread(url, LONG, results)  # runs for 60 steps x >= 80 ms
        wait_for(lambda: engine.core.scheduler.num_running == 1)
        queued = [post_in_thread(url, SHORT, results) for _ in range(2)]
        wait_for(lambda: engine.core.scheduler.num_waiting == 2)
        refused = httpx.post(url, json=SHORT, timeout=10)  # a third waiter: the queue is full
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "max_queued_requests" in error["message"]
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=running.api_url, api_key="x", max_retries=0).completions.create(**SHORT)
        for thread in queued:  # they wait > 2 s behind the long request: 503
            thread.join(timeout=30)
        waited = [r for r in results if r.status_code != 200]
        assert [r.status_code for r in waited] == [503, 503], [r.text for r in waited]
        assert all("max_queue_time" in r.json()["error"]["message"] and r.headers["retry-after"] == "1" for r in waited)
        first.join(timeout=30)
        assert results[-1].status_code == 200 and results[-1].json()["choices"][0]["finish_reason"] == "length"
        assert httpx.post(url, json=SHORT, timeout=10).status_code == 200  # the queue is free again
        metrics = httpx.get(running.url + "/metrics").text
        assert 'inflight_requests_rejected_total{reason="queue_full"} 2.0' in metrics
        assert 'inflight_requests_rejected_total{reason="queue_timeout"} 2.0' in metrics
        assert engine.core.kv_cache_manager.num_used_blocks == 0
    finally:
        running.stop()


def test_body_size_limit_is_413(tiny_server_fn) -> None:
    running = tiny_server_fn(max_request_body_bytes=2048)
    try:
        big = {**SHORT, "prompt": "word " * 1000}
        response = httpx.post(running.api_url + "/completions", json=big)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        assert "--max-request-body-bytes" in response.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(100):
                yield b"word " * 10
            yield b'"}'

        response = httpx.post(running.api_url + "/completions", content=chunks(),
                              headers={"content-type": "application/json"})
        assert response.status_code == 413, response.text
        assert httpx.post(running.api_url + "/completions", json=SHORT).status_code == 200
    finally:
        running.stop()


def test_several_api_keys_and_protected_metrics(tiny_server_fn) -> None:
    running = tiny_server_fn(api_key="first-key,second-key", protect_metrics=True)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer first-key,second-key"},
                        {"Authorization": "Basic first-key"}):
            response = httpx.post(running.api_url + "/completions", json=SHORT, headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
            assert httpx.get(running.url + "/metrics", headers=headers).status_code == 401
        for key in ("first-key", "second-key"):
            client = openai.OpenAI(base_url=running.api_url, api_key=key, max_retries=0)
            assert client.completions.create(**SHORT).choices[0].text is not None
            assert client.models.list().data[0].id == MODEL
            assert httpx.get(running.url + "/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.api_url, api_key="third-key", max_retries=0).models.list()
        assert httpx.get(running.url + "/health").status_code == 200  # always open
    finally:
        running.stop()


def test_client_leaving_aborts_its_request_within_a_step(tiny_server_fn, engine_of_fn) -> None:
    running = tiny_server_fn()
    engine = engine_of_fn(running)
    slow_steps(engine, 0.05)
    try:
        body = {**LONG, "max_tokens": 200, "n": 2}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 200 steps
            httpx.post(running.api_url + "/completions", json=body, timeout=0.5)
        wait_for(lambda: not engine.has_unfinished_requests, timeout=5)
        assert engine.core.kv_cache_manager.num_used_blocks == 0
        metrics = httpx.get(running.url + "/metrics").text
        assert "inflight_requests_cancelled_total 2.0" in metrics  # both choices
        assert 'inflight_request_success_total{finished_reason="abort"} 2.0' in metrics
        assert "inflight_kv_cache_blocks_used 0.0" in metrics
        for _ in range(2):  # a stream left after 3 events: at most the step in flight runs on (50 ms steps)
            with httpx.stream("POST", running.api_url + "/completions", json={**body, "n": 1, "stream": True},
                              timeout=10) as response:
                lines = response.iter_lines()
                for _ in range(3):
                    next(lines)
                generated = counter(httpx.get(running.url + "/metrics").text, "inflight_generation_tokens_total")
            wait_for(lambda: not engine.has_unfinished_requests, timeout=5)
            metrics = httpx.get(running.url + "/metrics").text
            assert counter(metrics, "inflight_generation_tokens_total") - generated <= 2
        assert engine.core.kv_cache_manager.num_used_blocks == 0
        assert "inflight_requests_cancelled_total 4.0" in metrics
    finally:
        running.stop()


def counter(metrics: str, name: str) -> float:
    """The value of an unlabelled series in Prometheus text output."""
    return float(next(line.split()[1] for line in metrics.splitlines() if line.startswith(name + " ")))


def test_queue_limit_counts_exactly_under_a_burst(tiny_server_fn, engine_of_fn) -> None:
    """2 running slots and 4 queue places: of 12 requests arriving together, exactly 6 are admitted."""
    running = tiny_server_fn(max_num_seqs=2, max_queued_requests=4)
    slow_steps(engine_of_fn(running), 0.05)
    try:
        results: list[httpx.Response] = []
        threads = [post_in_thread(running.api_url + "/completions", LONG, results) for _ in range(12)]
        for thread in threads:
            thread.join(timeout=120)
        statuses = sorted(response.status_code for response in results)
        assert statuses == [200] * 6 + [429] * 6, statuses
    finally:
        running.stop()


def test_the_choices_of_one_request_count_each_other_against_the_queue_limit(tiny_server_fn, engine_of_fn) -> None:
    """n choices are n requests: with 1 queue place left, n=2 is refused whole, and its held place comes back."""
    running = tiny_server_fn(max_num_seqs=1, max_queued_requests=2)
    engine = engine_of_fn(running)
    slow_steps(engine, 0.08)
    url = running.api_url + "/completions"
    try:
        results: list[httpx.Response] = []
        first = post_in_thread(url, LONG, results)  # runs for 60 steps x >= 80 ms
        wait_for(lambda: engine.core.scheduler.num_running == 1)
        queued = post_in_thread(url, SHORT, results)
        wait_for(lambda: engine.core.scheduler.num_waiting == 1)
        refused = httpx.post(url, json={**SHORT, "n": 2}, timeout=10)  # 1 + 2 would be 3 queued
        assert refused.status_code == 429, refused.text
        assert httpx.post(url, json=SHORT, timeout=60).status_code == 200  # the first choice's place came back
        for thread in (first, queued):
            thread.join(timeout=60)
        assert [response.status_code for response in results] == [200, 200]
    finally:
        running.stop()
