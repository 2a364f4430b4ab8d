"""The Triton model repository that deploy/triton/build_repository.py writes, read by Triton's own model config
schema (tritonclient's model_config_pb2), and the mapping of TensorRT-LLM-style inputs to sampling parameters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.engine.errors import InvalidRequest
from server.triton.backend import model_parameters, sampling_params_of
from server.triton.repository import REPO_ROOT

# the test extra has tritonclient (the GPU machine does not)
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

READ_BY_THE_BACKEND = {"text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "seed", "stop_words",
                       "end_id", "beam_width", "min_tokens", "presence_penalty", "frequency_penalty",
                       "repetition_penalty"}


def test_the_repository_is_a_decoupled_python_model_with_the_engine_settings(bundled_model_dir, tmp_path) -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "deploy" / "triton" / "build_repository.py"),
                           str(bundled_model_dir), str(tmp_path / "repo"), "--max-num-seqs", "32", "--device", "cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model = tmp_path / "repo" / "inflight"
    assert (model / "1" / "model.py").read_text() == (REPO_ROOT / "deploy" / "triton" / "model.py").read_text()
    schema = model_config_pb2.ModelConfig  # pyright: ignore[reportAttributeAccessIssue]  (generated protobuf)
    config = text_format.Parse((model / "config.pbtxt").read_text(), schema())
    assert (config.name, config.backend, config.max_batch_size) == ("inflight", "python", 0)
    assert config.model_transaction_policy.decoupled
    assert {i.name for i in config.input} == READ_BY_THE_BACKEND
    assert [i.name for i in config.input if not i.optional] == ["text_input"]
    assert {o.name for o in config.output} == {"text_output", "output_ids"}
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters == {"engine_path": str(bundled_model_dir.resolve()), "max_num_seqs": "32", "device": "cpu"}
    assert model_parameters({"parameters": {k: {"string_value": v} for k, v in parameters.items()}}) == parameters


def test_a_bad_repository_build_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "deploy" / "triton" / "build_repository.py"),
                           str(tmp_path / "missing"), str(tmp_path / "repo")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr
    assert not (tmp_path / "repo").exists()


def test_tensorrt_llm_inputs_become_sampling_parameters() -> None:
    params = sampling_params_of({"max_tokens": 12, "temperature": 0.5, "top_k": 0, "top_p": 0.9, "seed": 3,
                                 "stop_words": ["\n", ""], "end_id": 2, "presence_penalty": 0.5}, 512, 5)
    assert (params.max_tokens, params.temperature, params.top_k, params.top_p, params.seed) == (12, 0.5, None, 0.9, 3)
    assert (params.stop, params.stop_token_ids, params.presence_penalty) == (["\n"], [2], 0.5)
    beams = sampling_params_of({"beam_width": 3, "max_tokens": 4}, 512, 5)
    assert beams.beam_search is not None and beams.beam_search.num_beams == 3 and beams.temperature == 0
    with pytest.raises(InvalidRequest, match="temperature"):
        sampling_params_of({"temperature": -1.0}, 512, 5)
    with pytest.raises(InvalidRequest, match="beam_width"):
        sampling_params_of({"beam_width": 0}, 512, 5)
