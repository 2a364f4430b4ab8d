"""The paged-attention kernel alone: its launch choices swept per shape, against the copy bandwidth.

    python -m benchmarks.attention_kernel                       # Llama-3.1-8B heads (32 query, 8 KV, 128 dims)
    python -m benchmarks.attention_kernel --shapes decode256x192 --kv-dtypes fp8

Shapes: `decodeRxC` = R requests of one new token over C cached positions each (a decode step), `prefillRxL` =
R prompts of L tokens each (a chunked-prefill step). Every launch configuration of the grid (--block-n, --warps,
--stages, --k-rows; --block-q for prefill, --fp16-tiles, --fp8-qk and --fp8-pv for an FP8 cache) is timed with
CUDA events (median of 20) and checked against the default launch's output (relative error of the whole output,
reported; over 0.1 is a wrong output; FP8 dots round the query or the softmax weights to e4m3, a few percent on
these random inputs); one JSON line per (shape, KV dtype) names the default's time, the best configuration and
its time, the KV bytes read per microsecond (decode; beside the measured copy bandwidth) or the attention TFLOP/s
(prefill).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics

import torch

from benchmarks.roofline import copy_bandwidth
from engine_builder.forward_batch import build_forward_batch
from engine_builder.kernels.triton_attention import AttentionLaunch, paged_attention_triton

BLOCK_SIZE = 16


def timed_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def launches(prefill: bool, fp8: bool, grid: argparse.Namespace) -> list[AttentionLaunch]:
    """Every combination of the grid's values (BLOCK_Q for prefill only, float16 tiles for an FP8 cache only)."""
    combinations = itertools.product(grid.block_n, grid.warps, grid.stages, grid.k_rows,
                                     grid.block_q if prefill else (None,), grid.fp16_tiles if fp8 else (True,),
                                     grid.fp8_qk if fp8 else (False,), grid.fp8_pv if fp8 else (False,))
    return [AttentionLaunch(block_n=n, num_warps=w, num_stages=s, k_rows=bool(rows), block_q=q, fp16_tiles=bool(f16),
                            fp8_qk=bool(qk), fp8_pv=bool(pv))
            for n, w, s, rows, q, f16, qk, pv in combinations]


def describe(launch: AttentionLaunch) -> str:
    return (f"n{launch.block_n} w{launch.num_warps} s{launch.num_stages} rows{int(launch.k_rows)} q{launch.block_q}"
            f" f16{int(launch.fp16_tiles)} qk8{int(launch.fp8_qk)} pv8{int(launch.fp8_pv)}")


def run_shape(shape: str, kv_dtype: str, heads: int, kv_heads: int, head_dim: int, bandwidth: float,
              grid: argparse.Namespace) -> dict:
    match = re.fullmatch(r"(decode|prefill)(\d+)x(\d+)", shape)
    if match is None:
        raise SystemExit(f"attention_kernel: shape {shape!r} is not decodeRxC or prefillRxL")
    prefill, requests, length = match[1] == "prefill", int(match[2]), int(match[3])
    new, cached = (length, 0) if prefill else (1, length)
    per_request = (cached + new + BLOCK_SIZE - 1) // BLOCK_SIZE
    tables = [list(range(1 + i * per_request, 1 + (i + 1) * per_request)) for i in range(requests)]
    batch = build_forward_batch([[5] * new] * requests, [cached] * requests, tables, BLOCK_SIZE, device="cuda")
    cache_shape = (requests * per_request + 1, BLOCK_SIZE, kv_heads, head_dim)
    dtype = torch.float8_e4m3fn if kv_dtype == "fp8" else torch.bfloat16
    key = torch.randn(cache_shape, device="cuda").to(dtype)
    value = torch.randn(cache_shape, device="cuda").to(dtype)
    query = torch.randn(requests * new, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    scale = head_dim**-0.5

    def attend(launch: AttentionLaunch | None) -> torch.Tensor:
        return paged_attention_triton(query, key, value, batch.attention, scale, launch=launch)

    expected = attend(None)
    default_ms = timed_ms(lambda: attend(None))
    results = []
    for launch in launches(prefill, kv_dtype == "fp8", grid):
        try:
            got = attend(launch)
        except Exception as error:  # out of shared memory or registers for this combination: not a candidate
            results.append((float("inf"), launch, type(error).__name__))
            continue
        error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
        if not error < 0.1:
            results.append((float("inf"), launch, "wrong output"))
            continue
        results.append((timed_ms(lambda launch=launch: attend(launch)), launch, f"err {error:.4f}"))
    results.sort(key=lambda item: item[0])
    best_ms, best, best_note = results[0]
    element = 1 if kv_dtype == "fp8" else 2
    kv_bytes = 2 * requests * (cached + new) * kv_heads * head_dim * element
    flops = 4 * requests * heads * head_dim * (length * (length + 1) / 2 if prefill else cached + 1)
    report = {
        "shape": shape, "kv_dtype": kv_dtype, "default_ms": round(default_ms, 4), "best_ms": round(best_ms, 4),
        "best": {field: getattr(best, field) for field in best.__slots__}, "best_note": best_note,
        "copy_tb_s": round(bandwidth / 1e12, 2),
        "default_kv_tb_s": round(kv_bytes / default_ms / 1e9, 2), "best_kv_tb_s": round(kv_bytes / best_ms / 1e9, 2),
        "default_tflop_s": round(flops / default_ms / 1e9, 1), "best_tflop_s": round(flops / best_ms / 1e9, 1),
        "top5": [(round(ms, 4), describe(c), note) for ms, c, note in results[:5]],
        "failed": sum(1 for ms, _, _ in results if ms == float("inf")),
    }
    print(json.dumps(report), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["decode256x192", "decode256x2048", "decode1x512",
                                                        "prefill4x2048"])
    parser.add_argument("--kv-dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--k-rows", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    parser.add_argument("--block-q", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--fp16-tiles", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    parser.add_argument("--fp8-qk", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    parser.add_argument("--fp8-pv", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}", flush=True)
    for shape in args.shapes:
        for kv_dtype in args.kv_dtypes:
            run_shape(shape, kv_dtype, args.heads, args.kv_heads, args.head_dim, bandwidth, args)


if __name__ == "__main__":
    main()
