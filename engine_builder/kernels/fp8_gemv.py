"""Batch-1 decode against FP8 weights: one quantized row x [1, K] times W [N, K]^T in a Triton kernel.

At one row a linear reads its whole weight once, so FP8 halves the time of bfloat16 at best. Two kernels
(triton_gemv.py) compete per weight shape: one on the CUDA cores (each weight byte converted to float32 and
multiplied) and one on the FP8 tensor cores (x padded to a 16-row tile, no per-element conversion). gemv.py's
`tune_gemv` times the candidates below on the model's weights and records the winner here with `choose`; an
untuned shape takes DEFAULT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_builder.kernels.fp8_format import Fp8Activations


@dataclass(frozen=True, slots=True)
class Fp8GemvConfig:
    """One launch configuration of an FP8 GEMV kernel."""

    tensor_cores: bool  # fp8_gemv_dot_kernel, else fp8_gemv_kernel
    block_n: int  # weight rows (outputs) per program
    block_k: int  # columns per loop iteration
    num_warps: int
    num_stages: int = 3

    def __str__(self) -> str:
        kind = "tensor-core" if self.tensor_cores else "cuda-core"
        return f"{kind} {self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"


DEFAULT = Fp8GemvConfig(False, 8, 512, 4)  # the CUDA-core kernel's best single configuration on an H200
CANDIDATES = (
    DEFAULT, Fp8GemvConfig(False, 8, 1024, 8), Fp8GemvConfig(False, 4, 1024, 4), Fp8GemvConfig(False, 16, 512, 8),
    Fp8GemvConfig(True, 16, 256, 4), Fp8GemvConfig(True, 32, 256, 4), Fp8GemvConfig(True, 32, 512, 4),
    Fp8GemvConfig(True, 64, 256, 4), Fp8GemvConfig(True, 16, 512, 4, 4), Fp8GemvConfig(True, 32, 128, 4, 5),
    Fp8GemvConfig(True, 64, 128, 4, 4), Fp8GemvConfig(True, 16, 1024, 4, 2),
)
_choices: dict[tuple[int, ...], Fp8GemvConfig] = {}  # weight shape -> the tuned configuration


def choose(shape: tuple[int, ...], config: Fp8GemvConfig) -> None:
    """Use `config` for FP8 weights of this shape from now on."""
    _choices[shape] = config


def fp8_gemv(x: Fp8Activations, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
             config: Fp8GemvConfig | None = None) -> torch.Tensor:
    """x [1, K] quantized against an FP8 weight [N, K] -> [1, N] in x's dtype (the tuned kernel, or `config`)."""
    import triton

    from engine_builder.kernels.triton_gemv import fp8_gemv_dot_kernel, fp8_gemv_kernel

    n, k = weight.shape
    assert x.shape == (1, k) and weight.stride(1) == 1 and x.data.is_contiguous(), "x must be [1, K], W row-major"
    config = config or _choices.get(tuple(weight.shape), DEFAULT)
    kernel = fp8_gemv_dot_kernel if config.tensor_cores else fp8_gemv_kernel
    out = torch.empty(1, n, device=x.data.device, dtype=x.dtype)
    kernel[(triton.cdiv(n, config.block_n),)](
        x.data, x.scale, weight, weight_scale, bias if bias is not None else weight_scale, out, n, k,
        weight.stride(0), HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,  # pyright: ignore[reportCallIssue]
    )
    return out
