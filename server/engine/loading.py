"""What the server loads: the engine, in whichever process steps it (the API process needs only its tokenizer:
engine_builder.loader.load_tokenizer).

With the engine core in its own process (core_client.py) the child loads the engine from these
arguments; the API process only needs the tokenizer (chat templates, tokenizing, decoding prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine_builder.loader import Engine, load_engine


@dataclass(slots=True)
class EngineLoadArgs:
    """The arguments of engine_builder.loader.load_engine, as the server passes them (picklable)."""

    model: Path  # engine directory or Hugging Face checkpoint directory
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    dtype: str | None = None  # None keeps the engine's (or checkpoint's) dtype
    load_format: str = "auto"  # "dummy": random weights from config.json
    max_seq_len: int | None = None  # lowers the engine's limits where given
    max_batch_size: int | None = None
    max_num_tokens: int | None = None

    def load(self) -> Engine:
        """Load the engine (ValueError naming the problem when it cannot be)."""
        return load_engine(
            self.model, device=self.device, dtype=self.dtype, load_format=self.load_format,
            max_seq_len=self.max_seq_len, max_batch_size=self.max_batch_size, max_num_tokens=self.max_num_tokens,
            progress=False,
        )
