"""The Triton KV-cache kernels with an FP8 cache against the torch references, run on the CPU by Triton's interpreter.

    TRITON_INTERPRET=1 INFLIGHT_FORCE_TRITON=1 python tests/engine_builder/fp8_kv_cache_kernel_checks.py

A script, not a test module: TRITON_INTERPRET must be set before triton is imported, so test_fp8_kv_cache.py runs it
in its own process. Exits non-zero (an AssertionError) on the first mismatch; prints one line per check.

The interpreter emulates float32 -> e4m3 in numpy and rounds some values wrongly (Triton 3.9: 124 -> 64 where the GPU
and torch give 128, 7.9 -> 4): the write checks therefore store values that need no rounding (FP8 values times a
power-of-two scale, plus values to clip), and the rounding itself is the GPU tests' business
(tests/engine_builder/kernels/test_fp8_kv_cache_triton.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from engine_builder.forward_batch import build_forward_batch
from engine_builder.kernels import dispatch, triton_attention, triton_elementwise
from engine_builder.kernels.kv_cache import write_kv
from engine_builder.kernels.paged_attention import paged_attention_reference
from engine_builder.kernels.rotary import apply_rotary

FP8 = torch.float8_e4m3fn


@contextmanager
def torch_reference() -> Iterator[None]:
    """Calls inside take the torch reference (INFLIGHT_FORCE_TRITON=1 would send write_kv to Triton too; dispatch
    reads the variable once, at import, so its flag is switched here)."""
    dispatch._FORCED = False
    try:
        yield
    finally:
        dispatch._FORCED = True


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def exact_inputs(shape: tuple[int, ...], scale: float, generator: torch.Generator) -> torch.Tensor:
    """Random FP8 values times `scale` (stored without rounding), a tenth of them 4x past the clipping point."""
    values = (torch.randn(shape, generator=generator) * 100).to(FP8).float() * scale
    clipped = torch.rand(shape, generator=generator) < 0.1
    return torch.where(clipped, values.sign() * 448 * 4 * scale, values)


def check_write() -> None:
    generator = torch.Generator().manual_seed(0)
    key, value = exact_inputs((20, 2, 64), 0.25, generator), exact_inputs((20, 2, 64), 2.0, generator)
    slots = torch.randperm(128, generator=generator)[:20]
    ours = [torch.zeros(8, 16, 2, 64, dtype=FP8) for _ in range(2)]
    reference = [torch.zeros(8, 16, 2, 64, dtype=FP8) for _ in range(2)]
    triton_elementwise.write_kv_triton(key, value, ours[0], ours[1], slots, None, 0.25, 2.0)
    with torch_reference():
        write_kv(key, value, reference[0], reference[1], slots, None, 0.25, 2.0)
    assert same_bytes(ours[0], reference[0]) and same_bytes(ours[1], reference[1])
    assert (ours[0].view(128, 2, 64)[slots].float() * 0.25 == key.clamp(-448 * 0.25, 448 * 0.25)).all()
    padded = [torch.zeros(8, 16, 2, 64, dtype=FP8) for _ in range(2)]
    triton_elementwise.write_kv_triton(key, value, padded[0], padded[1], slots, torch.tensor([12]), 0.25, 2.0)
    written = padded[0].view(128, -1)[slots].float().abs().sum(dim=1)
    assert (written[:12] > 0).all() and (written[12:] == 0).all()
    print("write_kv_triton: the reference's bytes (scaled, clipped), padding skipped")


def check_rotary_write() -> None:
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(20, 8, 64, generator=generator)
    key, value = exact_inputs((20, 2, 64), 0.5, generator), exact_inputs((20, 2, 64), 0.125, generator)
    positions = torch.randint(0, 500, (20,), generator=generator)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    slots = torch.randperm(128, generator=generator)[:20]
    with torch_reference():
        expected_query = apply_rotary(query, positions, inv_freq)
        reference = [torch.zeros(8, 16, 2, 64, dtype=FP8) for _ in range(2)]
        write_kv(key, value, reference[0], reference[1], slots, None, 0.5, 0.125)  # position 0 rotates nothing
    ours = [torch.zeros(8, 16, 2, 64, dtype=FP8) for _ in range(2)]
    rotated = triton_elementwise.rotary_write_kv_triton(query, key, value, positions, inv_freq, ours[0], ours[1],
                                                        slots, None, 0.5, 0.125)
    torch.testing.assert_close(rotated, expected_query, rtol=1e-5, atol=1e-5)
    assert same_bytes(ours[1], reference[1])
    # keys at position 0 are stored unrotated, so without rounding (the interpreter's rotated keys would need it)
    ours = [torch.zeros(8, 16, 2, 64, dtype=FP8) for _ in range(2)]
    triton_elementwise.rotary_write_kv_triton(query, key, value, torch.zeros_like(positions), inv_freq, ours[0],
                                              ours[1], slots, None, 0.5, 0.125)
    assert same_bytes(ours[0], reference[0]) and same_bytes(ours[1], reference[1])
    print("rotary_write_kv_triton: the reference's query and bytes (scaled, clipped)")


def check_attention() -> None:
    generator = torch.Generator().manual_seed(2)
    cases = [  # (query_lens, cached, heads, kv_heads)
        ([1, 1, 1], [300, 17, 90], 8, 2),  # decode, GQA 4, long enough to split
        ([40, 1, 7], [0, 50, 100], 8, 2),  # prompt chunks (one with cached keys before it) and a decode
        ([9, 1], [33, 200], 4, 4),  # MHA
    ]
    for query_lens, cached, heads, kv_heads in cases:
        counts = [-(-(q + c) // 16) for q, c in zip(query_lens, cached)]
        pool = torch.randperm(sum(counts) + 2, generator=generator).tolist()
        tables = [[pool.pop() for _ in range(n)] for n in counts]
        metadata = build_forward_batch([[0] * q for q in query_lens], cached, tables, 16).attention
        key_cache = (4 * torch.randn(sum(counts) + 2, 16, kv_heads, 64, generator=generator)).to(FP8)
        value_cache = torch.randn(sum(counts) + 2, 16, kv_heads, 64, generator=generator).to(FP8)
        query = torch.randn(sum(query_lens), heads, 64, generator=generator)
        expected = paged_attention_reference(query, key_cache, value_cache, metadata, 0.125, 0.3, 0.7)
        for splits in (1, 2, 4) if metadata.max_query_len == 1 else (None,):
            actual = triton_attention.paged_attention_triton(query, key_cache, value_cache, metadata, 0.125,
                                                             num_splits=splits, k_scale=0.3, v_scale=0.7)
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
        # FP8 dots: the query and the softmax weights rounded to e4m3 move the output by a few percent (the GPU test
        # states why); a wrong scale would move it by ~100%
        launch = triton_attention.AttentionLaunch(fp8_qk=True, fp8_pv=True)
        actual = triton_attention.paged_attention_triton(query, key_cache, value_cache, metadata, 0.125,
                                                         k_scale=0.3, v_scale=0.7, launch=launch)
        error = ((actual - expected).norm() / expected.norm()).item()
        assert error < 0.1, error
        print(f"paged_attention_triton: the reference's output, query_lens {query_lens}, {heads}/{kv_heads} heads "
              f"(FP8 dots: relative error {error:.4f})")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 INFLIGHT_FORCE_TRITON=1"
    check_write()
    check_rotary_write()
    check_attention()
