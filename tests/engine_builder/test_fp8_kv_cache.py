"""The FP8 KV cache (--kv-cache-dtype fp8) on the CPU: the torch references and, through Triton's interpreter, the
Triton kernels against float math; the engine's cache, capacity and scales; the bundled model's held-out accuracy.

Tolerances: e4m3 keeps 3 mantissa bits, so one stored value is off by at most 1/16 of itself (half a step) plus half
the subnormal step (2**-10 x scale); attention over such K/V stays within 6% of the float result (norm of the
difference over the norm of the result).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_builder.cli import main as build_main
from engine_builder.forward_batch import AttentionMetadata, build_forward_batch
from engine_builder.kernels.kv_cache import quantize_kv, write_kv
from engine_builder.kernels.paged_attention import paged_attention_reference
from engine_builder.kernels.rotary import apply_rotary, rotary_and_write_kv
from engine_builder.layers.attention import Attention
from engine_builder.loader import Engine, load_engine
from engine_builder.runtime.torch_backend import TorchBackend
from tests.engine_builder.test_fp8 import BUNDLED, held_out_stream

FP8 = torch.float8_e4m3fn
KERNEL_CHECKS = Path(__file__).with_name("fp8_kv_cache_kernel_checks.py")


def torch_backend(engine: Engine) -> TorchBackend:
    assert isinstance(engine.backend, TorchBackend)
    return engine.backend


def torch_model(engine: Engine) -> torch.nn.Module:
    """The engine's nn.Module (its Attention layers hold the KV-cache scales)."""
    return torch_backend(engine).model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def random_layout(query_lens: list[int], cached: list[int], block_size: int,
                  seed: int) -> tuple[AttentionMetadata, int]:
    """A batch's attention metadata over shuffled blocks, and the number of blocks the pool needs."""
    generator = torch.Generator().manual_seed(seed)
    counts = [-(-(q + c) // block_size) for q, c in zip(query_lens, cached)]
    pool = torch.randperm(sum(counts) + 3, generator=generator).tolist()
    tables = [[pool.pop() for _ in range(count)] for count in counts]
    batch = build_forward_batch([[0] * q for q in query_lens], cached, tables, block_size)
    return batch.attention, sum(counts) + 3


def filled_caches(metadata: AttentionMetadata, num_blocks: int, kv_heads: int, head_dim: int, k_scale: float,
                  v_scale: float, seed: int) -> tuple[torch.Tensor, ...]:
    """(float key cache, float value cache, FP8 key cache, FP8 value cache): every slot of every request written with
    the same random K/V (keys up to ~10 in size: a scale of 0.05 still clips nothing)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (num_blocks, 16, kv_heads, head_dim)
    key_cache, value_cache = torch.zeros(shape), torch.zeros(shape)
    fp8_key, fp8_value = torch.zeros(shape, dtype=FP8), torch.zeros(shape, dtype=FP8)
    seq_lens = metadata.seq_lens.tolist()
    slots = torch.cat([metadata.block_tables[i, torch.arange(n) // 16].long() * 16 + torch.arange(n) % 16
                       for i, n in enumerate(seq_lens)])
    key = 2 * torch.randn(len(slots), kv_heads, head_dim, generator=generator)
    value = torch.randn(len(slots), kv_heads, head_dim, generator=generator)
    write_kv(key, value, key_cache, value_cache, slots)
    write_kv(key, value, fp8_key, fp8_value, slots, k_scale=k_scale, v_scale=v_scale)
    return key_cache, value_cache, fp8_key, fp8_value


@pytest.mark.parametrize("scale", [1.0, 0.05, 3.0])
def test_fp8_write_and_read_back_is_the_input_to_e4m3_rounding_and_clipped_at_448_scales(scale: float) -> None:
    generator = torch.Generator().manual_seed(0)
    key = 20 * torch.randn(40, 2, 64, generator=generator)
    value = torch.randn(40, 2, 64, generator=generator)
    cache_k, cache_v = torch.zeros(4, 16, 2, 64, dtype=FP8), torch.zeros(4, 16, 2, 64, dtype=FP8)
    slots = torch.randperm(64, generator=generator)[:40]
    write_kv(key, value, cache_k, cache_v, slots, k_scale=scale, v_scale=scale / 2)
    for data, cache, stored_scale in ((key, cache_k, scale), (value, cache_v, scale / 2)):
        read = cache.view(64, 2, 64)[slots].float() * stored_scale
        expected = data.clamp(-448 * stored_scale, 448 * stored_scale)
        assert ((read - expected).abs() <= expected.abs() / 16 + stored_scale * 2**-10).all()
        assert (read != expected).any()  # really rounded
    assert (cache_k.view(64, 2, 64)[slots].float().abs().max() == 448) == (key.abs().max() > 448 * scale)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert (cache_k.view(64, -1)[untouched].float() == 0).all()


@pytest.mark.parametrize(("query_lens", "cached", "heads", "kv_heads"), [
    ([1, 1, 1, 1], [40, 3, 100, 17], 8, 2),  # decode, GQA 4
    ([30, 1, 7], [0, 50, 20], 4, 2),  # prompt chunks and a decode
    ([9, 1], [33, 5], 4, 4),  # MHA
])
@pytest.mark.parametrize(("k_scale", "v_scale"), [(1.0, 1.0), (0.05, 0.01)])
def test_paged_attention_over_an_fp8_cache_is_attention_over_its_dequantized_values_and_near_the_float_one(
        query_lens: list[int], cached: list[int], heads: int, kv_heads: int, k_scale: float, v_scale: float) -> None:
    metadata, num_blocks = random_layout(query_lens, cached, 16, seed=1)
    key_cache, value_cache, fp8_key, fp8_value = filled_caches(metadata, num_blocks, kv_heads, 64, k_scale, v_scale, 2)
    query = torch.randn(sum(query_lens), heads, 64, generator=torch.Generator().manual_seed(3))
    ours = paged_attention_reference(query, fp8_key, fp8_value, metadata, 0.125, k_scale, v_scale)
    dequantized = paged_attention_reference(query, fp8_key.float() * k_scale, fp8_value.float() * v_scale, metadata,
                                            0.125)
    exact = paged_attention_reference(query, key_cache, value_cache, metadata, 0.125)
    torch.testing.assert_close(ours, dequantized, rtol=1e-5, atol=1e-6)
    assert relative_error(ours, exact) < 0.06  # measured 3.6-4.5%: V's rounding (~3.6% RMS) survives the average
    assert relative_error(ours, exact) > 1e-4  # the cache really is FP8


def test_the_fused_rotary_write_stores_the_rotated_key_in_fp8() -> None:
    generator = torch.Generator().manual_seed(4)
    query, key, value = (torch.randn(12, heads, 32, generator=generator) for heads in (4, 2, 2))
    positions = torch.arange(5, 17)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    cache_k, cache_v = torch.zeros(2, 16, 2, 32, dtype=FP8), torch.zeros(2, 16, 2, 32, dtype=FP8)
    slots = torch.arange(12) + 3
    rotated = rotary_and_write_kv(query, key, value, positions, inv_freq, cache_k, cache_v, slots, None, 0.5, 0.25)
    torch.testing.assert_close(rotated, apply_rotary(query, positions, inv_freq))
    flat_k, flat_v = cache_k.view(32, 2, 32)[slots], cache_v.view(32, 2, 32)[slots]
    expected_k = quantize_kv(apply_rotary(key, positions, inv_freq), 0.5)
    assert torch.equal(flat_k.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(flat_v.view(torch.uint8), quantize_kv(value, 0.25).view(torch.uint8))


def test_the_triton_kernels_read_and_write_an_fp8_cache_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    environment = {**os.environ, "TRITON_INTERPRET": "1", "INFLIGHT_FORCE_TRITON": "1", "INFLIGHT_DISABLE_TRITON": "0"}
    result = subprocess.run([sys.executable, str(KERNEL_CHECKS)], capture_output=True, text=True, timeout=240,
                            env=environment, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)


def test_the_engine_stores_fp8_whatever_the_weights_and_holds_twice_bfloat16s_tokens_per_byte(caplog) -> None:
    bf16 = load_engine(BUNDLED, device="cpu", dtype="bfloat16", progress=False)
    with caplog.at_level(logging.WARNING, logger="engine_builder.runtime.kv_cache_dtype"):
        fp8_kv = load_engine(BUNDLED, device="cpu", dtype="bfloat16", progress=False, kv_cache_dtype="fp8")
    assert "scale 1.0" in caplog.text  # the bundled model has no KV-cache scales
    both = load_engine(BUNDLED, device="cpu", dtype="bfloat16", progress=False, kv_cache_dtype="fp8",
                       quantization="fp8")
    assert bf16.kv_cache_spec.dtype == torch.bfloat16 and bf16.backend.allocate_kv_cache(1, 16)[0].key.dtype == (
        torch.bfloat16)
    for engine in (fp8_kv, both):
        assert engine.dtype == torch.bfloat16  # the weights' (and activations') dtype is unchanged
        assert engine.kv_cache_spec.bytes_per_block(16) * 2 == bf16.kv_cache_spec.bytes_per_block(16)
        caches = engine.backend.allocate_kv_cache(3, 16)
        assert all(layer.key.dtype == layer.value.dtype == FP8 for layer in caches)
        batch = build_forward_batch([[5, 17, 99, 3, 250, 41]], [0], [[2]], 16)
        assert torch.isfinite(engine.backend.forward(batch, caches)).all()
        assert caches[0].key[2].float().abs().sum() > 0 and caches[0].key[:2].float().abs().sum() == 0
    with pytest.raises(ValueError, match=r"KV cache dtype 'int8' is not supported \(choose auto or fp8\)"):
        load_engine(BUNDLED, device="cpu", progress=False, kv_cache_dtype="int8")


def test_an_engine_directory_loads_as_before_and_with_an_fp8_cache(tmp_path: Path) -> None:
    output = tmp_path / "engine"
    assert build_main([str(BUNDLED), "--output", str(output), "--dtype", "float32", "--quiet"]) == 0
    built, fp8_kv = (load_engine(output, device="cpu", progress=False, kv_cache_dtype=name) for name in ("auto", "fp8"))
    in_memory = load_engine(BUNDLED, device="cpu", dtype="float32", progress=False)
    batch = build_forward_batch([[5, 17, 99, 3, 250, 41]], [0], [[0]], 16)
    expected = in_memory.backend.forward(batch, in_memory.backend.allocate_kv_cache(1, 16))
    torch.testing.assert_close(built.backend.forward(batch, built.backend.allocate_kv_cache(1, 16)), expected)
    assert built.kv_cache_spec.dtype == torch.float32 and fp8_kv.kv_cache_spec.dtype == FP8
    logits = fp8_kv.backend.forward(batch, fp8_kv.backend.allocate_kv_cache(1, 16))
    assert 0 < relative_error(logits, expected) < 0.05


def test_an_engine_directorys_kv_scales_are_used_also_by_a_tensor_parallel_rank(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from engine_builder.sharding import Shard

    output = tmp_path / "engine"
    assert build_main([str(BUNDLED), "--output", str(output), "--dtype", "float32", "--quiet"]) == 0
    weights = load_file(output / "weights.safetensors")
    scales = {f"layers.{i}.attention.{kind}_scale": torch.tensor(0.01 * (i + 1) + (kind == "v"))
              for i in range(4) for kind in "kv"}  # float32 [], as inflight-build keeps a checkpoint's
    save_file({**weights, **scales}, str(output / "weights.safetensors"))
    for shard in (Shard(0, 1), Shard(1, 2)):
        engine = load_engine(output, device="cpu", progress=False, verify=False, shard=shard, kv_cache_dtype="fp8")
        layers = [m for m in torch_model(engine).modules() if isinstance(m, Attention)]
        assert [(m.k_scale, m.v_scale) for m in layers] == [
            (scales[f"layers.{i}.attention.k_scale"].item(), scales[f"layers.{i}.attention.v_scale"].item())
            for i in range(4)]
    plain = load_engine(output, device="cpu", progress=False, verify=False)
    assert all(m.k_scale == 1.0 for m in torch_model(plain).modules() if isinstance(m, Attention))


def test_checkpoint_scales_reach_the_attention_layers_only_for_an_fp8_cache(caplog) -> None:
    from engine_builder.runtime.kv_cache_dtype import apply_kv_scales

    engine = load_engine(BUNDLED, device="cpu", dtype="float32", progress=False)
    layers = [m for m in torch_model(engine).modules() if isinstance(m, Attention)]
    scales = {f"layers.{i}.attention.{kind}_scale": 0.1 * (i + 1) + (kind == "v") for i in range(4) for kind in "kv"}
    with caplog.at_level(logging.INFO, logger="engine_builder.runtime.kv_cache_dtype"):
        apply_kv_scales(torch_model(engine), scales, torch.float32)
    assert "scales are not used: the KV cache is float32" in caplog.text
    assert [(m.k_scale, m.v_scale) for m in layers] == [(1.0, 1.0)] * 4
    apply_kv_scales(torch_model(engine), scales, FP8)
    assert [(m.k_scale, m.v_scale) for m in layers] == [(0.1 * (i + 1), 0.1 * (i + 1) + 1) for i in range(4)]
    assert all(type(m.k_scale) is float for m in layers)
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.k_scale is 0\.0"):
        apply_kv_scales(torch_model(engine), {"layers.0.attention.k_scale": 0.0}, FP8)


def teacher_forced_through_the_cache(engine, stream: torch.Tensor, window: int = 256, chunk: int = 64,
                                     device: str = "cpu") -> tuple[float, torch.Tensor, torch.Tensor]:
    """(mean cross-entropy per token, argmax predictions, all logits) over the stream in windows, each window fed in
    prompt chunks so that every chunk attends to the keys and values earlier chunks left in the KV cache."""
    kv = engine.backend.allocate_kv_cache(window // 16 + 1, 16)
    assert all(layer.key.dtype == engine.kv_cache_spec.dtype for layer in kv)
    table = list(range(window // 16 + 1))
    logits_all = []
    for start in range(0, len(stream) - 1, window):
        ids = stream[start : start + window + 1]
        inputs = ids[:-1].tolist()
        for begin in range(0, len(inputs), chunk):
            part = inputs[begin : begin + chunk]
            batch = build_forward_batch([part], [begin], [table], 16, num_outputs_per_request=[len(part)],
                                        device=device)
            logits_all.append(engine.backend.forward(batch, kv).float().cpu())
    logits = torch.cat(logits_all)
    targets = torch.cat([stream[start + 1 : start + window + 1] for start in range(0, len(stream) - 1, window)])
    total = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    return total / len(targets), logits.argmax(dim=-1), logits


@pytest.mark.slow  # ~10 s: the held-out set twice, in chunks
def test_the_bundled_model_with_an_fp8_kv_cache_keeps_its_held_out_loss_and_greedy_choices() -> None:
    import transformers

    stream = held_out_stream(transformers.AutoTokenizer.from_pretrained(BUNDLED))
    full = load_engine(BUNDLED, device="cpu", dtype="float32", progress=False)
    fp8_kv = load_engine(BUNDLED, device="cpu", dtype="float32", progress=False, kv_cache_dtype="fp8")
    assert fp8_kv.kv_cache_spec.dtype == FP8
    loss, greedy, logits = teacher_forced_through_the_cache(full, stream)
    fp8_loss, fp8_greedy, fp8_logits = teacher_forced_through_the_cache(fp8_kv, stream)
    agreement = (greedy == fp8_greedy).float().mean().item()
    print(f"held-out loss float32 {loss:.4f}, FP8 KV cache {fp8_loss:.4f} ({(fp8_loss / loss - 1) * 100:+.2f}%); "
          f"greedy top-1 agreement {agreement:.2%} over {len(greedy)} tokens; logits relative difference "
          f"{relative_error(fp8_logits, logits):.4f}")
    assert relative_error(fp8_logits, logits) > 1e-3  # the cache is FP8: the logits move
    assert fp8_loss <= loss * 1.02
    assert agreement >= 0.97
