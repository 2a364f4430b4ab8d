"""Integer arithmetic that block tables and packed buffers share."""

from __future__ import annotations


def ceil_div(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded up (e.g. KV blocks for a number of tokens), for positive denominators."""
    return -(-numerator // denominator)
