"""--logprobs-mode (vLLM's names) from every source into the EngineConfig that the engine core (and its runner) is
built with; --tool-call-parser onto the settings the API layer is built with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.cli import UsageError, parse_settings
from server.engine.engine_config import EngineConfig
from server.launch import core_args


def test_logprobs_mode_from_every_source(tmp_path: Path) -> None:
    assert parse_settings([], {}).logprobs_mode == "raw_logprobs"
    assert parse_settings(["--logprobs-mode", "processed_logprobs"], {}).logprobs_mode == "processed_logprobs"
    assert parse_settings([], {"INFLIGHT_LOGPROBS_MODE": "processed_logprobs"}).logprobs_mode == "processed_logprobs"
    config = tmp_path / "serve.toml"
    config.write_text('logprobs-mode = "processed_logprobs"\n')
    assert parse_settings(["--config", str(config)], {}).logprobs_mode == "processed_logprobs"
    assert parse_settings(["--config", str(config), "--logprobs-mode", "raw_logprobs"], {}).logprobs_mode == (
        "raw_logprobs")  # the command line wins


def test_an_unknown_logprobs_mode_names_the_option_and_the_choices() -> None:
    with pytest.raises(UsageError, match="invalid choice"):
        parse_settings(["--logprobs-mode", "processed_logits"], {})
    with pytest.raises(ValueError, match="--logprobs-mode must be one of raw_logprobs, processed_logprobs; got 'x'"):
        parse_settings([], {"INFLIGHT_LOGPROBS_MODE": "x"})
    with pytest.raises(ValueError, match="logprobs_mode 'x' must be one of raw_logprobs, processed_logprobs"):
        EngineConfig(logprobs_mode="x").validate()


def test_logprobs_mode_and_cpu_threads_reach_the_engine_core_args() -> None:
    args = core_args(parse_settings(["--logprobs-mode", "processed_logprobs", "--cpu-threads", "3"], {}))
    assert args.config.logprobs_mode == "processed_logprobs"  # the EngineConfig every rank's runner is built with
    assert args.cpu_threads == 3


def test_the_engine_core_of_a_real_server_has_the_logprobs_mode(tiny_server_fn: Any, engine_of_fn: Any) -> None:
    running = tiny_server_fn(logprobs_mode="processed_logprobs")
    try:
        assert engine_of_fn(running).core.config.logprobs_mode == "processed_logprobs"
    finally:
        running.stop()


def test_tool_call_parser_from_every_source(tmp_path: Path) -> None:
    assert parse_settings([], {}).tool_call_parser is None
    assert parse_settings(["--tool-call-parser", "hermes"], {}).tool_call_parser == "hermes"
    assert parse_settings([], {"INFLIGHT_TOOL_CALL_PARSER": "llama3_json"}).tool_call_parser == "llama3_json"
    config = tmp_path / "serve.yaml"
    config.write_text("tool-call-parser: hermes\n")
    assert parse_settings(["--config", str(config)], {}).tool_call_parser == "hermes"
    # "none" said on a higher source turns off a parser a lower one named
    assert parse_settings(["--config", str(config), "--tool-call-parser", "none"], {}).tool_call_parser is None
    assert parse_settings(["--config", str(config)], {"INFLIGHT_TOOL_CALL_PARSER": "none"}).tool_call_parser is None


def test_an_unknown_tool_call_parser_names_the_option_and_the_choices() -> None:
    with pytest.raises(UsageError, match="invalid choice"):
        parse_settings(["--tool-call-parser", "mistral"], {})
    with pytest.raises(ValueError, match="--tool-call-parser must be one of llama3_json, hermes; got 'mistral'"):
        parse_settings([], {"INFLIGHT_TOOL_CALL_PARSER": "mistral"})
