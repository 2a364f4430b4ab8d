"""What the server loads: the engine (in whichever process steps it) and, for the API, its tokenizer alone.

With the engine core in its own process (core_client.py) the child loads the engine from these
arguments; the API process only needs the tokenizer (chat templates, tokenizing, decoding prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_builder.checkpoint import read_checkpoint
from engine_builder.engine_dir import MANIFEST
from engine_builder.runtime import Engine, _load_tokenizer, load_engine


@dataclass(slots=True)
class EngineLoadArgs:
    """The arguments of engine_builder.runtime.load_engine, as the server passes them (picklable)."""

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


def load_tokenizer(model: Path) -> Any | None:
    """The tokenizer `load_engine(model)` would give its Engine, without reading any weights.

    The directory and chat template are chosen as load_engine chooses them (an engine directory keeps both
    under tokenizer/; a checkpoint has them beside its config), and the tokenizer is built by the same
    engine_builder function.

    Args:
        model: engine directory or Hugging Face checkpoint directory.

    Returns:
        The transformers tokenizer, or None when the model ships none. Raises ValueError for a checkpoint
        that cannot be read.
    """
    if (model / MANIFEST).exists():
        tokenizer_dir = model / "tokenizer"
        template_file = tokenizer_dir / "chat_template.jinja"
        chat_template = template_file.read_text() if template_file.exists() else None
    else:
        tokenizer_dir, chat_template = model, read_checkpoint(model, with_weights=False).chat_template
    return _load_tokenizer(tokenizer_dir, chat_template)
