"""`inflight-serve --quantization fp8` serves the checkpoint with FP8 linears: its greedy completion is that of the
FP8 engine (engine_builder's in-memory quantization), not of the float32 one, and the setting is checked."""

from typing import Any

import httpx
import pytest

from engine_builder.loader import load_engine
from server.cli import parse_settings
from server.engine.core.engine_core import EngineCore
from server.engine.engine_config import EngineConfig
from server.engine.sampling_params import SamplingParams

PROMPT = "Return the number of"


def engine_greedy(engine: Any, prompt: list[int], max_tokens: int) -> list[int]:
    core = EngineCore(engine, EngineConfig(num_kv_blocks=64, enable_prefix_caching=False))
    core.add_request("r", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    tokens: list[int] = []
    while core.has_unfinished_requests:
        for output in core.step():
            tokens += output.new_token_ids
    return tokens


def test_the_server_runs_the_fp8_engine(bundled_model_dir, tiny_server_fn) -> None:
    running = tiny_server_fn(model=bundled_model_dir, served_model_name="inflight-tiny", quantization="fp8",
                             generation_config="none")
    try:
        body = {"model": "inflight-tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "logprobs": 0}
        choice = httpx.post(running.api_url + "/completions", json=body, timeout=60).json()["choices"][0]
    finally:
        running.stop()
    fp8 = load_engine(bundled_model_dir, device="cpu", dtype="float32", progress=False, quantization="fp8")
    full = load_engine(bundled_model_dir, device="cpu", dtype="float32", progress=False)
    tokenizer = fp8.tokenizer
    assert tokenizer is not None
    prompt = tokenizer.encode(PROMPT, split_special_tokens=True)
    assert choice["text"] == tokenizer.decode(engine_greedy(fp8, prompt, 24))
    # on this prompt float32 and FP8 part ways within 24 tokens, so the comparison above tells them apart
    assert engine_greedy(full, prompt, 24) != engine_greedy(fp8, prompt, 24)


def test_the_quantization_setting_is_checked() -> None:
    assert parse_settings(["--quantization", "FP8"], {}).quantization == "fp8"
    assert parse_settings([], {"INFLIGHT_QUANTIZATION": "none"}).quantization is None
    with pytest.raises(ValueError, match="--quantization"):
        parse_settings([], {"INFLIGHT_QUANTIZATION": "int4"})
