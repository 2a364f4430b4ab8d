"""inflight-build: round trip, sharded checkpoints, dummy weights, and every error case."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_builder.cli import main
from engine_builder.engine_dir import EngineDirError, read_manifest
from engine_builder.forward_batch import build_forward_batch
from engine_builder.loader import load_engine
from tests.engine_builder.conftest import tiny_hf_model
from tests.engine_builder.test_logits import assert_close_to_scale, reference_logits

REPO = Path(__file__).resolve().parents[2]


def engine_logits(engine, tokens: list[int]) -> torch.Tensor:
    kv = engine.backend.allocate_kv_cache(16, 8)  # up to 48 tokens in the blocks below
    batch = build_forward_batch([tokens], [0], [[3, 1, 7, 5, 12, 9]], 8, num_outputs_per_request=[len(tokens)])
    return engine.backend.forward(batch, kv)


def copy_checkpoint(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


def assert_clean_failure(capsys, argv: list[str], output: Path, expected_words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("inflight-build: error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # progress lines may precede it
    assert "Traceback" not in err
    assert expected_words.lower() in errors[0].lower(), errors[0]
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")], "staging dir left behind"


@pytest.mark.parametrize("kind", ["qwen2", "llama3_scaled_tied", "qwen3"])
def test_round_trip_matches_transformers(kind, checkpoints, tmp_path, capsys):
    directory, hf_model = checkpoints[kind]
    output = tmp_path / "engine"
    assert main([str(directory), "--output", str(output), "--max-seq-len", "128"]) == 0
    assert "converting weights" in capsys.readouterr().err  # the progress bar
    manifest = read_manifest(output)
    assert manifest.model.architecture == hf_model.config.architectures[0]
    assert manifest.dtype == "float32" and manifest.limits.max_seq_len == 128
    assert set(manifest.files) >= {"weights.safetensors"}
    engine = load_engine(output, device="cpu", progress=False)
    tokens = [5, 17, 3, 99, 42, 7, 7, 150, 2, 11]
    assert_close_to_scale(engine_logits(engine, tokens), reference_logits(hf_model, tokens))


def test_sharded_checkpoint(tmp_path):
    hf_model = tiny_hf_model("llama", seed=4)
    checkpoint = tmp_path / "sharded"
    hf_model.save_pretrained(checkpoint, max_shard_size="40KB")
    assert (checkpoint / "model.safetensors.index.json").exists()
    assert len(list(checkpoint.glob("*.safetensors"))) > 2
    output = tmp_path / "engine"
    assert main([str(checkpoint), "--output", str(output), "--quiet"]) == 0
    engine = load_engine(output, device="cpu", progress=False)
    tokens = list(range(3, 40))
    assert_close_to_scale(engine_logits(engine, tokens), reference_logits(hf_model, tokens))


def test_dummy_load_format_needs_only_config(checkpoints, tmp_path):
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(checkpoints["mistral"][0] / "config.json", config_only)
    output = tmp_path / "engine"
    assert (
        main([str(config_only), "--output", str(output), "--load-format", "dummy", "--dtype", "bfloat16", "--quiet"])
        == 0
    )
    assert read_manifest(output).load_format == "dummy"
    weights = load_file(str(output / "weights.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    engine = load_engine(output, device="cpu", progress=False)
    logits = engine_logits(engine, [1, 2, 3])
    assert logits.shape == (3, 160) and torch.isfinite(logits).all()


def test_checksum_mismatch_is_refused(checkpoints, tmp_path):
    output = tmp_path / "engine"
    assert main([str(checkpoints["llama"][0]), "--output", str(output), "--quiet"]) == 0
    weights = output / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineDirError, match="checksum"):
        load_engine(output, device="cpu", progress=False)


def test_unsupported_architecture(checkpoints, tmp_path, capsys):
    checkpoint = copy_checkpoint(checkpoints["llama"][0], tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert_clean_failure(capsys, [str(checkpoint), "-o", str(tmp_path / "out")], tmp_path / "out", "GPT2LMHeadModel")


def test_unreadable_config(checkpoints, tmp_path, capsys):
    checkpoint = copy_checkpoint(checkpoints["llama"][0], tmp_path)
    (checkpoint / "config.json").write_text("{not json")
    assert_clean_failure(capsys, [str(checkpoint), "-o", str(tmp_path / "out")], tmp_path / "out", "config.json")


def test_missing_weight_file(tmp_path, capsys):
    checkpoint = tmp_path / "sharded"
    tiny_hf_model("llama").save_pretrained(checkpoint, max_shard_size="40KB")
    victim = sorted(checkpoint.glob("*.safetensors"))[1]
    victim.unlink()
    assert_clean_failure(capsys, [str(checkpoint), "-o", str(tmp_path / "out")], tmp_path / "out", victim.name)


def test_truncated_weight_file(checkpoints, tmp_path, capsys):
    checkpoint = copy_checkpoint(checkpoints["llama"][0], tmp_path)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_clean_failure(capsys, [str(checkpoint), "-o", str(tmp_path / "out")], tmp_path / "out", "truncated")


def test_missing_tensor(checkpoints, tmp_path, capsys):
    checkpoint = copy_checkpoint(checkpoints["llama"][0], tmp_path)
    weights = load_file(str(checkpoint / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    assert_clean_failure(
        capsys, [str(checkpoint), "-o", str(tmp_path / "out")], tmp_path / "out", "model.layers.1.mlp.up_proj.weight"
    )


def test_shape_mismatch(checkpoints, tmp_path, capsys):
    checkpoint = copy_checkpoint(checkpoints["llama"][0], tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    config["intermediate_size"] = 120
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert_clean_failure(capsys, [str(checkpoint), "-o", str(tmp_path / "out")], tmp_path / "out", "shape mismatch")


def test_output_exists(checkpoints, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    assert main([str(checkpoints["llama"][0]), "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and len(err.strip().splitlines()) == 1
    assert (output / "keep.txt").read_text() == "user data"


def test_cli_process_reports_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "engine_builder.cli", str(missing), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "not a directory" in result.stderr
    bad_flag = subprocess.run(
        [sys.executable, "-m", "engine_builder.cli", str(missing), "-o", "x", "--dtype", "int3"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad_flag.returncode == 2 and bad_flag.stderr.strip().count("\n") == 0


def test_engine_limits_can_be_lowered_at_load_but_not_raised(checkpoints, tmp_path):
    output = tmp_path / "engine"
    assert main([str(checkpoints["llama"][0]), "--output", str(output), "--max-seq-len", "128", "--quiet"]) == 0
    engine = load_engine(output, device="cpu", max_seq_len=64, max_batch_size=4, max_num_tokens=32, progress=False)
    assert (engine.limits.max_seq_len, engine.limits.max_batch_size, engine.limits.max_num_tokens) == (64, 4, 32)
    with pytest.raises(ValueError, match="exceeds the engine's max_seq_len 128"):
        load_engine(output, device="cpu", max_seq_len=256, progress=False)


def modules_imported_by(args: list[str], module: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m MODULE ARGS`; returns the process and the top-level packages it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    return result, imported


def test_help_does_not_import_torch():
    result, imported = modules_imported_by(["--help"], "engine_builder.cli")
    assert result.returncode == 0 and "--max-seq-len" in result.stdout
    assert imported and not imported & {"torch", "transformers", "safetensors"}, sorted(imported)


@pytest.mark.parametrize(("args", "expected"), [
    ([], "the following arguments are required: checkpoint, --output"),
    (["ckpt", "-o", "out", "--max-seq-len", "0"], "must be a positive integer, got 0"),
    (["ckpt", "-o", "out", "--dtype", "int3"], "invalid choice: 'int3'"),
])
def test_bad_arguments_are_one_line_before_torch(args, expected):
    result, imported = modules_imported_by(args, "engine_builder.cli")
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("inflight-build: error: ") and expected in lines[0]
    assert "torch" not in imported


def test_dtype_choices_are_the_engine_formats():
    from engine_builder.cli import DTYPE_NAMES
    from engine_builder.engine_dir import DTYPES

    assert DTYPE_NAMES == tuple(DTYPES)
