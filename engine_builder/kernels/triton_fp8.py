"""Triton kernels that write FP8 activations with their per-row scales in the pass that produces them.

    quantize_rows          x -> (x_fp8, scale)                                   o_proj's input, static scales
    rms_norm_fp8           (x + residual) -> rms_norm -> (fp8, scale), x + residual    before qkv and gate_up
    silu_and_mul_fp8       [gate | up] -> silu(gate) * up -> (fp8, scale)        before down

Each program quantizes one row (the whole row at once up to MAX_ROW columns): the value is first rounded to the
model dtype (what the unfused ops would hand the linear), its row's max|.| / 448 is the scale, and value / scale
is rounded to e4m3 (kernels/fp8.py's rule).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine_builder.kernels.fp8_format import FP8

MAX_ROW = 32768  # the longest row a program holds in registers; longer rows take two passes (quantize_rows, silu)


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, input_scale_ptr, stride_x, stride_o,
                          SIZE: tl.constexpr, BLOCK: tl.constexpr, STATIC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if BLOCK >= SIZE:  # the whole row in registers: one read
        ok = cols < SIZE
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(input_scale_ptr).to(tl.float32)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), 0) / 448.0, 1e-12)
        tl.store(scale_ptr + row, scale)
        tl.store(out_ptr + row * stride_o + cols, tl.clamp(x / scale, -448.0, 448.0).to(tl.float8e4nv), mask=ok)
    else:  # a max pass, then a quantizing pass (the row is in L2 by then)
        if STATIC:
            scale = tl.load(input_scale_ptr).to(tl.float32)
        else:
            amax = tl.zeros((BLOCK,), tl.float32)
            for start in range(0, SIZE, BLOCK):
                x = tl.load(x_ptr + row * stride_x + start + cols, mask=start + cols < SIZE, other=0.0)
                amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
            scale = tl.maximum(tl.max(amax, 0) / 448.0, 1e-12)
        tl.store(scale_ptr + row, scale)
        for start in range(0, SIZE, BLOCK):
            ok = start + cols < SIZE
            x = tl.load(x_ptr + row * stride_x + start + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + row * stride_o + start + cols,
                     tl.clamp(x / scale, -448.0, 448.0).to(tl.float8e4nv), mask=ok)


def row_launch(size: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for one program per row: the whole row up to MAX_ROW columns (one read, all of it in
    flight: a batch-1 row is not left to one warp's loop), 16 columns per thread up to 16 warps."""
    block = min(triton.next_power_of_2(size), MAX_ROW)
    return block, max(4, min(16, block // 512))


def quantize_rows_triton(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (16-bit or float32) -> (fp8 [M, K], scale [M, 1] float32)."""
    x = x if x.stride(1) == 1 else x.contiguous()
    rows, size = x.shape
    out = torch.empty((rows, size), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block, num_warps = row_launch(size)
        _quantize_rows_kernel[(rows,)](
            x, out, scale, input_scale if input_scale is not None else scale, x.stride(0), out.stride(0),
            SIZE=size, BLOCK=block, STATIC=input_scale is not None, num_warps=num_warps,  # pyright: ignore[reportCallIssue]
        )
    return out, scale


@triton.jit
def _rms_norm_fp8_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, scale_ptr, residual_out_ptr, eps, stride_x, stride_r, stride_ro,
    SIZE: tl.constexpr, SIZE_P2: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, SIZE_P2)
    ok = cols < SIZE
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=ok)
    x32 = x.to(tl.float32)
    rms = tl.rsqrt(tl.sum(x32 * x32, 0) / SIZE + eps)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0)
    normed = (weight * (x32 * rms).to(x.dtype)).to(tl.float32)  # rounded to the model dtype first
    scale = tl.maximum(tl.max(tl.abs(normed), 0) / 448.0, 1e-12)
    tl.store(scale_ptr + row, scale)
    tl.store(out_ptr + row * SIZE + cols, tl.clamp(normed / scale, -448.0, 448.0).to(tl.float8e4nv), mask=ok)


def rms_norm_fp8_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [M, H] -> (fp8 [M, H], scale [M, 1], x + residual or None)."""
    rows, size = x.shape
    out = torch.empty((rows, size), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else None
    if rows:
        residual_in = residual if residual is not None else x
        _rms_norm_fp8_kernel[(rows,)](
            x, residual_in, weight, out, scale, residual_out if residual_out is not None else x, eps,
            x.stride(0), residual_in.stride(0), residual_out.stride(0) if residual_out is not None else 0,
            SIZE=size, SIZE_P2=triton.next_power_of_2(size), HAS_RESIDUAL=residual is not None,
            num_warps=row_launch(size)[1],  # pyright: ignore[reportCallIssue]
        )
    return out, scale, residual_out


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, out_ptr, scale_ptr, stride_x, SIZE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if BLOCK >= SIZE:  # the whole row in registers
        ok = cols < SIZE
        gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + SIZE + cols, mask=ok, other=0.0)
        product = ((gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(product), 0) / 448.0, 1e-12)
        tl.store(scale_ptr + row, scale)
        tl.store(out_ptr + row * SIZE + cols, tl.clamp(product / scale, -448.0, 448.0).to(tl.float8e4nv), mask=ok)
    else:
        amax = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, SIZE, BLOCK):  # first pass: the row's max
            ok = start + cols < SIZE
            gate = tl.load(x_ptr + row * stride_x + start + cols, mask=ok, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + row * stride_x + SIZE + start + cols, mask=ok, other=0.0)
            product = ((gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(product))
        scale = tl.maximum(tl.max(amax, 0) / 448.0, 1e-12)
        tl.store(scale_ptr + row, scale)
        for start in range(0, SIZE, BLOCK):  # second pass (the row is in L2 by now): the same products, quantized
            ok = start + cols < SIZE
            gate = tl.load(x_ptr + row * stride_x + start + cols, mask=ok, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + row * stride_x + SIZE + start + cols, mask=ok, other=0.0)
            product = ((gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up).to(tl.float32)
            tl.store(out_ptr + row * SIZE + start + cols,
                     tl.clamp(product / scale, -448.0, 448.0).to(tl.float8e4nv), mask=ok)


def silu_and_mul_fp8_triton(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, 2n] laid out as [gate | up] -> (fp8 silu(gate) * up [M, n], scale [M, 1])."""
    rows, double = gate_up.shape
    size = double // 2
    out = torch.empty((rows, size), dtype=FP8, device=gate_up.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=gate_up.device)
    if rows:
        block, num_warps = row_launch(size)
        _silu_and_mul_fp8_kernel[(rows,)](gate_up, out, scale, gate_up.stride(0), SIZE=size, BLOCK=block,
                                          num_warps=num_warps)  # pyright: ignore[reportCallIssue]
    return out, scale
