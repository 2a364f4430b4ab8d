"""Beam search, structured output and logit_bias through the official `openai` client against the real
server (tiny random Llama on CPU): beams equal transformers' generate(num_beams), response_format outputs
validate with jsonschema, logit_bias forces and forbids tokens, and misuse is a 400 naming the parameter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import torch
from openai.types.chat import ChatCompletionMessageParam

from server.api.logprobs import token_bytes, token_text

SCHEMA = {  # every leaf an enum, a boolean or a bounded array: a random model still finishes it
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "sizes": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 3},
        "inner": {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}}, "required": ["kind"]},
    },
    "required": ["color", "ok", "sizes", "inner"],
}


@pytest.fixture(scope="module")
def client(tiny_llama_server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_llama_server.api_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir), local_files_only=True)


def test_completion_beam_search_returns_transformers_best_beams_with_logprobs(client, hf_model, tokenizer) -> None:
    prompt = tokenizer.encode("Return the number of")
    with torch.no_grad():
        hf = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=2,
                               length_penalty=0.5, early_stopping=True)
    want = [tokenizer.decode(row[len(prompt):], skip_special_tokens=True) for row in hf]
    response = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=8, n=2, best_of=3, logprobs=2,
        extra_body={"use_beam_search": True, "length_penalty": 0.5, "early_stopping": True},
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text.replace("\ufffd", "") for c in response.choices] == [w.replace("\ufffd", "") for w in want]
    for choice in response.choices:
        assert len(choice.logprobs.tokens) == 8 and all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert response.usage.completion_tokens == 16


def test_chat_beam_search_and_streaming_refused(client) -> None:
    messages = [{"role": "user", "content": "Say something"}]
    response = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=6, n=2,
                                              extra_body={"use_beam_search": True, "best_of": 4})
    assert len(response.choices) == 2 and all(c.finish_reason in ("stop", "length") for c in response.choices)
    with pytest.raises(openai.BadRequestError, match="beam search"):
        client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=6, stream=True,
                                       extra_body={"use_beam_search": True})
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=4, n=3, best_of=2,
                                  extra_body={"use_beam_search": True})


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chat_json_schema_output_validates(client, temperature: float) -> None:
    for seed in range(3):
        response = client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "Describe it"}], max_tokens=200,
            temperature=temperature, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}},
        )
        choice = response.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_completion_response_format_json_schema_and_json_object(client, tiny_llama_server) -> None:
    body = {"model": "tiny-llama", "prompt": "A thing:", "max_tokens": 200, "temperature": 0.0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}}
    response = httpx.post(tiny_llama_server.api_url + "/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    jsonschema.validate(json.loads(response.json()["choices"][0]["text"]), SCHEMA)
    body["response_format"] = {"type": "json_object"}
    body["max_tokens"] = None  # up to the context length
    choice = httpx.post(tiny_llama_server.api_url + "/completions", json=body, timeout=60).json()["choices"][0]
    if choice["finish_reason"] == "stop":  # a random model may write an object longer than max_tokens
        assert isinstance(json.loads(choice["text"]), dict)
    else:
        assert choice["text"].startswith("{")


def test_uncompilable_schema_is_400_naming_the_problem(client) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "flurb"}}}
    with pytest.raises(openai.BadRequestError, match="flurb"):
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "x"}], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": bad}},
        )


@pytest.mark.parametrize("extra", [{"stop": [","]}, {"extra_body": {"stop_token_ids": [5]}}])
def test_stop_conditions_with_response_format_are_400(client, extra: dict) -> None:
    """Cutting grammar-constrained output early would return JSON that does not parse, with finish_reason stop."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "x"}], max_tokens=5,
            response_format={"type": "json_object"}, **extra,
        )
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == ("stop" if "stop" in extra else "stop_token_ids")


def test_logit_bias_forces_and_forbids_tokens_on_both_endpoints(client, tokenizer, hf_model) -> None:
    forced = tokenizer.encode(" the", add_special_tokens=False)[0]
    assert token_text(token_bytes(tokenizer, forced)) == " the"
    response = client.completions.create(model="tiny-llama", prompt="Return the", max_tokens=5, temperature=1.0,
                                         logprobs=0, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert response.choices[0].logprobs.tokens == [tokenizer.decode([forced])] * 5
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0.0, logit_bias={str(forced): 100}, logprobs=True)
    assert [t.token for t in chat.choices[0].logprobs.content] == [tokenizer.decode([forced])] * 4
    prompt = [5, 6, 7]
    with torch.no_grad():
        first, second = hf_model(torch.tensor([prompt])).logits[0, -1].topk(2).indices.tolist()
    banned = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=1, temperature=0.0,
                                       logprobs=0, logit_bias={str(first): -100})
    assert banned.choices[0].logprobs.tokens == [token_text(token_bytes(tokenizer, second))]


@pytest.mark.parametrize("bias", [{"5": 101}, {"abc": 1}, {"99999999": 1}])
def test_bad_logit_bias_is_400(client, bias: dict) -> None:
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=2, logit_bias=bias)


def test_streamed_structured_output_validates(client) -> None:
    chunks = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Stream it"}], max_tokens=200, temperature=0.0,
        stream=True, response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}},
    )
    text, reason = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    assert reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_without_max_tokens_the_default_is_capped_to_what_fits_the_kv_cache(tiny_server_fn) -> None:
    server = tiny_server_fn(num_kv_blocks=12)  # 12 blocks of 16 tokens: less than one 256-token context
    try:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "The quick brown fox"}]
        plain = client.chat.completions.create(model="tiny-llama", messages=messages, temperature=0,
                                               extra_body={"ignore_eos": True})  # no max_tokens: chat's default
        assert plain.usage is not None
        num_prompt = plain.usage.prompt_tokens
        assert plain.choices[0].finish_reason == "length"
        assert plain.usage.completion_tokens == 12 * 16 + 1 - num_prompt  # every KV slot used, none more
        beams = client.chat.completions.create(model="tiny-llama", messages=messages, n=2,
                                               extra_body={"use_beam_search": True, "best_of": 4})
        assert len(beams.choices) == 2  # 4 beams of at most 3 blocks each: not refused
        assert beams.usage is not None and beams.usage.completion_tokens <= 2 * (3 * 16 + 1 - num_prompt)
        with pytest.raises(openai.BadRequestError) as error:  # a prompt that cannot fit with 6 beams
            long: list[ChatCompletionMessageParam] = [{"role": "user", "content": "word " * 40}]
            client.chat.completions.create(model="tiny-llama", messages=long,
                                           extra_body={"use_beam_search": True, "best_of": 6})
        body = error.value.body
        assert isinstance(body, dict)
        assert body["param"] == "messages" and "KV cache" in body["message"]
    finally:
        server.stop()
