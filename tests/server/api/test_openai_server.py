"""The official `openai` client against a real uvicorn server running the real engine client (its core in a thread)
on a tiny random Llama (CPU, float32). Greedy decoding makes every output deterministic, so streamed, batched and
one-at-a-time runs of the same request must agree token for token."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

MODEL = "tiny-llama"
PROMPTS = ["Return the number of", "Create a new", "The default value", "If the file is"]
GREEDY: dict[str, Any] = {"temperature": 0.0}
NO_EOS: dict[str, Any] = {"extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_llama_server: Any) -> Any:
    return tiny_llama_server


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir), local_files_only=True)


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one series in Prometheus text output (0 when absent)."""
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def stream_texts(chunks) -> tuple[dict[int, str], dict[int, str | None]]:
    """Per choice index: concatenated text and finish reason of a completions stream."""
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    return texts, reasons


# ------------------------------------------------------------------------------------------- basics


def test_health_models_and_metrics_endpoints(server: Any, client: openai.OpenAI) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    models = client.models.list().data
    assert [model.id for model in models] == [MODEL] and models[0].owned_by == "inflight"
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200 and "inflight_" in response.text


def test_completion(client: openai.OpenAI, tokenizer) -> None:
    prompt = PROMPTS[0]
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY, **NO_EOS)
    assert result.id.startswith("cmpl-") and result.object == "text_completion" and result.model == MODEL
    assert abs(result.created - time.time()) < 60
    (choice,) = result.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    num_prompt = len(tokenizer.encode(prompt))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        num_prompt, 12, num_prompt + 12)
    # the same prompt as token ids, and in a list of prompts, gives the same text
    by_ids = client.completions.create(model=MODEL, prompt=tokenizer.encode(prompt), max_tokens=12, **GREEDY, **NO_EOS)
    assert by_ids.choices[0].text == choice.text
    batch = client.completions.create(model=MODEL, prompt=[prompt, PROMPTS[1]], max_tokens=12, **GREEDY, **NO_EOS)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == choice.text
    assert batch.usage.prompt_tokens == num_prompt + len(tokenizer.encode(PROMPTS[1]))


def test_completion_echo(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5, **GREEDY, **NO_EOS)
    echoed = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5, echo=True, **GREEDY, **NO_EOS)
    assert echoed.choices[0].text == PROMPTS[1] + plain.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5, echo=True, stream=True,
                                            **GREEDY, **NO_EOS))
    assert stream_texts(chunks)[0][0] == echoed.choices[0].text


def test_completion_stream_equals_non_streamed(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=20, **GREEDY, **NO_EOS)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=20, stream=True,
                                            **GREEDY, **NO_EOS))
    assert len(chunks) > 2 and len({chunk.id for chunk in chunks}) == 1
    assert all(chunk.object == "text_completion" and len(chunk.choices) == 1 for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] == "length"
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])
    texts, _ = stream_texts(chunks)
    assert texts[0] == whole.choices[0].text


def test_stream_bytes_end_with_done(server: Any) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.api_url + "/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(event.startswith("data: {") for event in events[:-2])


def test_chat(client: openai.OpenAI, tokenizer) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe a list."},
    ]
    result = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, **GREEDY,
                                            **NO_EOS)
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion" and result.model == MODEL
    (choice,) = result.choices
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    num_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (num_prompt, 10)
    # the chat prompt through /v1/completions as token ids gives the same reply
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    raw = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, **GREEDY, **NO_EOS)
    assert raw.choices[0].text == choice.message.content


def test_chat_stream_deltas_and_usage(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": [{"type": "text", "text": "Explain "}, {"type": "text", "text": "sets."}]},
    ]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, **GREEDY, **NO_EOS)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY, **NO_EOS))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(chunk.choices[0].delta.role is None for chunk in chunks[1:-1])
    assert chunks[-2].choices[0].finish_reason == "length" and not chunks[-2].choices[0].delta.content
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    assert streamed == whole.choices[0].message.content


def test_completion_stream_include_usage(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=7, stream=True, n=2,
                                            stream_options={"include_usage": True}, **GREEDY, **NO_EOS))
    last = chunks[-1]
    assert last.usage is not None
    assert last.choices == [] and last.usage.completion_tokens == 14
    assert last.usage.total_tokens == last.usage.prompt_tokens + 14


# ------------------------------------------------------------------------------------------- n, seeds


def test_n_choices_use_seed_plus_index(client: openai.OpenAI) -> None:
    sampled: dict[str, Any] = {"temperature": 1.0, "max_tokens": 12, **NO_EOS}
    both = client.completions.create(model=MODEL, prompt=PROMPTS[0], n=2, seed=1234, **sampled)
    assert [choice.index for choice in both.choices] == [0, 1]
    assert both.usage.completion_tokens == 24 and both.usage.prompt_tokens < 24
    for index in (0, 1):
        alone = client.completions.create(model=MODEL, prompt=PROMPTS[0], seed=1234 + index, **sampled)
        assert alone.choices[0].text == both.choices[index].text
    streamed, reasons = stream_texts(client.completions.create(model=MODEL, prompt=PROMPTS[0], n=2, seed=1234,
                                                               stream=True, **sampled))
    assert streamed == {0: both.choices[0].text, 1: both.choices[1].text} and set(reasons.values()) == {"length"}
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2, seed=7,
                                          temperature=1.0, max_tokens=8, **NO_EOS)
    assert [choice.index for choice in chat.choices] == [0, 1] and chat.usage.completion_tokens == 16


