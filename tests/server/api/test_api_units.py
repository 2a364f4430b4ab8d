"""Protocol, streaming and serving logic against a fake engine: fast, no model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine
from fastapi.testclient import TestClient

from server.api.app import build_app
from server.api.errors import param_of
from server.api.metrics import Metrics
from server.api.protocol import (
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
    UsageInfo,
)
from server.api.streaming import DONE, chunk_event
from server.config import ServerSettings


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def fake_app(tokenizer, engine: FakeEngine, **settings):
    return build_app(ServerSettings(served_model_name="fake", **settings), engine, Metrics(), device="cpu",
                     dtype="float32", vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def slow_server(tokenizer, serve_app_fn) -> Any:
    engine = FakeEngine(tokenizer, max_model_len=4096, delay=0.01)
    running = serve_app_fn(fake_app(tokenizer, engine))
    yield running
    running.stop()


def test_chunk_event_shapes() -> None:
    chunk = ChatCompletionStreamResponse(id="chatcmpl-1", created=1, model="m", choices=[
        ChatCompletionStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))])
    event = chunk_event(chunk, include_usage=False)
    assert event.startswith("data: {") and event.endswith("}\n\n")
    payload = json.loads(event.removeprefix("data: "))
    assert payload == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
    with_usage = json.loads(chunk_event(chunk, include_usage=True).removeprefix("data: "))
    assert with_usage["usage"] is None
    chunk.choices[0].delta = DeltaMessage()
    chunk.usage = UsageInfo(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    payload = json.loads(chunk_event(chunk, include_usage=True).removeprefix("data: "))
    assert payload["choices"][0]["delta"] == {} and payload["usage"]["total_tokens"] == 3
    assert DONE == "data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("location", "param"),
    [
        (("body", "temperature"), "temperature"),
        (("body", "messages", 0, "content", "str"), "messages[0].content"),
        (("body", "messages", 1, "content", "list[ChatContentPart]", 0, "type"), "messages[1].content[0].type"),
        (("body", "prompt", "list[list[int]]", 0, 2), "prompt[0][2]"),
        (("body",), None),
    ],
)
def test_param_of_pydantic_locations(location: tuple, param: str | None) -> None:
    assert param_of(location) == param


def test_engine_not_started_is_503(tokenizer) -> None:
    client = TestClient(fake_app(tokenizer, FakeEngine(tokenizer)))  # no lifespan: the engine never starts
    health = client.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "loading"}
    response = client.post("/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
    assert client.post("/v1/completions", json={"prompt": "hi", "n": 0}).status_code == 400  # schema first
    assert client.get("/v1/nothing").json()["error"]["message"] == "Not Found"


def test_non_streamed_request_is_cancelled_when_the_client_leaves(slow_server: Any) -> None:
    engine = slow_server.server.config.app.state.serving.engine
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.api_url + "/completions", json={"prompt": "hi", "max_tokens": 2000}, timeout=0.3)
    deadline = time.monotonic() + 5
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.active and engine.aborted[-1].startswith("cmpl-")


def test_streamed_n2_request_is_cancelled_when_the_client_leaves(slow_server: Any) -> None:
    engine = slow_server.server.config.app.state.serving.engine
    body = {"prompt": "hi", "max_tokens": 2000, "n": 2, "stream": True}
    with httpx.stream("POST", slow_server.api_url + "/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")
    deadline = time.monotonic() + 5
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.active
    assert {request_id[-2:] for request_id in engine.aborted[-2:]} == {"-0", "-1"}


def test_error_after_the_stream_began_is_an_error_event(tokenizer, serve_app_fn, caplog) -> None:
    class FailingEngine(FakeEngine):
        async def generate(self, request_id, prompt_token_ids, params):
            async for output in super().generate(request_id, prompt_token_ids, params):
                yield output
                if output.num_generated_tokens == 2:
                    raise RuntimeError("step exploded")

    running = serve_app_fn(fake_app(tokenizer, FailingEngine(tokenizer)))
    try:
        body = {"prompt": "hi", "max_tokens": 10, "stream": True}
        with httpx.stream("POST", running.api_url + "/completions", json=body) as response:
            assert response.status_code == 200
            stream_request_id = response.headers["x-request-id"]
            events = [line for line in response.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]  # the request id, not the exception's text
        assert stream_request_id in error["message"] and "exploded" not in error["message"]
        assert error["type"] == "server_error"
        assert any(stream_request_id in record.getMessage() and "step exploded" in record.getMessage()
                   for record in caplog.records)
        response = httpx.post(running.api_url + "/completions", json={"prompt": "hi", "max_tokens": 10})
        request_id = response.headers["x-request-id"]  # not streamed: a 500 naming the request id, not the error
        message = response.json()["error"]["message"]
        assert response.status_code == 500 and request_id in message and "exploded" not in message
        assert any(request_id in record.getMessage() and "step exploded" in (record.exc_text or "")
                   for record in caplog.records)  # the log has the error under that id
    finally:
        running.stop()


def test_model_without_chat_template_rejects_chat(tokenizer, tmp_path: Path) -> None:
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    client = TestClient(fake_app(tokenizer, FakeEngine(tokenizer)))
    with client:
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert "chat template" in response.json()["error"]["message"]


def test_a_value_error_from_a_bug_is_a_500_not_a_400_blaming_the_client(tokenizer, serve_app_fn) -> None:
    class BuggyEngine(FakeEngine):
        def generate(self, request_id, prompt_token_ids, params):
            raise ValueError("an internal invariant broke")  # not an InvalidRequest: nobody's parameter is wrong

    running = serve_app_fn(fake_app(tokenizer, BuggyEngine(tokenizer)))
    try:
        response = httpx.post(running.api_url + "/completions", json={"prompt": "hi", "max_tokens": 4})
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["type"] == "server_error" and "invariant" not in error["message"]
        assert response.headers["x-request-id"] in error["message"]
    finally:
        running.stop()


def test_an_invalid_request_keeps_its_parameter_through_pickling() -> None:
    import pickle

    from server.engine.core_messages import decode_deliveries, encode_deliveries
    from server.engine.errors import InvalidRequest
    from server.engine.outputs import Delivery

    error = pickle.loads(pickle.dumps(InvalidRequest("best_of=9 is too large", "best_of")))
    assert (str(error), error.param) == ("best_of=9 is too large", "best_of")
    outputs, errors = encode_deliveries([Delivery("r", InvalidRequest("too long", "max_tokens"))])
    (delivery,) = decode_deliveries(*pickle.loads(pickle.dumps((outputs, errors))))
    assert isinstance(delivery.item, InvalidRequest) and delivery.item.param == "max_tokens"
