"""The engine core in its own process (`inflight-serve`'s default) behind a real uvicorn server, on the bundled
model (CPU), through the official `openai` client: greedy outputs equal the in-thread engine's, the child's
rejections are 400s, /metrics is fed from the child, its death is a 503 and a stream error (never a hang),
and shutdown leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai.types.chat import ChatCompletionMessageParam

MODEL = "inflight-tiny"
GREEDY: dict[str, Any] = {"temperature": 0.0}
NO_EOS: dict[str, Any] = {"extra_body": {"ignore_eos": True}}
# 28 blocks of 16 tokens: a request needing more than 448 tokens can never fit, though max_model_len (512) allows it
SETTINGS = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 28, "max_num_seqs": 8,
            "max_num_batched_tokens": 256, "log_level": "warning"}
LONG = {"model": MODEL, "prompt": "If the file is", "max_tokens": 400, "stream": True, "ignore_eos": True}
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe a list."},
]


@pytest.fixture(scope="module")
def start(bundled_model_dir: Path, start_server_fn, free_port_fn) -> Callable[[bool], Any]:
    """start(engine_process) -> RunningServer of the bundled model with SETTINGS."""
    from server.config import ServerSettings
    from server.launch import build_server

    def start_one(engine_process: bool) -> Any:
        import torch

        # The engine core process takes the threads this process runs the in-thread engine with: another count sums
        # the matmuls in another order, and logprobs differ in the 7th digit.
        settings = ServerSettings(model=bundled_model_dir, port=free_port_fn(), engine_process=engine_process,
                                  cpu_threads=torch.get_num_threads() if engine_process else None, **SETTINGS)
        return start_server_fn(build_server(settings), settings.url)

    return start_one


@pytest.fixture(scope="module")
def server(start, engine_of_fn) -> Iterator[Any]:
    """The server with its engine core in a child process.

    test_shutdown_aborts_the_rest_and_ends_the_child shuts it down.
    """
    running = start(True)
    assert engine_of_fn(running).pid != os.getpid()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(start) -> Iterator[Any]:
    """The same server with the engine in a thread of its own process (engine_process=False)."""
    running = start(False)
    yield running
    running.stop()


def client_of(running: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0, timeout=60)


def metric(running: Any, name: str, labels: str = "") -> float:
    """The value of one series on the server's /metrics (0 when absent)."""
    text = httpx.get(running.url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def completion_results(running: Any) -> dict[str, Any]:
    """Greedy completions and chats (whole and streamed, logprobs, n=2, beam search) as comparable values."""
    client = client_of(running)
    prompt = "Return the number of"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, logprobs=2, **GREEDY, **NO_EOS)
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, stream=True, **GREEDY,
                                              **NO_EOS))
    choices = client.completions.create(model=MODEL, prompt=[prompt, "Create a new"], n=2, max_tokens=12, **GREEDY)
    beams = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=2, **GREEDY,
                                      extra_body={"use_beam_search": True, "best_of": 3})
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, **GREEDY, **NO_EOS)
    chat_chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, stream=True,
                                                      stream_options={"include_usage": True}, **GREEDY, **NO_EOS))
    assert chat_chunks[-1].usage is not None  # include_usage: the last chunk carries it
    return {
        "text": whole.choices[0].text,
        "logprobs": whole.choices[0].logprobs.model_dump(),
        "usage": whole.usage.model_dump(),
        "streamed": "".join(chunk.choices[0].text for chunk in streamed),
        "streamed_finish": streamed[-1].choices[0].finish_reason,
        "choices": [(c.index, c.text, c.finish_reason) for c in choices.choices],
        "beams": [(c.index, c.text, c.finish_reason) for c in beams.choices],
        "chat": (chat.choices[0].message.content, chat.choices[0].finish_reason, chat.usage.model_dump()),
        "chat_streamed": "".join(chunk.choices[0].delta.content or "" for chunk in chat_chunks[:-1]),
        "chat_streamed_usage": chat_chunks[-1].usage.model_dump(),
    }


def test_greedy_outputs_equal_the_in_thread_engine(server: Any, reference: Any) -> None:
    ours, theirs = completion_results(server), completion_results(reference)
    our_logprobs, their_logprobs = ours.pop("logprobs"), theirs.pop("logprobs")
    assert ours == theirs
    # a prompt whose KV an earlier request cached (computed in another batch) differs in rounding only
    assert our_logprobs["tokens"] == their_logprobs["tokens"]
    assert our_logprobs["token_logprobs"] == pytest.approx(their_logprobs["token_logprobs"], abs=1e-5)
    for our_top, their_top in zip(our_logprobs["top_logprobs"], their_logprobs["top_logprobs"], strict=True):
        assert our_top == pytest.approx(their_top, abs=1e-5)
    assert ours["text"] and ours["streamed"] == ours["text"] and ours["streamed_finish"] == "length"
    assert ours["chat_streamed"] == ours["chat"][0] and ours["chat_streamed_usage"] == ours["chat"][2]
    assert len(ours["beams"]) == 2 and len(ours["choices"]) == 4


