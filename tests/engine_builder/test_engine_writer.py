"""An engine directory is written with the modes `mkdir` and `open` give (0755 / 0644 under umask 022)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_engine_dir_is_readable_by_others_under_umask_022(tiny_llama_dir, tmp_path):
    checkpoint = shutil.copytree(tiny_llama_dir, tmp_path / "ckpt")
    for path in [checkpoint, *checkpoint.rglob("*")]:  # a checkpoint that only its owner may read
        path.chmod(0o700 if path.is_dir() else 0o600)
    output = tmp_path / "engine"
    result = subprocess.run(  # the process a user runs, under the usual umask
        ["sh", "-c", 'umask 022 && exec "$0" -m engine_builder.cli "$1" --output "$2" --quiet', sys.executable,
         str(checkpoint), str(output)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    modes = {str(path.relative_to(output)): stat.S_IMODE(path.stat().st_mode) for path in [output, *output.rglob("*")]}
    assert {"manifest.json", "weights.safetensors", "tokenizer", "tokenizer/tokenizer.json"} <= set(modes)
    expected = {name: 0o755 if (output / name).is_dir() else 0o644 for name in modes}
    assert modes == expected


def test_modes_follow_the_umask(tiny_llama_dir, tmp_path):
    from engine_builder.cli import main

    output = tmp_path / "engine"
    previous = os.umask(0o027)
    try:
        assert main([str(tiny_llama_dir), "--output", str(output), "--quiet"]) == 0
    finally:
        os.umask(previous)
    for path in [output, *output.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o750 if path.is_dir() else 0o640), path
