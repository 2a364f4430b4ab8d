"""The Triton matrix-vector kernel behind gemv.py: each program reduces BLOCK_N weight rows against x."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, N, K, stride_w,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + start + cols)
            w = tl.load(w_ptrs + start, mask=row_ok[:, None], other=0.0)
        else:
            col_ok = start + cols < K
            x = tl.load(x_ptr + start + cols, mask=col_ok, other=0.0)
            w = tl.load(w_ptrs + start, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def fp8_gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, input_scale_ptr, bias_ptr, out_ptr, N, K, stride_w,
    HAS_BIAS: tl.constexpr, STATIC_INPUT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One row x [K] (16-bit) against FP8 rows of W [N, K] with per-row scales: x is quantized to FP8 here (its
    scale max|x| / 448 from a first pass over x, which is small and cached), as kernels/fp8.py's reference does."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    if STATIC_INPUT:
        x_scale = tl.load(input_scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        x_scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + start + cols).to(tl.float32)
            w = tl.load(w_ptrs + start, mask=row_ok[:, None], other=0.0)
        else:
            col_ok = start + cols < K
            x = tl.load(x_ptr + start + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs + start, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x_fp8 = tl.clamp(x / x_scale, -448.0, 448.0).to(tl.float8e4nv).to(tl.float32)
        acc += w.to(tl.float32) * x_fp8[None, :]
    y = tl.sum(acc, axis=1) * x_scale * tl.load(w_scale_ptr + rows, mask=row_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)
