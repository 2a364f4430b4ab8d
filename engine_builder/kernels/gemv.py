"""y = x W^T (+ b) for one row of x: the batch-1 decode matmuls, where cuBLAS sometimes leaves bandwidth unused.

At batch 1 every linear layer is a matrix-vector product that reads its whole weight once, so it can
go no faster than memory bandwidth. cuBLAS picks its kernel by heuristics; for some shapes (e.g. a
square 4096 x 4096 projection on an H100) it launches too few blocks to keep the memory busy.
`tune_gemv` times a few Triton configurations against cuBLAS for each weight shape of a model (FP8 weights:
fp8_gemv.py's candidates against each other), over all of its layers' weights, so the timing is not served from
L2, and replayed from a CUDA graph, as decode steps are, so that launch costs do not count; `linear` then uses the
winner for single-row inputs. Shapes that were not tuned, or where cuBLAS won, keep using torch.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from engine_builder.kernels.fp8 import FP8, Fp8Activations, fp8_linear, quantize_activations

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GemvConfig:
    """One launch configuration of the Triton GEMV kernel."""

    block_n: int  # weight rows (outputs) per program
    block_k: int  # columns read per loop iteration
    num_warps: int
    num_stages: int = 3  # Triton's software pipelining depth of the loop's loads


CANDIDATES = (  # whole rows per iteration (many programs, every load in flight at once) to deeper pipelines
    GemvConfig(1, 4096, 4), GemvConfig(2, 4096, 8), GemvConfig(2, 2048, 4), GemvConfig(4, 2048, 8),
    GemvConfig(4, 1024, 4), GemvConfig(8, 512, 4), GemvConfig(8, 1024, 8), GemvConfig(16, 512, 8),
    GemvConfig(1, 2048, 4), GemvConfig(2, 1024, 4, 4), GemvConfig(4, 512, 4, 4), GemvConfig(8, 256, 4, 5),
)
_choices: dict[tuple[tuple[int, ...], torch.dtype], GemvConfig] = {}  # (weight shape, dtype) -> the tuned config


def linear(x: torch.Tensor | Fp8Activations, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_scale: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the tuned Triton GEMV when x is one CUDA row and its weight shape chose it; an FP8 weight
    (with its weight_scale, and input_scale when static) goes through fp8.py."""
    if weight.dtype == FP8:
        assert weight_scale is not None, "an FP8 weight has a weight_scale"
        return fp8_linear(x, weight, weight_scale, bias, input_scale)
    assert isinstance(x, torch.Tensor), "quantized activations go to FP8 weights only"
    if (_choices and x.dim() == 2 and x.shape[0] == 1 and x.is_cuda and x.is_contiguous() and weight.stride(1) == 1
            and x.dtype == weight.dtype):
        config = _choices.get((tuple(weight.shape), weight.dtype))
        if config is not None:
            return gemv_triton(x, weight, bias, config)
    return F.linear(x, weight, bias)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias [N]) -> [1, N] in x's dtype, accumulated in float32."""
    import triton

    from engine_builder.kernels.triton_gemv import gemv_kernel

    n, k = weight.shape
    assert x.shape == (1, k) and weight.stride(1) == 1 and x.is_contiguous(), "x must be [1, K], W row-major"
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)
    # The pyright ignore: triton's stubs give a launch the kernel's own signature, without the launch options
    # (num_warps, num_stages) that every launch accepts.
    gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,  # pyright: ignore[reportCallIssue]
    )
    return out


def tune_gemv(weights: Iterable[torch.Tensor], repeats: int = 5) -> dict[tuple[int, ...], str]:
    """Time cuBLAS and each candidate on every weight shape (one pass over all weights of a shape per trial).

    Args:
        weights: the model's linear weights [N, K] on a CUDA device.
        repeats: timed passes per candidate (the fastest counts).

    Returns:
        Weight shape -> what won ("cublas" or the Triton config), also logged.
    """
    groups: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for weight in weights:
        if weight.is_cuda and weight.dim() == 2 and weight.stride(1) == 1:
            groups[(tuple(weight.shape), weight.dtype)].append(weight)
    summary = {}
    for key, group in groups.items():
        if key[1] == FP8:
            summary[key[0]] = _tune_fp8_gemv(key[0], group, repeats)
            continue
        x = torch.randn(1, key[0][1], device=group[0].device, dtype=key[1])
        best_name, best_seconds = "cublas", _time(partial(_cublas_pass, x, group), repeats)
        best_config = None
        for config in CANDIDATES:
            seconds = _time(partial(_triton_pass, x, group, config), repeats)
            if seconds < best_seconds * 0.97:  # a clear win only
                best_name, best_seconds, best_config = str(config), seconds, config
        if best_config is not None:
            _choices[key] = best_config
        else:
            _choices.pop(key, None)
        summary[key[0]] = best_name
        gigabytes = sum(w.numel() * w.element_size() for w in group) / 1e9
        logger.info("batch-1 matmul %s x%d: %s, %.2f TB/s", "x".join(map(str, key[0])), len(group), best_name,
                    gigabytes / best_seconds / 1e3)
    return summary


def _tune_fp8_gemv(shape: tuple[int, ...], group: list[torch.Tensor], repeats: int) -> str:
    """Time fp8_gemv.py's candidates on FP8 weights of one shape; the fastest is chosen (and logged)."""
    from engine_builder.kernels import fp8_gemv

    x = quantize_activations(torch.randn(1, shape[1], device=group[0].device, dtype=torch.bfloat16))
    scale = torch.ones(shape[0], device=x.data.device)
    best_config, best_seconds = fp8_gemv.DEFAULT, float("inf")
    for config in fp8_gemv.CANDIDATES:
        try:
            seconds = _time(partial(_fp8_pass, x, group, scale, config), repeats)
        except Exception as error:  # a configuration this GPU or Triton cannot compile is skipped
            logger.debug("FP8 batch-1 matmul %s: %s skipped (%s)", shape, config, error)
            continue
        if seconds < best_seconds:
            best_config, best_seconds = config, seconds
    fp8_gemv.choose(shape, best_config)
    gigabytes = sum(w.numel() for w in group) / 1e9
    logger.info("batch-1 FP8 matmul %s x%d: %s, %.2f TB/s", "x".join(map(str, shape)), len(group), best_config,
                gigabytes / best_seconds / 1e3)
    return str(best_config)


def _fp8_pass(x: Fp8Activations, weights: list[torch.Tensor], scale: torch.Tensor, config) -> None:
    from engine_builder.kernels.fp8_gemv import fp8_gemv

    for weight in weights:
        fp8_gemv(x, weight, scale, None, config)


def _cublas_pass(x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    for weight in weights:
        F.linear(x, weight)


def _triton_pass(x: torch.Tensor, weights: list[torch.Tensor], config: GemvConfig) -> None:
    for weight in weights:
        gemv_triton(x, weight, None, config)


def _time(function, repeats: int) -> float:
    """Fastest of `repeats` replays of `function` captured in a CUDA graph, in seconds (one eager call first
    compiles the Triton kernels)."""
    function()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    graph.replay()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del graph
    return best
