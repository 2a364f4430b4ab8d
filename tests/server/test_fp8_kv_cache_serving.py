"""`inflight-serve --kv-cache-dtype fp8` serves the bundled model from an FP8 KV cache: its greedy completion is the
FP8-cache engine's (and close to the float32 cache's), the pool holds 4x float32's tokens in the same memory and says
so, and the setting is checked on the command line, in the environment and in a config file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from engine_builder.loader import load_engine
from engine_builder.runtime.kv_cache_dtype import KV_CACHE_DTYPES
from server.cli import main, parse_settings
from server.config import KV_CACHE_DTYPES as SERVER_KV_CACHE_DTYPES
from tests.server.test_quantized_serving import PROMPT, engine_greedy


def test_the_server_serves_from_an_fp8_kv_cache_with_4x_float32s_tokens(bundled_model_dir, tiny_server_fn,
                                                                         engine_of_fn, caplog) -> None:
    sizing: dict[str, Any] = dict(model=bundled_model_dir, served_model_name="inflight-tiny", generation_config="none",
                                  num_kv_blocks=None, kv_cache_memory_fraction=0.002)  # CPU: 0.002 x 1 GiB
    with caplog.at_level(logging.INFO, logger="server.runner.kv_sizing"):
        running = tiny_server_fn(**sizing, kv_cache_dtype="fp8")
    try:
        core = engine_of_fn(running).core
        assert all(layer.key.dtype == torch.float8_e4m3fn for layer in core.executor.runner.kv_caches)
        fp8_blocks = core.num_kv_blocks
        body = {"model": "inflight-tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        choice = httpx.post(running.api_url + "/completions", json=body, timeout=60).json()["choices"][0]
    finally:
        running.stop()
    assert f"KV cache: fp8 (e4m3), {fp8_blocks} blocks" in caplog.text
    assert "= 4x the tokens of float32 in the same memory" in caplog.text
    running = tiny_server_fn(**sizing)
    try:
        full_blocks = engine_of_fn(running).core.num_kv_blocks
        assert 4 * full_blocks <= fp8_blocks < 4 * (full_blocks + 1)  # the same bytes, a quarter per block
    finally:
        running.stop()
    fp8 = load_engine(bundled_model_dir, device="cpu", dtype="float32", progress=False, kv_cache_dtype="fp8")
    full = load_engine(bundled_model_dir, device="cpu", dtype="float32", progress=False)
    tokenizer = fp8.tokenizer
    assert tokenizer is not None
    prompt = tokenizer.encode(PROMPT, split_special_tokens=True)
    fp8_tokens, full_tokens = engine_greedy(fp8, prompt, 24), engine_greedy(full, prompt, 24)
    assert choice["text"] == tokenizer.decode(fp8_tokens)
    assert fp8_tokens[:12] == full_tokens[:12]  # the FP8 cache keeps the float32 cache's greedy start


def test_the_kv_cache_dtype_setting_is_checked(tmp_path: Path, capsys) -> None:
    assert SERVER_KV_CACHE_DTYPES == KV_CACHE_DTYPES
    assert parse_settings([], {}).kv_cache_dtype == "auto"
    assert parse_settings(["--kv-cache-dtype", "FP8"], {}).kv_cache_dtype == "fp8"
    assert parse_settings([], {"INFLIGHT_KV_CACHE_DTYPE": "fp8"}).kv_cache_dtype == "fp8"
    config = tmp_path / "serve.yaml"
    config.write_text("kv-cache-dtype: fp8\n")
    assert parse_settings(["--config", str(config)], {}).kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of auto, fp8; got 'int8'"):
        parse_settings([], {"INFLIGHT_KV_CACHE_DTYPE": "int8"})
    for argv, environ in ((["--kv-cache-dtype", "fp16"], {}), ([], {"INFLIGHT_KV_CACHE_DTYPE": "e5m2"})):
        with pytest.MonkeyPatch.context() as patch:
            for key, value in environ.items():
                patch.setenv(key, value)
            with pytest.raises(SystemExit) as raised:
                main(argv)
        assert raised.value.code == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and error.startswith("inflight-serve: error: ") and "kv-cache-dtype" in error