# ------------------------------------------------------------------------------------------- stop strings


def raw_bytes(token: str) -> bytes:
    """A logprobs token string back to its bytes ("bytes:\\xe2\\x80" for tokens that are not UTF-8 alone)."""
    return bytes.fromhex(token[6:].replace("\\x", "")) if token.startswith("bytes:") else token.encode()


def straddling_stop(tokens: list[str], text: str) -> tuple[str, int]:
    """A stop string made of the end of one token and the start of the next, first found at its position.

    Args:
        tokens: the output's tokens as the logprobs show them.
        text: the output's text.

    Returns:
        (stop string, character position where it starts in `text`).
    """
    pieces = [raw_bytes(token) for token in tokens]
    for k in range(3, len(tokens)):  # leave a few tokens before it
        first, second = tokens[k - 1], tokens[k]
        if first.startswith("bytes:") or second.startswith("bytes:") or not (first.strip() and second.strip()):
            continue
        before = b"".join(pieces[:k]).decode("utf-8", errors="replace")
        if not text.startswith(before + second):
            continue
        stop, start = first[-2:] + second[:2], len(before) - len(first[-2:])
        if text.find(stop) == start:
            return stop, start
    pytest.fail(f"no stop string straddling two tokens found in {text!r}")


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_stop_string_across_token_boundary(client: openai.OpenAI, prompt: str) -> None:
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, logprobs=0, **GREEDY, **NO_EOS)
    text, tokens = whole.choices[0].text, whole.choices[0].logprobs.tokens
    stop, start = straddling_stop(tokens, text)
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=[stop, "never-seen"], **GREEDY,
                                    **NO_EOS)
    assert cut.choices[0].text == text[:start] and cut.choices[0].finish_reason == "stop"
    streamed, reasons = stream_texts(client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=stop,
                                                               stream=True, **GREEDY, **NO_EOS))
    assert streamed[0] == text[:start] and reasons[0] == "stop"


def test_chat_stop_string(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Describe a dict."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, logprobs=True, **GREEDY,
                                           **NO_EOS)
    text = whole.choices[0].message.content
    stop, start = straddling_stop([entry.token for entry in whole.choices[0].logprobs.content], text)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, stop=stop,
                                                 stream=True, **GREEDY, **NO_EOS))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == text[:start]
    assert chunks[-1].choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------------------- logprobs


def test_completion_logprobs(client: openai.OpenAI) -> None:
    result = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=8, logprobs=3, **GREEDY, **NO_EOS)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert top[token] == pytest.approx(logprob) and logprob == pytest.approx(max(top.values()))  # greedy: argmax
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=8, logprobs=3, stream=True,
                                              **GREEDY, **NO_EOS))
    tokens = []
    for chunk in streamed:
        chunk_logprobs = chunk.choices[0].logprobs
        assert chunk_logprobs is not None and chunk_logprobs.tokens is not None
        tokens += chunk_logprobs.tokens
    assert tokens == logprobs.tokens


def test_chat_logprobs(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY, **NO_EOS)
    content = result.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and entry.logprob == pytest.approx(values[0])
        assert entry.bytes is not None and all(0 <= byte < 256 for byte in entry.bytes)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=6,
                                           **GREEDY, **NO_EOS)
    assert plain.choices[0].logprobs is None


# ------------------------------------------------------------------------------------------- concurrency


def test_32_concurrent_streams_match_one_at_a_time(server: Any, client: openai.OpenAI) -> None:
    prompts = [f"{PROMPTS[i % 4]} {i} items" for i in range(32)]
    lengths = [8 + (i % 5) * 3 for i in range(32)]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=n, **GREEDY, **NO_EOS).choices[0].text
             for p, n in zip(prompts, lengths)]

    async def stream_one(aclient: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> str:
        text = ""
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True,
                                                  **GREEDY, **NO_EOS)
        async for chunk in stream:
            text += chunk.choices[0].text
        return text

    async def all_at_once() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*(stream_one(aclient, p, n) for p, n in zip(prompts, lengths)))

    assert asyncio.run(all_at_once()) == alone


def test_metrics_move_after_requests(server: Any, client: openai.OpenAI) -> None:
    before = httpx.get(server.url + "/metrics").text
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, **GREEDY, **NO_EOS)
    after = httpx.get(server.url + "/metrics").text
    assert metric(after, "inflight_generation_tokens_total") >= metric(before, "inflight_generation_tokens_total") + 5
    assert metric(after, "inflight_prompt_tokens_total") > metric(before, "inflight_prompt_tokens_total")
    success = ("inflight_request_success_total", '{finished_reason="length"}')
    assert metric(after, *success) == metric(before, *success) + 1


