"""Triton kernels for the per-token ops: KV-cache write, residual add + RMSNorm, rotary, SiLU-and-multiply.

Each program handles one token (one row); these ops are memory-bound, so the goal is one pass.
"""

from __future__ import annotations

from typing import overload

import torch
import triton
import triton.language as tl

_E4M3_MAX: tl.constexpr = tl.constexpr(448.0)  # largest finite float8_e4m3fn (kernels/fp8.py FP8_MAX)


@triton.jit
def _scaled_for_cache(x, inv_scale, FP8: tl.constexpr):
    """x as the KV cache takes it before the cast: for an FP8 cache x / scale in float32, clamped to ±448."""
    if FP8:
        x = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -_E4M3_MAX), _E4M3_MAX)
    return x


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr, num_valid_ptr, k_inv_scale, v_inv_scale,
    stride_k_token, stride_v_token, ROW: tl.constexpr, ROW_P2: tl.constexpr, HAS_NUM_VALID: tl.constexpr,
    FP8: tl.constexpr,
):
    token = tl.program_id(0)
    if HAS_NUM_VALID:
        if token >= tl.load(num_valid_ptr):  # padding of a CUDA-graph bucket
            return
    slot = tl.load(slot_ptr + token).to(tl.int64)
    cols = tl.arange(0, ROW_P2)
    ok = cols < ROW
    key = _scaled_for_cache(tl.load(key_ptr + token * stride_k_token + cols, mask=ok), k_inv_scale, FP8)
    value = _scaled_for_cache(tl.load(value_ptr + token * stride_v_token + cols, mask=ok), v_inv_scale, FP8)
    tl.store(key_cache_ptr + slot * ROW + cols, key.to(key_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(value_cache_ptr + slot * ROW + cols, value.to(value_cache_ptr.dtype.element_ty), mask=ok)


def write_kv_triton(
    key, value, key_cache, value_cache, slot_mapping, num_valid_tokens=None, k_scale=1.0, v_scale=1.0
) -> None:
    """key/value [num_tokens, kv_heads, head_dim] (heads and dims contiguous) → cache slots.

    num_valid_tokens: optional 1-element device tensor; tokens at or past it are padding and skipped.
    k_scale, v_scale: an FP8 cache's scales (kernels/kv_cache.py); a cache in the model dtype ignores them.
    """
    num_tokens, heads, dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(1) == dim and value.stride(1) == dim and key_cache.is_contiguous()
    row = heads * dim
    _write_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        num_valid_tokens if num_valid_tokens is not None else slot_mapping, 1.0 / k_scale, 1.0 / v_scale,
        key.stride(0), value.stride(0),
        ROW=row, ROW_P2=triton.next_power_of_2(row), HAS_NUM_VALID=num_valid_tokens is not None,
        FP8=key_cache.dtype == torch.float8_e4m3fn,
    )


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, eps,
    stride_x, stride_r, stride_o, stride_ro,
    SIZE: tl.constexpr, SIZE_P2: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, SIZE_P2)
    ok = cols < SIZE
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=ok)
    x32 = x.to(tl.float32)
    rms = tl.rsqrt(tl.sum(x32 * x32, 0) / SIZE + eps)
    weight = tl.load(weight_ptr + cols, mask=ok)
    normed = (x32 * rms).to(x.dtype)
    tl.store(out_ptr + row * stride_o + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=ok)


@overload
def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: None = None) -> torch.Tensor: ...


@overload
def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]: ...


