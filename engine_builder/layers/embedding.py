"""Vocabulary-parallel embedding and output head: each rank holds ceil(V / N) rows of the vocabulary."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional

from engine_builder.kernels.gemv import linear
from engine_builder.sharding import FULL, Shard


class VocabParallelEmbedding(nn.Module):
    """Token embeddings; sharded, each rank looks up the ids in its rows and the partial results are summed."""

    def __init__(self, vocab_size: int, hidden_size: int, shard: Shard = FULL):
        super().__init__()
        self.shard = shard
        self.rows = -(-vocab_size // shard.size)
        self.start = shard.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.shard.size == 1:
            return functional.embedding(token_ids, self.weight)
        local = token_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        hidden = functional.embedding(local.masked_fill(outside, 0), self.weight)
        hidden = hidden.masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(hidden)
        return hidden


def vocab_logits(hidden: torch.Tensor, head: torch.Tensor, vocab_size: int, shard: Shard = FULL) -> torch.Tensor:
    """Logits over the whole vocabulary [num_tokens, vocab_size] from this rank's rows of the output head
    (all-gathered across ranks when sharded)."""
    logits = linear(hidden, head)
    if shard.size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(shard.size)]
    dist.all_gather(parts, logits.contiguous())
    return torch.cat(parts, dim=-1)[:, :vocab_size]