def test_a_request_that_can_never_fit_is_refused_before_it_is_sent(server: Any, engine_of_fn) -> None:
    from server.engine.sampling_params import SamplingParams

    engine = engine_of_fn(server)  # the API process checks the engine's limits itself: no stream is opened
    with pytest.raises(ValueError, match="KV blocks"):
        engine.generate("too-long", [5] * 420, SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate("bad-id", [10**6], SamplingParams(max_tokens=4))
    assert not engine.has_unfinished_requests


@pytest.mark.parametrize("stream", [False, True])
def test_requests_the_engine_core_rejects_are_400(server: Any, stream: bool) -> None:
    never_fits = {"model": MODEL, "prompt": "Return the number of", "max_tokens": 480, "stream": stream}
    response = httpx.post(server.api_url + "/completions", json=never_fits, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "KV" in error["message"] and error["param"] == "max_tokens"
    one_never_fits = {"model": MODEL, "prompt": [[5, 6, 7], [5] * 420], "max_tokens": 40, "stream": stream}
    response = httpx.post(server.api_url + "/completions", json=one_never_fits, timeout=30)
    assert response.status_code == 400, response.text  # not a 200 whose stream ends in an error
    assert "KV" in response.json()["error"]["message"]
    bad_schema = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": stream, "response_format": {
        "type": "json_schema", "json_schema": {"name": "broken", "schema": {"type": "no-such-type"}}}}
    response = httpx.post(server.api_url + "/chat/completions", json=bad_schema, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]  # refused by the engine core process: the parameter crossed with it
    assert error["type"] == "invalid_request_error" and error["param"] == "response_format", error
    assert httpx.get(server.url + "/health").status_code == 200  # the engine carries on


def test_metrics_come_from_the_engine_core_and_blocks_are_returned(server: Any) -> None:
    client = client_of(server)
    generated = metric(server, "inflight_generation_tokens_total")
    finished = metric(server, "inflight_request_success_total", '{finished_reason="length"}')
    client.completions.create(model=MODEL, prompt="Create a new", max_tokens=10, **GREEDY, **NO_EOS)
    assert metric(server, "inflight_generation_tokens_total") == generated + 10
    assert metric(server, "inflight_request_success_total", '{finished_reason="length"}') == finished + 1
    assert metric(server, "inflight_step_latency_seconds_count") > 0
    assert metric(server, "inflight_engine_healthy") == 1
    assert metric(server, "inflight_kv_cache_blocks_used") == 0
    # a client that leaves mid-stream: its request is aborted in the child and its blocks come back
    cancelled = metric(server, "inflight_requests_cancelled_total")
    with httpx.stream("POST", server.api_url + "/completions", json=LONG, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert metric(server, "inflight_kv_cache_blocks_used") > 0
    wait_for(lambda: metric(server, "inflight_requests_cancelled_total") == cancelled + 1)
    wait_for(lambda: metric(server, "inflight_request_success_total", '{finished_reason="abort"}') >= 1)
    wait_for(lambda: metric(server, "inflight_kv_cache_blocks_used") == 0)
    assert metric(server, "inflight_requests_running") == 0


def test_shutdown_aborts_the_rest_and_ends_the_child(server: Any, engine_of_fn) -> None:
    """Runs last against the shared server: it shuts its engine down (as the server's lifespan does on exit)."""
    engine = engine_of_fn(server)
    pid = engine.pid
    with httpx.stream("POST", server.api_url + "/completions", json=LONG, timeout=30) as response:
        lines = response.iter_lines()
        next(lines)
        asyncio.run_coroutine_threadsafe(engine.shutdown(), engine._loop).result(timeout=60)
        events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "abort", events[-1]
    assert not process_alive(pid)
    assert httpx.get(server.url + "/health").status_code == 503
    server.stop()
    assert not server.thread.is_alive()


def test_a_killed_engine_core_is_503_and_ends_streams_with_an_error(start, engine_of_fn) -> None:
    running = start(True)
    try:
        pid = engine_of_fn(running).pid
        with httpx.stream("POST", running.api_url + "/completions", json=LONG, timeout=30) as response:
            lines = response.iter_lines()
            next(lines)
            os.kill(pid, signal.SIGKILL)
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "engine" in error["message"] and "SIGKILL" in error["message"], error
        assert httpx.get(running.url + "/health").status_code == 503
        assert metric(running, "inflight_engine_healthy") == 0
        refused = httpx.post(running.api_url + "/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
    finally:
        running.stop()
    assert not running.thread.is_alive()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_async_scheduling_setting_reaches_the_engine(tiny_llama_dir: Path, async_scheduling: bool) -> None:
    from server.config import ServerSettings
    from server.launch import build_server

    settings = ServerSettings(model=tiny_llama_dir, device="cpu", num_kv_blocks=16, max_num_seqs=4,
                              max_num_batched_tokens=64, engine_process=False, async_scheduling=async_scheduling)
    app = build_server(settings).config.app
    assert isinstance(app, FastAPI)  # uvicorn types Config.app as any ASGI application
    engine = app.state.serving.engine
    assert engine.core.config.async_scheduling is async_scheduling