def test_client_disconnect_aborts_the_request(server: Any) -> None:
    engine = server.server.config.app.state.serving.engine
    abort = ("inflight_request_success_total", '{finished_reason="abort"}')
    before = metric(httpx.get(server.url + "/metrics").text, *abort)
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.api_url + "/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")
    deadline = time.monotonic() + 10
    while (engine.core.scheduler.num_running or engine.core.scheduler.num_waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.core.scheduler.num_running == 0 and engine.core.scheduler.num_waiting == 0
    assert metric(httpx.get(server.url + "/metrics").text, *abort) == before + 1


# ------------------------------------------------------------------------------------------- errors

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "prompt": "hi"}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("completions", {**COMPLETION, "temperature": 3}, "temperature"),
        ("completions", {**COMPLETION, "top_p": 0}, "top_p"),
        ("completions", {**COMPLETION, "logprobs": 6}, "logprobs"),
        ("completions", {**COMPLETION, "n": 0}, "n"),
        ("completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
        ("completions", {**COMPLETION, "max_tokens": "many"}, "max_tokens"),
        ("completions", {**COMPLETION, "max_tokens": 1000}, "max_tokens"),
        ("completions", {**COMPLETION, "prompt": "word " * 300}, "prompt"),
        ("completions", {**COMPLETION, "prompt": [1, 10**6]}, "prompt"),
        ("completions", {**COMPLETION, "prompt": []}, "prompt"),
        ("completions", {"model": MODEL}, "prompt"),
        ("completions", {**COMPLETION, "stop": [""]}, "stop"),
        ("completions", {**COMPLETION, "stop_token_ids": [-1]}, "stop_token_ids"),
        ("completions", {**COMPLETION, "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        ("completions", {**COMPLETION, "suffix": "x"}, "suffix"),
        ("completions", {**COMPLETION, "logit_bias": {"one": 2.0}}, "logit_bias"),
        ("completions", {**COMPLETION, "best_of": 3, "stream": True}, "best_of"),
        ("completions", {**COMPLETION, "best_of": 2, "n": 3}, "best_of"),
        ("completions", {**COMPLETION, "use_beam_search": True, "stream": True}, "stream"),
        ("completions", {**COMPLETION, "prompt_logprobs": 21}, "prompt_logprobs"),
        ("completions", {**COMPLETION, "stream": True, "stream_options": {"include_usage": "maybe"}},
         "stream_options.include_usage"),
        ("completions", {**COMPLETION, "stream_options": {"include_usage": True}}, "stream_options"),
        ("chat/completions", {**CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
        ("chat/completions", {**CHAT, "messages": []}, "messages"),
        ("chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0]"),
        ("chat/completions", {**CHAT, "max_completion_tokens": 10**4}, "max_completion_tokens"),
        ("chat/completions", {**CHAT, "presence_penalty": -3}, "presence_penalty"),
        ("chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ("chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
    ],
)
def test_invalid_values_are_400_naming_the_param(server: Any, path: str, body: dict, param: str) -> None:
    response = httpx.post(f"{server.api_url}/{path}", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert f"'{param}'" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_json_is_400(server: Any) -> None:
    response = httpx.post(server.api_url + "/completions", content=b'{"prompt": ',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_openai_client_raises_on_bad_request_and_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert isinstance(bad.value.body, dict) and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    body = missing.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found" and body["param"] == "model"


def test_api_key(tiny_llama_dir: Path, port: int, start_server_fn) -> None:
    from server.config import ServerSettings
    from server.launch import build_server

    settings = ServerSettings(model=tiny_llama_dir, port=port, device="cpu", dtype="float32",
                              num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=64, api_key="s3cret",
                              log_level="warning", engine_process=False)
    running = start_server_fn(build_server(settings), settings.url)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = httpx.get(running.api_url + "/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.api_url, api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=running.api_url, api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "tiny-llama"
        assert good.completions.create(model="tiny-llama", prompt="hi", max_tokens=2).choices[0].finish_reason
        assert httpx.get(running.url + "/health").status_code == 200  # outside /v1: no key needed
        assert httpx.get(running.url + "/metrics").status_code == 200
    finally:
        running.stop()


def test_continuous_usage_stats_put_the_usage_so_far_on_every_completion_chunk(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, n=2, **GREEDY, **NO_EOS)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, n=2, stream=True,
                                            stream_options={"continuous_usage_stats": True},  # type: ignore[arg-type]
                                            **GREEDY, **NO_EOS))
    usages = [chunk.usage for chunk in chunks]
    assert all(usage is not None for usage in usages)
    assert whole.usage is not None
    counts = [usage.completion_tokens for usage in usages if usage is not None]
    assert counts == sorted(counts) and counts[-1] == whole.usage.completion_tokens == 12
    assert {usage.prompt_tokens for usage in usages if usage is not None} == {whole.usage.prompt_tokens}
