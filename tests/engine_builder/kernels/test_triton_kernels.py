"""Each Triton kernel against its torch reference on the GPU, with fresh random inputs and poisoned outputs."""

from __future__ import annotations

import pytest
import torch

from engine_builder.kernels.activation import silu_and_mul
from engine_builder.kernels.kv_cache import write_kv
from engine_builder.kernels.paged_attention import paged_attention_reference
from engine_builder.kernels.rms_norm import add_rms_norm, rms_norm
from engine_builder.kernels.rotary import apply_rotary
from tests.engine_builder.kernels.kernel_cases import ATTENTION_LAYOUTS, random_layout, relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
triton_elementwise = pytest.importorskip("engine_builder.kernels.triton_elementwise")
triton_attention = pytest.importorskip("engine_builder.kernels.triton_attention")


@pytest.mark.parametrize(
    "query_lens,cached,heads,kv_heads,head_dim,block_size",
    ATTENTION_LAYOUTS,
)
def test_paged_attention_matches_reference(query_lens, cached, heads, kv_heads, head_dim, block_size):
    torch.manual_seed(len(query_lens))
    num_blocks = sum(-(-(q + c) // block_size) for q, c in zip(query_lens, cached)) + 8
    batch = random_layout(query_lens, cached, block_size, num_blocks, seed=1)
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    value_cache = torch.randn_like(key_cache)
    query = torch.randn(sum(query_lens), heads, head_dim, device="cuda", dtype=torch.bfloat16)
    expected = paged_attention_reference(
        query.float(), key_cache.float(), value_cache.float(), batch.attention, head_dim**-0.5
    )
    actual = triton_attention.paged_attention_triton(query, key_cache, value_cache, batch.attention, head_dim**-0.5)
    assert relative_error(actual, expected) < 1e-2
    for splits in (2, 4):
        if batch.attention.max_query_len == 1:
            split = triton_attention.paged_attention_triton(
                query, key_cache, value_cache, batch.attention, head_dim**-0.5, num_splits=splits
            )
            assert relative_error(split, expected) < 1e-2
    for launch in (triton_attention.AttentionLaunch(k_rows=False, num_stages=2),  # K transposed from memory
                   triton_attention.AttentionLaunch(block_n=64, block_q=32, num_warps=8)):
        other = triton_attention.paged_attention_triton(query, key_cache, value_cache, batch.attention,
                                                        head_dim**-0.5, launch=launch)
        assert relative_error(other, expected) < 1e-2, launch


def test_write_kv_matches_reference_and_skips_padding():
    torch.manual_seed(0)
    cache = torch.full((32, 16, 8, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    key = torch.randn(20, 8, 128, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.randperm(32 * 16, device="cuda")[:20]
    expected_k, expected_v = cache.clone(), cache.clone()
    write_kv(
        key.cpu(), value.cpu(), expected_k_cpu := expected_k.cpu(), expected_v_cpu := expected_v.cpu(), slots.cpu()
    )
    actual_k, actual_v = cache.clone(), cache.clone()
    triton_elementwise.write_kv_triton(key, value, actual_k, actual_v, slots)
    assert torch.equal(actual_k.cpu().nan_to_num(7), expected_k_cpu.nan_to_num(7))
    assert torch.equal(actual_v.cpu().nan_to_num(7), expected_v_cpu.nan_to_num(7))
    padded_k, padded_v = cache.clone(), cache.clone()
    triton_elementwise.write_kv_triton(
        key, value, padded_k, padded_v, slots, torch.tensor([12], device="cuda", dtype=torch.int32)
    )
    written = ~padded_k.view(-1, 8, 128)[:, 0, 0].isnan()
    assert written.sum().item() == 12 and written[slots[:12]].all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_and_fused_residual(dtype):
    torch.manual_seed(1)
    x = torch.randn(300, 4096, device="cuda", dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(4096, device="cuda", dtype=dtype)
    assert (
        relative_error(
            triton_elementwise.rms_norm_triton(x, weight, 1e-5), rms_norm(x.cpu().float(), weight.cpu().float(), 1e-5)
        )
        < 1e-2
    )
    out, summed = triton_elementwise.rms_norm_triton(x, weight, 1e-5, residual)
    ref_out, ref_summed = add_rms_norm(x.cpu().float(), residual.cpu().float(), weight.cpu().float(), 1e-5)
    assert relative_error(out, ref_out) < 1e-2 and relative_error(summed, ref_summed) < 1e-2


def test_rotary_matches_reference():
    torch.manual_seed(2)
    qkv = torch.randn(257, (32 + 16) * 128, device="cuda", dtype=torch.bfloat16)
    query = qkv[:, : 32 * 128].view(257, 32, 128)  # strided view, as the attention layer passes it
    positions = torch.randint(0, 100_000, (257,), device="cuda")
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    expected = apply_rotary(query.cpu().float(), positions.cpu(), inv_freq.cpu())
    assert relative_error(triton_elementwise.apply_rotary_triton(query, positions, inv_freq), expected) < 1e-2


def test_silu_and_mul_matches_reference():
    torch.manual_seed(3)
    gate_up = torch.randn(129, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    expected = silu_and_mul(gate_up.cpu().float())
    assert relative_error(triton_elementwise.silu_and_mul_triton(gate_up), expected) < 1e-2


def test_fused_rotary_and_kv_write_matches_reference():
    torch.manual_seed(4)
    tokens, heads, kv_heads, dim = 40, 32, 8, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
    query, key, value = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    query, key, value = (t.reshape(tokens, -1, dim) for t in (query, key, value))
    positions = torch.randint(0, 8000, (tokens,), device="cuda")
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    slots = torch.randperm(64 * 16, device="cuda")[:tokens]
    key_cache = torch.full((64, 16, kv_heads, dim), float("nan"), device="cuda", dtype=torch.bfloat16)
    value_cache = key_cache.clone()
    rotated = triton_elementwise.rotary_write_kv_triton(
        query, key, value, positions, inv_freq, key_cache, value_cache, slots, torch.tensor([30], device="cuda")
    )
    cpu = lambda t: t.cpu().float()  # noqa: E731
    assert relative_error(rotated, apply_rotary(cpu(query), positions.cpu(), inv_freq.cpu())) < 1e-2
    expected_key = apply_rotary(cpu(key), positions.cpu(), inv_freq.cpu())
    flat_key, flat_value = key_cache.view(-1, kv_heads, dim), value_cache.view(-1, kv_heads, dim)
    assert relative_error(flat_key[slots[:30]], expected_key[:30]) < 1e-2
    assert torch.equal(flat_value[slots[:30]].cpu(), value[:30].cpu())
    assert flat_key[slots[30:]].isnan().all()  # padding past num_valid_tokens is not written


@pytest.mark.parametrize("splits", [1, 4])
def test_padded_decode_rows_are_skipped(splits):
    """CUDA-graph padding: requests past the real batch have no tokens and zero length; real rows are unaffected."""
    torch.manual_seed(5)
    real, bucket = 3, 8
    batch = random_layout([1] * real, [700, 33, 1500], 16, 160, seed=2)
    attention = batch.attention
    attention.query_start_loc = torch.cat(
        [attention.query_start_loc, torch.full((bucket - real,), real, device="cuda", dtype=torch.int32)]
    )
    attention.seq_lens = torch.cat([attention.seq_lens, torch.zeros(bucket - real, device="cuda", dtype=torch.int32)])
    attention.block_tables = torch.cat(
        [
            attention.block_tables,
            torch.zeros(bucket - real, attention.block_tables.shape[1], device="cuda", dtype=torch.int32),
        ]
    )
    attention.max_seq_len = 4096
    key_cache = torch.randn(160, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    value_cache = torch.randn_like(key_cache)
    query = torch.randn(bucket, 32, 128, device="cuda", dtype=torch.bfloat16)
    actual = triton_attention.paged_attention_triton(
        query, key_cache, value_cache, attention, 128**-0.5, num_splits=splits
    )
    expected = paged_attention_reference(
        query[:real].float(), key_cache.float(), value_cache.float(), batch.attention, 128**-0.5
    )
    assert relative_error(actual[:real], expected) < 1e-2


@pytest.mark.parametrize(
    "n,k,bias", [(4096, 4096, False), (6144, 4096, True), (1000, 300, False), (128256, 2048, False)]
)
def test_gemv_matches_reference(n, k, bias):
    from engine_builder.kernels.gemv import CANDIDATES, gemv_triton

    torch.manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    expected = x.double() @ weight.double().T + (b.double() if b is not None else 0)
    for config in CANDIDATES:
        actual = gemv_triton(x, weight, b, config)
        assert actual.shape == (1, n) and actual.dtype == torch.bfloat16
        assert relative_error(actual, expected) < 1e-2, config


def test_tuned_linear_uses_the_winner_and_matches_cublas():
    from engine_builder.kernels import gemv

    weights = [torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(8)]
    saved = dict(gemv._choices)  # the tuning is process-wide: leave it as the other tests found it
    summary = gemv.tune_gemv(weights)
    assert set(summary) == {(4096, 4096)}
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert relative_error(gemv.linear(x, weights[0]), torch.nn.functional.linear(x, weights[0])) < 1e-2
    two_rows = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)  # more than one row: always cuBLAS
    assert torch.equal(gemv.linear(two_rows, weights[0]), torch.nn.functional.linear(two_rows, weights[0]))
    gemv._choices.clear()
    gemv._choices.update(saved)
