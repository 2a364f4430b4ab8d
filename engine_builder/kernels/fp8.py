"""FP8 (float8_e4m3fn) linear layers: y = x W^T with W stored in FP8 and one float32 scale per output channel.

    W [N, K] fp8, weight_scale [N]     W ≈ W_fp8 * weight_scale[:, None]
    x [M, K] -> Fp8Activations         dynamic: one scale per token (row), max|x_row| / 448
                                       static:  one input_scale for the whole tensor (from a calibrated checkpoint)
    y [M, N] = (x_fp8 @ W_fp8^T) * x_scale * weight_scale^T  (accumulated in float32)

The activations reach a linear either already quantized (the RMSNorm and SiLU-and-multiply before qkv, gate_up and
down write FP8 and the row scales in the same pass: Fp8Activations) or in the model dtype (o_proj's input, static
scales), which one Triton pass quantizes on GPUs.

On CUDA GPUs with FP8 tensor cores (compute capability 8.9+: Ada, Hopper) the product runs in cuBLASLt through
torch._scaled_mm with row-wise scales, and one row (batch-1 decode) in a Triton GEMV (fp8_gemv.py); elsewhere (the
CPU, older GPUs, shapes cuBLASLt cannot take) the reference below dequantizes both operands and multiplies in
float32, so that CPU tests see the same rounding of x as the GPU path.
"""

from __future__ import annotations

import torch

from engine_builder.kernels.dispatch import use_triton
from engine_builder.kernels.fp8_format import FP8, FP8_MAX, MIN_SCALE, Fp8Activations


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [N, K] as FP8 with one scale per output row.

    Returns:
        (weight_fp8 [N, K], weight_scale [N] float32) with weight ≈ weight_fp8 * weight_scale[:, None].
    """
    amax = weight.float().abs().amax(dim=1)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    quantized = (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale


def quantize_activations(x: torch.Tensor, input_scale: torch.Tensor | None = None) -> Fp8Activations:
    """x [..., K] as FP8 rows [M, K] with their scales [M, 1]: per token (input_scale None) or the static scale; one
    pass on GPUs."""
    rows = x.reshape(-1, x.shape[-1])
    if use_triton(rows):
        from engine_builder.kernels.triton_fp8 import quantize_rows_triton

        return Fp8Activations(*quantize_rows_triton(rows, input_scale), x.dtype)
    return _quantize_rows(rows, input_scale)


def fp8_linear(x: torch.Tensor | Fp8Activations, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for an FP8 weight; the result in the activations' dtype.

    Args:
        x: [..., K] activations (bfloat16, float16 or float32), or [M, K] already quantized.
        weight: [N, K] float8_e4m3fn.
        weight_scale: [N] float32, per output channel.
        bias: [N] or None.
        input_scale: a static activation scale (scalar float32), or None for per-token scales.

    Returns:
        [..., N] in x's dtype.
    """
    if isinstance(x, Fp8Activations):
        quantized, lead = x, x.shape[:-1]
    else:
        lead = x.shape[:-1]
        quantized = quantize_activations(x, input_scale)
    if quantized.shape[0] == 1 and quantized.data.is_cuda and use_triton(quantized.data):  # batch-1 decode
        from engine_builder.kernels.fp8_gemv import fp8_gemv

        out = fp8_gemv(quantized, weight, weight_scale, bias)
    elif _scaled_mm_takes(quantized, weight):
        out = torch._scaled_mm(quantized.data, weight.t(),  # pyright: ignore[reportPrivateImportUsage]
                               scale_a=quantized.scale, scale_b=weight_scale.reshape(1, -1), out_dtype=quantized.dtype)
        out = out if bias is None else out + bias
    else:
        out = _dequantized_product(quantized, weight, weight_scale, bias)
    return out.reshape(*lead, weight.shape[0])


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_linear in float32 torch ops: x quantized and dequantized, W dequantized, then one matmul."""
    return _dequantized_product(_quantize_rows(x, input_scale), weight, weight_scale, bias)


def _quantize_rows(x: torch.Tensor, input_scale: torch.Tensor | None) -> Fp8Activations:
    x32 = x.float()
    if input_scale is None:
        scale = (x32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    return Fp8Activations((x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale, x.dtype)


def _dequantized_product(x: Fp8Activations, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    out = x.dequantize() @ (weight.float() * weight_scale.float()[:, None]).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _scaled_mm_takes(x: Fp8Activations, weight: torch.Tensor) -> bool:
    """True where cuBLASLt's FP8 GEMM runs this product: a CUDA device of compute capability 8.9+, a 16-bit
    output dtype (row-wise scales give bfloat16/float16 out), K and N multiples of 16."""
    if not x.data.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(x.data.device) < (8, 9):
        return False
    n, k = weight.shape
    return k % 16 == 0 and n % 16 == 0
