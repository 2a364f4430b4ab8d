"""The engine manifest's versions: v2 declares backend and quantization; v1 dirs (built before) still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine_builder.engine_dir import MANIFEST, EngineDirError, read_manifest
from engine_builder.forward_batch import build_forward_batch
from engine_builder.loader import load_engine
from tests.engine_builder.conftest import with_manifest
from tests.engine_builder.test_logits import assert_close_to_scale, reference_logits

V1_KEYS = ["format", "format_version", "builder_version", "model", "dtype", "limits", "load_format", "files"]
TOKENS = [5, 17, 3, 99, 42, 7, 7, 150, 2, 11]


def as_v1(manifest: dict) -> dict:
    """The manifest as the builder wrote it before format v2: the same keys in the same order, no backend fields."""
    return {key: 1 if key == "format_version" else manifest[key] for key in V1_KEYS}


def logits_of(directory: Path) -> torch.Tensor:
    engine = load_engine(directory, device="cpu", progress=False)
    kv = engine.backend.allocate_kv_cache(8, 4)
    batch = build_forward_batch([TOKENS], [0], [[6, 1, 3]], 4, num_outputs_per_request=[len(TOKENS)])
    return engine.backend.forward(batch, kv)


def test_a_new_engine_dir_declares_its_backend_and_quantization(engine_dir):
    data = json.loads((engine_dir / MANIFEST).read_text())
    assert (data["format_version"], data["backend"], data["quantization"]) == (2, "torch", None)
    manifest = read_manifest(engine_dir)
    assert (manifest.backend, manifest.quantization) == ("torch", None)


def test_an_engine_dir_from_before_the_backend_fields_loads_as_torch_with_the_same_logits(
    engine_dir, checkpoints, tmp_path
):
    old = with_manifest(engine_dir, tmp_path / "v1", as_v1)
    assert list(json.loads((old / MANIFEST).read_text())) == V1_KEYS
    manifest = read_manifest(old)
    assert (manifest.backend, manifest.quantization) == ("torch", None)
    logits = logits_of(old)
    assert torch.equal(logits, logits_of(engine_dir))
    assert_close_to_scale(logits, reference_logits(checkpoints["llama"][1], TOKENS))


def test_quantization_none_as_a_string_means_unquantized(engine_dir, tmp_path):
    directory = with_manifest(engine_dir, tmp_path / "none", lambda m: {**m, "quantization": "none"})
    assert read_manifest(directory).quantization is None
    assert torch.equal(logits_of(directory), logits_of(engine_dir))


@pytest.mark.parametrize("field", ["backend", "quantization"])
def test_a_v2_manifest_lacking_backend_or_quantization_is_refused(engine_dir, tmp_path, field):
    directory = with_manifest(engine_dir, tmp_path / "lacks", lambda m: {k: v for k, v in m.items() if k != field})
    with pytest.raises(EngineDirError, match=f"manifest lacks '{field}'; rebuild the engine"):
        read_manifest(directory)


def test_a_newer_format_version_is_refused(engine_dir, tmp_path):
    directory = with_manifest(engine_dir, tmp_path / "v3", lambda m: {**m, "format_version": 3})
    with pytest.raises(EngineDirError, match="engine format inflight-engine v3 is not inflight-engine v1/v2"):
        load_engine(directory, device="cpu", progress=False)
