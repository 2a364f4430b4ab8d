"""The Triton matrix-vector kernels behind gemv.py and fp8_gemv.py: each program reduces BLOCK_N weight rows
against x."""

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
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, N, K, stride_w,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One FP8 row x [K] (scale x_scale) against FP8 rows of W [N, K] with per-row scales, on the CUDA cores."""
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
    y = tl.sum(acc, axis=1) * tl.load(x_scale_ptr) * tl.load(w_scale_ptr + rows, mask=row_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def fp8_gemv_dot_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, N, K, stride_w,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The same product on the FP8 tensor cores: x is row 0 of a 16-row tile (the others zero), so the weight
    bytes go into the MMA as they are loaded, without a conversion per element."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    lane_ok = tl.arange(0, 16) == 0
    x_lanes = tl.zeros((16, 1), tl.int32)  # x's pointers broadcast over the tile's rows
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + start + cols[None, :] + x_lanes, mask=lane_ok[:, None], other=0.0)
            w = tl.load(w_ptrs + start, mask=row_ok[:, None], other=0.0)
        else:
            col_ok = start + cols < K
            x = tl.load(x_ptr + start + cols[None, :] + x_lanes, mask=lane_ok[:, None] & col_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptrs + start, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    y = tl.sum(acc, axis=0) * tl.load(x_scale_ptr) * tl.load(w_scale_ptr + rows, mask=row_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)
