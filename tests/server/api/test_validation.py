"""Input limits beyond the basics of test_openai_server.py: every one is a 400 with the OpenAI error JSON
naming the parameter (never FastAPI's 422), on the real server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

MODEL = "tiny-llama"
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BEAM = {"use_beam_search": True, "best_of": 2}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("completions", {**COMPLETION, "stop": [f"s{i}" for i in range(17)]}, "stop"),
        ("completions", {**COMPLETION, "stop": ["x" * 257]}, "stop[0]"),
        ("chat/completions", {**CHAT, "stop": [f"s{i}" for i in range(17)]}, "stop"),
        ("completions", {**COMPLETION, "stop_token_ids": list(range(65))}, "stop_token_ids"),
        ("completions", {**COMPLETION, "seed": 2**64}, "seed"),
        ("chat/completions", {**CHAT, "seed": -(2**63) - 1}, "seed"),
        ("completions", {**COMPLETION, "n": 129}, "n"),
        ("completions", {**COMPLETION, "best_of": 0}, "best_of"),
        ("completions", {**COMPLETION, "prompt": ["a", "b", "c"], "n": 50}, "n"),
        ("completions", {**COMPLETION, "repetition_penalty": 5e-324}, "repetition_penalty"),
        ("chat/completions", {**CHAT, "repetition_penalty": 11}, "repetition_penalty"),
        ("completions", {**COMPLETION, "top_k": 0}, "top_k"),
        ("completions", {**COMPLETION, "min_p": 1.5}, "min_p"),
        ("completions", {**COMPLETION, "frequency_penalty": 2.5}, "frequency_penalty"),
        ("completions", {**COMPLETION, "min_tokens": -1}, "min_tokens"),
        ("completions", {**COMPLETION, "prompt": [[1, 2], []]}, "prompt"),
        ("completions", {**COMPLETION, "prompt": [[1, 2], [3, -4]]}, "prompt"),
        ("completions", {**COMPLETION, "n": "two"}, "n"),
        ("completions", {**COMPLETION, "top_k": True}, "top_k"),
        ("chat/completions", {**CHAT, "max_tokens": "5"}, "max_tokens"),
        ("completions", {**COMPLETION, "echo": "maybe"}, "echo"),
        ("chat/completions", {**CHAT, "messages": "hello"}, "messages"),
        ("chat/completions", {**CHAT, "max_tokens": -5}, "max_tokens"),
        ("completions", {**COMPLETION, "stop": "x" * 257}, "stop"),
        ("chat/completions", {**CHAT, "stop": "x" * 257}, "stop"),
        *[("completions", {**COMPLETION, **BEAM, "length_penalty": value}, "length_penalty")
          for value in (1e308, -1e308, 10.5, -10.5)],
        ("chat/completions", {**CHAT, **BEAM, "length_penalty": 1e308}, "length_penalty"),
        ("completions", {**COMPLETION, "max_tokens": 2**31}, "max_tokens"),
        ("chat/completions", {**CHAT, "max_completion_tokens": 2**31}, "max_completion_tokens"),
        ("completions", {**COMPLETION, "min_tokens": 2**31}, "min_tokens"),
        ("completions", {**COMPLETION, "top_k": 2**31}, "top_k"),
        ("completions", {**COMPLETION, "temperature": 2.5}, "temperature"),
        ("completions", {**COMPLETION, "top_p": 0.0}, "top_p"),
        ("completions", {**COMPLETION, "presence_penalty": -2.5}, "presence_penalty"),
        ("completions", {**COMPLETION, "logprobs": 6}, "logprobs"),
        ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("completions", {**COMPLETION, "logit_bias": {"5": 100.5}}, "logit_bias.5"),
        ("completions", {**COMPLETION, "logit_bias": {"5": 1e308}}, "logit_bias.5"),
        ("completions", {**COMPLETION, "best_of": 129}, "best_of"),
        ("completions", {**COMPLETION, "stop_token_ids": [2**63]}, "stop_token_ids"),
    ],
)
def test_limits_are_400_naming_the_param(tiny_llama_server: Any, path: str, body: dict, param: str) -> None:
    response = httpx.post(f"{tiny_llama_server.api_url}/{path}", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("raw", [b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "top_p": Infinity}',
                                 b'[1, 2]', b'"prompt"', b'{"prompt": "hi",}', b""])
def test_non_json_values_and_bodies_are_400(tiny_llama_server: Any, raw: bytes) -> None:
    response = httpx.post(tiny_llama_server.api_url + "/completions", content=raw,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_tiny_temperatures_do_not_overflow(tiny_llama_server: Any) -> None:
    response = httpx.post(tiny_llama_server.api_url + "/completions",
                          json={**COMPLETION, "temperature": 5e-324, "max_tokens": 4, "logprobs": 1})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("length_penalty", [-10.0, 10.0])
def test_beam_search_at_the_length_penalty_bounds_scores_finitely(
    tiny_llama_server: Any, length_penalty: float
) -> None:
    response = httpx.post(tiny_llama_server.api_url + "/completions", timeout=60, json={
        **COMPLETION, **BEAM, "n": 2, "max_tokens": 24, "length_penalty": length_penalty})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2
