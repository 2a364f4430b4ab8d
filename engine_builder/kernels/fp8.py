"""FP8 (float8_e4m3fn) linear layers: y = x W^T with W stored in FP8 and one float32 scale per output channel.

    W [N, K] fp8, weight_scale [N]     W ≈ W_fp8 * weight_scale[:, None]
    x [M, K] -> x_fp8, x_scale         dynamic: one scale per token (row), max|x_row| / 448
                                       static:  one input_scale for the whole tensor (from a calibrated checkpoint)
    y [M, N] = (x_fp8 @ W_fp8^T) * x_scale * weight_scale^T  (accumulated in float32)

On CUDA GPUs with FP8 tensor cores (compute capability 8.9+: Ada, Hopper) the product runs in cuBLASLt through
torch._scaled_mm with row-wise scales; elsewhere (the CPU, older GPUs, shapes it cannot take) the reference below
quantizes x the same way, dequantizes both operands and multiplies in float32, so that CPU tests see the same
rounding of x as the GPU path.
"""

from __future__ import annotations

import torch

from engine_builder.kernels.dispatch import use_triton

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row or channel keeps a finite scale


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [N, K] as FP8 with one scale per output row.

    Returns:
        (weight_fp8 [N, K], weight_scale [N] float32) with weight ≈ weight_fp8 * weight_scale[:, None].
    """
    amax = weight.float().abs().amax(dim=1)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    quantized = (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale


def quantize_activations(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as FP8 with its scales [M, 1] float32: per token (input_scale None) or the static scale."""
    x32 = x.float()
    if input_scale is None:
        scale = (x32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for an FP8 weight; the result in x's dtype.

    Args:
        x: [..., K] activations (bfloat16, float16 or float32).
        weight: [N, K] float8_e4m3fn.
        weight_scale: [N] float32, per output channel.
        bias: [N] or None.
        input_scale: a static activation scale (scalar float32), or None for per-token scales.

    Returns:
        [..., N] in x's dtype.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] == 1 and x2.is_cuda and x2.is_contiguous() and use_triton(x2):  # batch-1 decode
        out = fp8_gemv(x2, weight, weight_scale, bias, input_scale)
    elif _scaled_mm_takes(x2, weight):
        out = _fp8_linear_cuda(x2, weight, weight_scale, bias, input_scale)
    else:
        out = fp8_linear_reference(x2, weight, weight_scale, bias, input_scale)
    return out.reshape(*shape[:-1], weight.shape[0])


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_linear in float32 torch ops: x quantized and dequantized, W dequantized, then one matmul."""
    x_fp8, x_scale = quantize_activations(x, input_scale)
    x_dequantized = x_fp8.float() * x_scale
    weight_dequantized = weight.float() * weight_scale.float()[:, None]
    out = x_dequantized @ weight_dequantized.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(rows per program, columns per iteration, warps) for an FP8 weight [n, k]: the best of ten configurations
    timed on an H200 for Llama-3.1-8B's shapes (2.2-3.1 TB/s; not tuned per card yet, as gemv.py tunes bf16)."""
    return (8, 1024, 8) if k >= 8192 or n == k else (8, 512, 4)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
             input_scale: torch.Tensor | None) -> torch.Tensor:
    """x [1, K] against an FP8 weight [N, K] in one Triton kernel (x quantized inside it), -> [1, N] in x's dtype.
    At one row the product reads the weight once: FP8 halves the bytes of bfloat16."""
    import triton

    from engine_builder.kernels.triton_gemv import fp8_gemv_kernel

    n, k = weight.shape
    block_n, block_k, num_warps = gemv_config(n, k)
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)
    fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight_scale, input_scale if input_scale is not None else weight_scale,
        bias if bias is not None else weight_scale, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, STATIC_INPUT=input_scale is not None, EVEN_K=k % block_k == 0,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,  # pyright: ignore[reportCallIssue]
    )
    return out


def _scaled_mm_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where cuBLASLt's FP8 GEMM runs this product: a CUDA device of compute capability 8.9+, a 16-bit
    activation dtype (row-wise scales give bfloat16/float16 out), K and N multiples of 16."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    n, k = weight.shape
    return k % 16 == 0 and n % 16 == 0


def _fp8_linear_cuda(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                     input_scale: torch.Tensor | None) -> torch.Tensor:
    x_fp8, x_scale = quantize_activations(x, input_scale)
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale.contiguous(),  # pyright: ignore[reportPrivateImportUsage]
                           scale_b=weight_scale.float().reshape(1, -1), out_dtype=x.dtype)
    return out if bias is None else out + bias
