"""Our paged forward pass against transformers' logits, for every supported architecture (float32, CPU)."""

from __future__ import annotations

import random

import pytest
import torch

from engine_builder.forward_batch import build_forward_batch
from engine_builder.loader import load_engine
from tests.engine_builder.conftest import ARCHITECTURES

BLOCK_SIZE = 4


def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def scattered_block_tables(lengths: list[int], num_blocks: int, rng: random.Random) -> list[list[int]]:
    """Disjoint, shuffled (non-contiguous, out of order) block ids for each request."""
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = []
    for length in lengths:
        needed = -(-length // BLOCK_SIZE)
        tables.append([pool.pop() for _ in range(needed)])
    return tables


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= 1e-4 * scale, f"max abs diff {error:.3g} exceeds 1e-4 of the logits' scale {scale:.3g}"


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_batched_prompts_match_transformers(kind, checkpoints):
    directory, hf_model = checkpoints[kind]
    engine = load_engine(directory, device="cpu", progress=False)
    rng = random.Random(1)
    lengths = [1, 5, 17, 33, 8]
    prompts = [[rng.randrange(engine.config.vocab_size) for _ in range(n)] for n in lengths]
    tables = scattered_block_tables(lengths, num_blocks=64, rng=rng)
    kv = engine.backend.allocate_kv_cache(64, BLOCK_SIZE)
    batch = build_forward_batch(prompts, [0] * len(prompts), tables, BLOCK_SIZE, num_outputs_per_request=lengths)
    logits = engine.backend.forward(batch, kv)
    expected = torch.cat([reference_logits(hf_model, p) for p in prompts])
    assert logits.shape == expected.shape
    assert_close_to_scale(logits, expected)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_chunked_prefill_and_decode_match_recomputation(kind, checkpoints):
    """Requests join and leave; prompts arrive in 2-3 chunks; then 20 decode steps each."""
    directory, hf_model = checkpoints[kind]
    engine = load_engine(directory, device="cpu", progress=False)
    rng = random.Random(2)
    vocab = engine.config.vocab_size
    num_decode = 20
    # (step the request joins, its prompt chunk sizes)
    plans = [(0, [7, 6]), (0, [3, 9, 4]), (2, [11, 1]), (5, [2, 2, 2]), (9, [13, 5])]
    sequences = [[rng.randrange(vocab) for _ in range(sum(chunks) + num_decode)] for _, chunks in plans]
    expected = [reference_logits(hf_model, s) for s in sequences]
    lengths = [len(s) for s in sequences]
    tables = scattered_block_tables(lengths, num_blocks=128, rng=rng)
    kv = engine.backend.allocate_kv_cache(128, BLOCK_SIZE)
    # Each request's work: its chunks, then single tokens.
    work = [list(chunks) + [1] * num_decode for _, chunks in plans]
    done = [0] * len(plans)  # tokens processed so far
    step, checked = 0, 0
    while any(work):
        active = [i for i, (join, _) in enumerate(plans) if join <= step and work[i]]
        step += 1
        if not active:
            continue
        chunks = [work[i].pop(0) for i in active]
        tokens = [sequences[i][done[i] : done[i] + n] for i, n in zip(active, chunks)]
        batch = build_forward_batch(tokens, [done[i] for i in active], [tables[i] for i in active], BLOCK_SIZE)
        logits = engine.backend.forward(batch, kv)
        for row, (i, n) in enumerate(zip(active, chunks)):
            done[i] += n
            assert_close_to_scale(logits[row], expected[i][done[i] - 1])
            checked += 1
    assert checked == sum(len(chunks) + num_decode for _, chunks in plans)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_greedy_tokens_match_transformers_generate(kind, checkpoints):
    directory, hf_model = checkpoints[kind]
    engine = load_engine(directory, device="cpu", progress=False)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, engine.config.vocab_size) for _ in range(n)] for n in (4, 9, 15)]
    num_new = 20
    tables = scattered_block_tables([len(p) + num_new for p in prompts], num_blocks=64, rng=rng)
    kv = engine.backend.allocate_kv_cache(64, BLOCK_SIZE)
    generated: list[list[int]] = [[] for _ in prompts]
    pending = [list(p) for p in prompts]
    cached = [0] * len(prompts)
    for _ in range(num_new):
        batch = build_forward_batch(pending, cached, tables, BLOCK_SIZE)
        next_tokens = engine.backend.forward(batch, kv).argmax(dim=-1).tolist()
        for i, token in enumerate(next_tokens):
            cached[i] += len(pending[i])
            pending[i] = [token]
            generated[i].append(token)
    for prompt, ours in zip(prompts, generated):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=num_new, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert ours == out[0, len(prompt) :].tolist()
