"""Tiny random-initialised checkpoints of every supported architecture, built with transformers (no downloads), and an
engine directory built from one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

ARCHITECTURES = ["llama", "llama3_scaled_tied", "mistral", "qwen2", "qwen3"]


def tiny_hf_config(kind: str) -> transformers.PretrainedConfig:
    common: dict[str, Any] = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "llama3_scaled_tied":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        # The ignores: the config takes these through **kwargs, which transformers' stubs leave out.
        return transformers.LlamaConfig(**common, tie_word_embeddings=True,
                                        rope_theta=500000.0,  # pyright: ignore[reportCallIssue]
                                        rope_scaling=scaling)  # pyright: ignore[reportCallIssue]
    if kind == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=False)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False)
    if kind == "llama_one_kv_head":  # fewer KV heads than tensor-parallel ranks
        return transformers.LlamaConfig(**{**common, "num_key_value_heads": 1}, tie_word_embeddings=False)
    raise ValueError(kind)


def tiny_hf_model(kind: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A float32 model with every weight random (biases and norm scales too, so none is trivially 0 or 1)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(kind), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.08)
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, transformers.PreTrainedModel]]:
    """kind -> (checkpoint dir, the transformers model saved there)."""
    result = {}
    for kind in ARCHITECTURES:
        model = tiny_hf_model(kind)
        directory = tmp_path_factory.mktemp(f"ckpt_{kind}")
        model.save_pretrained(directory)
        result[kind] = (directory, model)
    return result


@pytest.fixture(scope="session")
def engine_dir(checkpoints, tmp_path_factory) -> Path:
    """An engine directory built by inflight-build from the tiny llama checkpoint (float32)."""
    from engine_builder.cli import main

    output = tmp_path_factory.mktemp("built") / "engine"
    assert main([str(checkpoints["llama"][0]), "--output", str(output), "--quiet"]) == 0
    return output


def with_manifest(engine_dir: Path, target: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> Path:
    """A copy of engine_dir whose manifest.json is edit(manifest) (the files' checksums stay valid)."""
    shutil.copytree(engine_dir, target)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps(edit(manifest), indent=2))
    return target
