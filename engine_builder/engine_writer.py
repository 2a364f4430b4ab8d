"""Write an engine directory (format: engine_dir.py) from a checkpoint and its converted weights."""

from __future__ import annotations

import json
import secrets
import shutil
import stat
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine_builder import __version__
from engine_builder.checkpoint import Checkpoint
from engine_builder.engine_dir import (
    CHAT_TEMPLATE,
    GENERATION_CONFIG,
    MANIFEST,
    TOKENIZER_DIR,
    WEIGHTS,
    EngineDirError,
    EngineLimits,
    Manifest,
    sha256_of,
)
from engine_builder.quantize import Quantization


def write_engine_dir(
    output: Path,
    checkpoint: Checkpoint,
    weights: dict[str, torch.Tensor],
    dtype: str,
    limits: EngineLimits,
    load_format: str,
    quantization: Quantization | None = None,
) -> None:
    """Write the engine directory atomically: into a temporary sibling, then rename.

    Directories and files get the modes `mkdir` and `open` give (0755 and 0644 under umask 022), whatever the
    checkpoint's files have.

    Args:
        output: the engine directory to create (must not exist).
        checkpoint: the checkpoint the weights came from (tokenizer files, chat template, generation config).
        weights: engine parameter name -> converted tensor.
        dtype: the weights' dtype name (a key of engine_dir.DTYPES).
        limits: the limits the engine is built for.
        load_format: "auto" (real weights) or "dummy" (random).
        quantization: how the weights are quantized (FP8 weights and their scales are in `weights`); None: not.

    Raises:
        EngineDirError: the output path already exists.
    """
    output = Path(output)
    if output.exists():
        raise EngineDirError(f"{output}: output path exists; remove it or choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.{secrets.token_hex(6)}"
    staging.mkdir()  # not tempfile.mkdtemp: that is 0700
    file_mode = stat.S_IMODE(staging.stat().st_mode) & 0o666  # what open() gives under the same umask
    try:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / WEIGHTS).chmod(file_mode)  # safetensors writes 0600
        tokenizer_dir = staging / TOKENIZER_DIR
        tokenizer_dir.mkdir()
        for file in checkpoint.tokenizer_files:
            shutil.copyfile(file, tokenizer_dir / file.name)  # the contents, not the checkpoint's modes
        if checkpoint.chat_template is not None and not (tokenizer_dir / CHAT_TEMPLATE).exists():
            (tokenizer_dir / CHAT_TEMPLATE).write_text(checkpoint.chat_template, encoding="utf-8")
        if checkpoint.generation_config is not None:
            (staging / GENERATION_CONFIG).write_text(json.dumps(checkpoint.generation_config, indent=2))
        files = {
            str(path.relative_to(staging)): sha256_of(path) for path in sorted(staging.rglob("*")) if path.is_file()
        }
        manifest = Manifest(
            model=checkpoint.model_config,
            dtype=dtype,
            limits=limits,
            builder_version=__version__,
            load_format=load_format,
            backend="torch",  # the only backend inflight-build builds for
            quantization=None if quantization is None else quantization.scheme,
            files=files,
            quantization_config=None if quantization is None else quantization.to_dict(),
        )
        (staging / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