def rms_norm_triton(x, weight, eps, residual=None):
    """rms_norm over the last dim of a 2-D or 3-D tensor; with residual also returns x + residual."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty_like(x2)
    residual2 = residual.reshape(-1, shape[-1]) if residual is not None else x2
    residual_out = torch.empty_like(x2) if residual is not None else out
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, residual2, weight, out, residual_out, eps,
            x2.stride(0), residual2.stride(0), out.stride(0), residual_out.stride(0),
            SIZE=shape[-1], SIZE_P2=triton.next_power_of_2(shape[-1]), HAS_RESIDUAL=residual is not None,
        )
    if residual is None:
        return out.reshape(shape)
    return out.reshape(shape), residual_out.reshape(shape)


@triton.jit
def _rotary_kernel(
    x_ptr, out_ptr, positions_ptr, inv_freq_ptr, stride_token, stride_head, stride_o_token, stride_o_head,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, HEADS_P2: tl.constexpr,
):
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token).to(tl.float32)
    cols = tl.arange(0, HALF_P2)
    heads = tl.arange(0, HEADS_P2)
    ok = (heads[:, None] < NUM_HEADS) & (cols[None, :] < HALF)
    freqs = position * tl.load(inv_freq_ptr + cols, mask=cols < HALF, other=0.0)
    base = x_ptr + token * stride_token + heads[:, None] * stride_head + cols[None, :]
    first = tl.load(base, mask=ok, other=0.0)
    second = tl.load(base + HALF, mask=ok, other=0.0)
    cos = tl.cos(freqs).to(first.dtype)[None, :]
    sin = tl.sin(freqs).to(first.dtype)[None, :]
    out = out_ptr + token * stride_o_token + heads[:, None] * stride_o_head + cols[None, :]
    tl.store(out, (first * cos - second * sin).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out + HALF, (second * cos + first * sin).to(out_ptr.dtype.element_ty), mask=ok)


def apply_rotary_triton(x, positions, inv_freq):
    """x [num_tokens, num_heads, head_dim] → rotated copy."""
    num_tokens, num_heads, head_dim = x.shape
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=x.dtype, device=x.device)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            x, out, positions, inv_freq, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HALF=half, HALF_P2=triton.next_power_of_2(half),
            HEADS_P2=triton.next_power_of_2(num_heads),
        )
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, SIZE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < SIZE
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + SIZE + cols, mask=ok, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2n] → [num_tokens, n]."""
    rows, double = gate_up.shape
    size = double // 2
    out = torch.empty((rows, size), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = 1024
        _silu_and_mul_kernel[(rows, triton.cdiv(size, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), SIZE=size, BLOCK=block
        )
    return out


@triton.jit
def _rotary_write_kv_kernel(
    query_ptr, key_ptr, value_ptr, query_out_ptr, key_cache_ptr, value_cache_ptr,
    positions_ptr, inv_freq_ptr, slot_ptr, num_valid_ptr, k_inv_scale, v_inv_scale,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
    HEADS_P2: tl.constexpr, KV_HEADS_P2: tl.constexpr, HAS_NUM_VALID: tl.constexpr, FP8: tl.constexpr,
):
    # Program (token, group): query heads group*HEADS_P2.. and KV heads group*KV_HEADS_P2.. of one token,
    # so a small batch still spreads over several programs.
    token = tl.program_id(0)
    group = tl.program_id(1)
    cols = tl.arange(0, HALF_P2)
    col_ok = cols < HALF
    freqs = tl.load(positions_ptr + token).to(tl.float32) * tl.load(inv_freq_ptr + cols, mask=col_ok, other=0.0)
    cos = tl.cos(freqs)[None, :]
    sin = tl.sin(freqs)[None, :]
    heads = group * HEADS_P2 + tl.arange(0, HEADS_P2)
    ok = (heads[:, None] < NUM_HEADS) & col_ok[None, :]
    q = query_ptr + token * stride_q_token + heads[:, None] * stride_q_head + cols[None, :]
    first = tl.load(q, mask=ok, other=0.0)
    second = tl.load(q + HALF, mask=ok, other=0.0)
    c, s = cos.to(first.dtype), sin.to(first.dtype)
    out = query_out_ptr + token * (NUM_HEADS * 2 * HALF) + heads[:, None] * (2 * HALF) + cols[None, :]
    tl.store(out, (first * c - second * s).to(query_out_ptr.dtype.element_ty), mask=ok)
    tl.store(out + HALF, (second * c + first * s).to(query_out_ptr.dtype.element_ty), mask=ok)
    if HAS_NUM_VALID:
        if token >= tl.load(num_valid_ptr):  # padding of a CUDA-graph bucket: nothing to cache
            return
    slot = tl.load(slot_ptr + token).to(tl.int64)
    kv_heads = group * KV_HEADS_P2 + tl.arange(0, KV_HEADS_P2)
    kv_ok = (kv_heads[:, None] < NUM_KV_HEADS) & col_ok[None, :]
    k = key_ptr + token * stride_k_token + kv_heads[:, None] * stride_k_head + cols[None, :]
    first = tl.load(k, mask=kv_ok, other=0.0)
    second = tl.load(k + HALF, mask=kv_ok, other=0.0)
    cache = slot * (NUM_KV_HEADS * 2 * HALF) + kv_heads[:, None] * (2 * HALF) + cols[None, :]
    key_ty = key_cache_ptr.dtype.element_ty
    tl.store(key_cache_ptr + cache, _scaled_for_cache(first * c - second * s, k_inv_scale, FP8).to(key_ty), mask=kv_ok)
    tl.store(
        key_cache_ptr + cache + HALF, _scaled_for_cache(second * c + first * s, k_inv_scale, FP8).to(key_ty), mask=kv_ok
    )
    v = value_ptr + token * stride_v_token + kv_heads[:, None] * stride_v_head + cols[None, :]
    value_ty = value_cache_ptr.dtype.element_ty
    tl.store(
        value_cache_ptr + cache, _scaled_for_cache(tl.load(v, mask=kv_ok, other=0.0), v_inv_scale, FP8).to(value_ty),
        mask=kv_ok,
    )
    tl.store(
        value_cache_ptr + cache + HALF,
        _scaled_for_cache(tl.load(v + HALF, mask=kv_ok, other=0.0), v_inv_scale, FP8).to(value_ty),
        mask=kv_ok,
    )


def rotary_write_kv_triton(
    query, key, value, positions, inv_freq, key_cache, value_cache, slot_mapping, num_valid_tokens=None,
    k_scale=1.0, v_scale=1.0,
):
    """Rotate query (returned, contiguous) and key, and write the rotated key and the value into the cache
    (an FP8 cache scaled by k_scale / v_scale, as kernels/kv_cache.py says)."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    query_out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_tokens:
        assert key_cache.is_contiguous() and value_cache.is_contiguous()
        half = head_dim // 2
        groups = max(1, min(4, num_heads // 8, num_kv_heads))  # query heads per program stay >= 8
        heads_p2 = triton.next_power_of_2(triton.cdiv(num_heads, groups))
        kv_heads_p2 = triton.next_power_of_2(triton.cdiv(num_kv_heads, groups))
        _rotary_write_kv_kernel[(num_tokens, groups)](
            query, key, value, query_out, key_cache, value_cache, positions, inv_freq, slot_mapping,
            num_valid_tokens if num_valid_tokens is not None else slot_mapping, 1.0 / k_scale, 1.0 / v_scale,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, HALF_P2=triton.next_power_of_2(half),
            HEADS_P2=heads_p2, KV_HEADS_P2=kv_heads_p2, HAS_NUM_VALID=num_valid_tokens is not None,
            FP8=key_cache.dtype == torch.float8_e4m3fn,
        )
    return query_out
