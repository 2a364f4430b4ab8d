"""KV pool sizing and engine settings validation."""

import logging
from types import SimpleNamespace

import pytest
import torch

from engine_builder.engine_dir import EngineLimits
from engine_builder.forward_batch import KVCacheSpec
from server.engine.engine_config import EngineConfig
from server.runner.kv_sizing import GIB, resolve_num_kv_blocks


def fake_engine(num_layers=2, num_kv_heads=2, head_dim=16, max_seq_len=512, max_batch_size=64,
                kv_cache_dtype=torch.float32):
    return SimpleNamespace(
        device=torch.device("cpu"),
        dtype=torch.float32,
        kv_cache_spec=KVCacheSpec(num_layers, num_kv_heads, head_dim, kv_cache_dtype),
        limits=EngineLimits(max_seq_len=max_seq_len, max_batch_size=max_batch_size, max_num_tokens=4096),
    )


def test_explicit_block_count_wins(caplog):
    with caplog.at_level(logging.INFO):
        assert resolve_num_kv_blocks(fake_engine(), EngineConfig(num_kv_blocks=7)) == 7
    assert "7 blocks" in caplog.text and "explicit" in caplog.text


def test_cpu_pool_holds_max_num_seqs_full_length_requests():
    config = EngineConfig(block_size=16, max_num_seqs=8)
    # min(max_num_seqs, engine max_batch_size) x ceil(512 / 16) blocks
    assert resolve_num_kv_blocks(fake_engine(), config) == 8 * 32
    assert resolve_num_kv_blocks(fake_engine(max_batch_size=3), config) == 3 * 32


def test_an_fp8_cache_holds_four_times_the_float32_tokens_in_the_same_memory_and_says_so(caplog):
    config = EngineConfig(block_size=16, kv_cache_memory_fraction=0.5)
    full = resolve_num_kv_blocks(fake_engine(32, 8, 128, 8192, 256), config)
    with caplog.at_level(logging.INFO):
        fp8 = resolve_num_kv_blocks(fake_engine(32, 8, 128, 8192, 256, kv_cache_dtype=torch.float8_e4m3fn), config)
    assert fp8 == 4 * full
    assert f"KV cache: fp8 (e4m3), {fp8} blocks" in caplog.text
    assert "= 4x the tokens of float32 in the same memory" in caplog.text


def test_an_fp8_pool_not_sized_by_memory_claims_no_capacity_gain(caplog):
    fp8_engine = fake_engine(max_seq_len=8192, kv_cache_dtype=torch.float8_e4m3fn)  # 2 KiB blocks
    with caplog.at_level(logging.INFO):
        assert resolve_num_kv_blocks(fp8_engine, EngineConfig(num_kv_blocks=100)) == 100
        # 3 requests x 8192 tokens fit under the 1 GiB cap in either dtype: the same pool as float32's
        assert resolve_num_kv_blocks(fp8_engine, EngineConfig(block_size=16, max_num_seqs=3)) == 3 * 512
    assert "the tokens of" not in caplog.text
    assert caplog.text.count("1/4 of float32's bytes per token") == 2


def test_cpu_pool_is_capped_at_a_fraction_of_one_gib():
    engine = fake_engine(num_layers=32, num_kv_heads=8, head_dim=128, max_seq_len=8192, max_batch_size=256)
    config = EngineConfig(block_size=16, kv_cache_memory_fraction=0.5)
    per_block = engine.kv_cache_spec.bytes_per_block(16)
    blocks = resolve_num_kv_blocks(engine, config)
    assert blocks == int(GIB * 0.5) // per_block
    assert blocks * per_block <= 0.5 * GIB


def test_a_block_larger_than_the_cap_is_an_error():
    engine = fake_engine(num_layers=1, num_kv_heads=1, head_dim=1 << 20)
    with pytest.raises(ValueError, match="kv_cache_memory_fraction"):
        resolve_num_kv_blocks(engine, EngineConfig(block_size=1024, kv_cache_memory_fraction=0.01))


@pytest.mark.parametrize("field, bad", [("block_size", 0), ("num_kv_blocks", 0), ("kv_cache_memory_fraction", 1.5),
                                        ("kv_cache_memory_fraction", 0.0), ("max_num_seqs", 0),
                                        ("max_num_batched_tokens", 0), ("max_queued_requests", 0)])
def test_out_of_range_settings_name_themselves(field, bad):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: bad}).validate()
