"""The ModelBackend protocol: the torch backend implements it; manifests naming another backend are one clear error."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_builder.engine_dir import EngineDirError
from engine_builder.forward_batch import build_forward_batch
from engine_builder.loader import load_engine
from engine_builder.runtime.backend import BACKENDS, ModelBackend
from engine_builder.runtime.torch_backend import TorchBackend
from tests.engine_builder.conftest import with_manifest

REPO = Path(__file__).resolve().parents[3]
PROTOCOL_MEMBERS = ["config", "device", "dtype", "limits", "kv_cache_spec", "allocate_kv_cache", "copy_kv_blocks",
                    "forward", "profile_peak_memory", "capture_cuda_graphs"]


def test_the_protocol_declares_the_runner_and_engine_surface_and_no_tokenizer():
    declared = {name for name in vars(ModelBackend) if not name.startswith("_")}
    assert declared == set(PROTOCOL_MEMBERS)  # the tokenizer, chat template and generation config are the loader's


def test_the_torch_backend_is_a_model_backend(engine_dir):
    backend = load_engine(engine_dir, device="cpu", progress=False).backend
    assert isinstance(backend, TorchBackend) and isinstance(backend, ModelBackend)
    for name in PROTOCOL_MEMBERS:
        declared = inspect.getattr_static(ModelBackend, name)
        implemented = inspect.getattr_static(TorchBackend, name, None)
        if inspect.isfunction(declared):  # a method: same parameters, same defaults
            assert inspect.signature(implemented).parameters.keys() == inspect.signature(declared).parameters.keys()
            assert [p.default for p in inspect.signature(implemented).parameters.values()] == \
                [p.default for p in inspect.signature(declared).parameters.values()], name
        else:  # a property there; an attribute or property here
            assert getattr(backend, name) is not None, name
    assert (backend.config.vocab_size, backend.device, backend.dtype) == (160, torch.device("cpu"), torch.float32)
    assert backend.kv_cache_spec.bytes_per_block(4) == 2 * 2 * 4 * 2 * 16 * 4  # K+V, layers, tokens, heads, dim, fp32


def test_an_object_missing_a_member_is_not_a_model_backend(engine_dir):
    backend = load_engine(engine_dir, device="cpu", progress=False).backend

    class WithoutCopy:
        def __getattr__(self, name):
            if name == "copy_kv_blocks":
                raise AttributeError(name)
            return getattr(backend, name)

    assert not isinstance(WithoutCopy(), ModelBackend)


def test_copy_kv_blocks_copies_whole_blocks_in_every_layer_and_what_attends_to_them(engine_dir):
    backend = load_engine(engine_dir, device="cpu", progress=False).backend
    kv = backend.allocate_kv_cache(8, 4)
    prompt = [5, 17, 3, 99, 42, 7]
    backend.forward(build_forward_batch([prompt], [0], [[1, 2]], 4), kv)
    backend.copy_kv_blocks(kv, [1, 2], [5, 6])
    for layer in kv:
        assert torch.equal(layer.key[[5, 6]], layer.key[[1, 2]]) and layer.key[1].abs().sum() > 0
        assert torch.equal(layer.value[[5, 6]], layer.value[[1, 2]])
    original = backend.forward(build_forward_batch([[11]], [len(prompt)], [[1, 2]], 4), kv)
    copied = backend.forward(build_forward_batch([[11]], [len(prompt)], [[5, 6]], 4), kv)
    assert torch.equal(original, copied)
    backend.copy_kv_blocks(kv, [], [])  # no copies: nothing to do


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("backend", "tensorrt", "engine backend 'tensorrt' is not supported (supported: torch)"),
    ("quantization", "int4", "quantization 'int4' is not supported by the torch backend (supported: none, fp8)"),
])
def test_an_unknown_backend_or_quantization_is_one_line_naming_it(engine_dir, tmp_path, field, value, expected):
    directory = with_manifest(engine_dir, tmp_path / "engine", lambda m: {**m, field: value})
    with pytest.raises(EngineDirError) as raised:
        load_engine(directory, device="cpu", progress=False)
    message = str(raised.value)
    assert message == f"{directory}: {expected}" and "\n" not in message
    assert list(BACKENDS) == ["torch"]


def test_inflight_serve_reports_an_unknown_backend_in_one_line(engine_dir, tmp_path, port):
    directory = with_manifest(engine_dir, tmp_path / "engine", lambda m: {**m, "backend": "tensorrt"})
    environ = {key: value for key, value in os.environ.items() if not key.startswith("INFLIGHT_")}
    environ["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-m", "server", str(directory), "--device", "cpu", "--port", str(port)],
                            capture_output=True, text=True, env=environ, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"inflight-serve: error: {directory}: engine backend 'tensorrt' is not supported (supported: torch)")
