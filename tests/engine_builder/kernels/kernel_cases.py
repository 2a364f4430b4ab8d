"""What the GPU kernel tests share: the paged-attention batch layouts they run and how they measure an error."""

from __future__ import annotations

import random

import torch

from engine_builder.forward_batch import build_forward_batch

# (new tokens per request, tokens already cached per request, query heads, KV heads, head_dim, block size)
ATTENTION_LAYOUTS = [
    ([1] * 64, [random.Random(i).randrange(1, 3000) for i in range(64)], 32, 8, 128, 16),  # decode, GQA 4
    ([1, 1, 1], [5000, 17, 900], 32, 8, 128, 16),  # decode, long contexts: split-KV path
    ([300, 1, 57, 1, 128], [0, 40, 200, 3, 1000], 32, 8, 128, 16),  # mixed prefill chunks + decode
    ([77, 1, 5], [10, 64, 0], 14, 2, 64, 32),  # GQA 7, other head_dim/page
    ([33, 1], [0, 99], 16, 16, 128, 16),  # MHA
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite output (unwritten or NaN)"
    actual, expected = actual.cpu().double(), expected.cpu().double()
    return ((actual - expected).norm() / expected.norm()).item()


def random_layout(query_lens, cached, block_size, num_blocks, seed):
    """A batch over shuffled cache blocks (so that block tables are not in order), on the GPU."""
    rng = random.Random(seed)
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = [[pool.pop() for _ in range(-(-(c + q) // block_size))] for q, c in zip(query_lens, cached)]
    return build_forward_batch([[0] * q for q in query_lens], cached, tables, block_size, device="cuda")
