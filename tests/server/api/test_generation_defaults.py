"""--generation-config auto|none: the checkpoint's generation_config.json sampling values for the fields a request
omits (as vLLM), read from the bundled model; a real server (seeded sampling) answers a request that omits them like
one that sends the checkpoint's values, and with `none` like one that sends the OpenAI defaults."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.api.generation_defaults import GenerationDefaults
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.cli import UsageError, parse_settings

OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": None, "min_p": 0.0, "repetition_penalty": 1.0}
SEEDS = range(4)


@pytest.fixture(scope="module")
def checkpoint_values(bundled_model_dir: Path) -> dict[str, Any]:
    """The sampling fields generation_config.json of the bundled model names (temperature 0.8, top_k 50, ...)."""
    config = json.loads((bundled_model_dir / "generation_config.json").read_text())
    values = {name: config[name] for name in OPENAI_DEFAULTS if name in config}
    assert values and values != {name: OPENAI_DEFAULTS[name] for name in values}  # else nothing here could fail
    return values


def test_auto_reads_the_checkpoint_sampling_fields(bundled_model_dir: Path, checkpoint_values: dict) -> None:
    defaults = GenerationDefaults.load(bundled_model_dir, "auto")
    assert defaults.values == checkpoint_values
    assert defaults.max_new_tokens == json.loads((bundled_model_dir / "generation_config.json").read_text())[
        "max_new_tokens"]
    assert GenerationDefaults.load(bundled_model_dir, "none").values == {}


def test_fields_the_request_sent_are_kept(bundled_model_dir: Path, checkpoint_values: dict) -> None:
    defaults = GenerationDefaults.load(bundled_model_dir, "auto")
    sent = CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": 1.0, "top_k": 3})
    served = defaults.apply(sent)
    assert served.temperature == 1.0 and served.top_k == 3  # explicit, even at the OpenAI default
    for name in set(checkpoint_values) - {"temperature", "top_k"}:
        assert getattr(served, name) == checkpoint_values[name]
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert {name: getattr(defaults.apply(chat), name) for name in checkpoint_values} == checkpoint_values
    assert sent.temperature == 1.0 and sent.top_p == 1.0  # the parsed request itself is left alone


def test_a_request_sending_every_field_is_served_as_sent(bundled_model_dir: Path) -> None:
    request = CompletionRequest.model_validate({"model": "m", "prompt": "x", **OPENAI_DEFAULTS})
    assert GenerationDefaults.load(bundled_model_dir, "auto").apply(request) is request


def test_no_file_means_no_defaults(tmp_path: Path) -> None:
    assert GenerationDefaults.load(tmp_path, "auto") == GenerationDefaults()


def test_values_a_request_could_not_hold_are_left_out_with_a_warning(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 3.0, "top_p": "high", "top_k": 0, "min_p": 0.05, "repetition_penalty": 1.2}))
    with caplog.at_level(logging.WARNING, logger="server.api.generation_defaults"):
        defaults = GenerationDefaults.load(tmp_path, "auto")
    assert defaults.values == {"min_p": 0.05, "repetition_penalty": 1.2}  # top_k 0: Hugging Face's "no top-k"
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert "temperature=3.0" in warned and "top_p='high'" in warned and "top_k" not in warned


def test_a_file_that_is_not_a_json_object_names_the_file_and_the_way_out(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"generation_config\.json must hold a JSON object.*--generation-config none"):
        GenerationDefaults.load(tmp_path, "auto")


def test_the_setting_from_every_source(tmp_path: Path) -> None:
    assert parse_settings([], {}).generation_config == "auto"
    assert parse_settings(["--generation-config", "none"], {}).generation_config == "none"
    assert parse_settings([], {"INFLIGHT_GENERATION_CONFIG": "NONE"}).generation_config == "none"
    config = tmp_path / "serve.yaml"
    config.write_text("generation-config: none\n")
    assert parse_settings(["--config", str(config)], {}).generation_config == "none"
    with pytest.raises(UsageError, match="invalid choice"):
        parse_settings(["--generation-config", "vllm"], {})
    with pytest.raises(ValueError, match="--generation-config must be one of auto, none; got 'greedy'"):
        parse_settings([], {"INFLIGHT_GENERATION_CONFIG": "greedy"})


@pytest.fixture(scope="module")
def servers(tiny_server_fn: Any, bundled_model_dir: Path) -> Any:
    """--generation-config -> a real server on the bundled model (engine in a thread, CPU) with it."""
    started = {mode: tiny_server_fn(model=bundled_model_dir, served_model_name="inflight-tiny",
                                    generation_config=mode, dtype="auto") for mode in ("auto", "none")}
    yield started
    for running in started.values():
        running.stop()


def complete(server: Any, route: str, seed: int, **fields: Any) -> list[str]:
    """The texts of a seeded request (3 choices, 24 tokens each) to /v1/completions or /v1/chat/completions."""
    body: dict[str, Any] = {"model": "inflight-tiny", "max_tokens": 24, "seed": seed, "n": 3, "ignore_eos": True,
                            **fields}
    if route == "completions":
        body["prompt"] = "Return the number of"
    else:
        body["messages"] = [{"role": "user", "content": "Describe the function."}]
    response = httpx.post(f"{server.api_url}/{route}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    return [choice["text"] if route == "completions" else choice["message"]["content"] for choice in choices]


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_auto_serves_an_omitted_field_as_the_checkpoint_value(servers: Any, route: str,
                                                             checkpoint_values: dict) -> None:
    omitted = [complete(servers["auto"], route, seed) for seed in SEEDS]
    assert omitted == [complete(servers["auto"], route, seed, **checkpoint_values) for seed in SEEDS]
    assert omitted != [complete(servers["auto"], route, seed, **OPENAI_DEFAULTS) for seed in SEEDS]


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_auto_keeps_what_a_request_sends(servers: Any, route: str) -> None:
    sent = [complete(servers["auto"], route, seed, **OPENAI_DEFAULTS) for seed in SEEDS]
    assert sent == [complete(servers["none"], route, seed, **OPENAI_DEFAULTS) for seed in SEEDS]


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_none_serves_an_omitted_field_as_the_openai_default(servers: Any, route: str) -> None:
    omitted = [complete(servers["none"], route, seed) for seed in SEEDS]
    assert omitted == [complete(servers["none"], route, seed, **OPENAI_DEFAULTS) for seed in SEEDS]


def test_greedy_requests_get_the_checkpoint_repetition_penalty(servers: Any, checkpoint_values: dict) -> None:
    greedy = complete(servers["auto"], "completions", 0, temperature=0)
    assert greedy == complete(servers["auto"], "completions", 0, temperature=0,
                              repetition_penalty=checkpoint_values["repetition_penalty"])


def test_the_defaults_are_logged_at_start_up(tiny_server_fn: Any, bundled_model_dir: Path,
                                             caplog: pytest.LogCaptureFixture, checkpoint_values: dict) -> None:
    with caplog.at_level(logging.INFO, logger="server"):
        running = tiny_server_fn(model=bundled_model_dir, served_model_name="inflight-tiny", dtype="auto")
    running.stop()
    (line,) = [record.getMessage() for record in caplog.records if "generation config auto" in record.getMessage()]
    assert str(bundled_model_dir / "generation_config.json") in line
    for name, value in checkpoint_values.items():
        assert f"{name}={value}" in line


def test_beam_search_gets_only_the_temperature(bundled_model_dir: Path, checkpoint_values: dict) -> None:
    request = CompletionRequest.model_validate({"model": "m", "prompt": "x", "use_beam_search": True, "n": 2})
    served = GenerationDefaults.load(bundled_model_dir, "auto").apply(request)
    assert served.temperature == checkpoint_values["temperature"]
    assert (served.top_p, served.top_k, served.repetition_penalty) == (1.0, None, 1.0)  # beam search refuses them


def test_a_beam_search_request_omitting_sampling_fields_is_served(servers: Any) -> None:
    response = httpx.post(f"{servers['auto'].api_url}/completions", timeout=60, json={
        "model": "inflight-tiny", "prompt": "Return the number of", "max_tokens": 8, "n": 2, "use_beam_search": True})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2


def test_max_new_tokens_is_the_default_max_tokens_of_requests_that_send_none(servers: Any,
                                                                              bundled_model_dir: Path) -> None:
    max_new_tokens = json.loads((bundled_model_dir / "generation_config.json").read_text())["max_new_tokens"]
    body: dict[str, Any] = {"model": "inflight-tiny", "messages": [{"role": "user", "content": "Describe it."}],
                            "ignore_eos": True, "temperature": 0}
    usage = {mode: httpx.post(f"{servers[mode].api_url}/chat/completions", json=body, timeout=120).json()["usage"]
             for mode in ("auto", "none")}
    assert usage["auto"]["completion_tokens"] == max_new_tokens  # as vLLM: the checkpoint's max_new_tokens
    assert usage["none"]["completion_tokens"] > max_new_tokens  # up to the context
    sent = httpx.post(f"{servers['auto'].api_url}/chat/completions", json={**body, "max_tokens": 7}, timeout=60)
    assert sent.json()["usage"]["completion_tokens"] == 7
