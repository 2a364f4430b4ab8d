"""The engine-core tests' models: the tiny random Llama in our engine (float32, CPU) and in transformers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_engine_fn(tiny_llama_dir: Path) -> Callable[[int], Any]:
    """tiny_engine(max_seq_len) -> the tiny Llama loaded by our engine (float32, CPU); one per length."""
    from engine_builder.loader import load_engine

    engines: dict[int, Any] = {}

    def tiny_engine(max_seq_len: int) -> Any:
        if max_seq_len not in engines:
            engines[max_seq_len] = load_engine(tiny_llama_dir, device="cpu", dtype="float32",
                                               max_seq_len=max_seq_len, progress=False)
        return engines[max_seq_len]

    return tiny_engine


@pytest.fixture(scope="session")
def hf_model(tiny_llama_dir: Path) -> Any:
    """The same tiny Llama in transformers (float32, eval mode): the reference."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
