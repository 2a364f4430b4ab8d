"""The engine directory: a versioned manifest, the converted weights, the tokenizer and chat template.

    ENGINE_DIR/
      manifest.json            format, builder version, model dims, dtype, limits, sha256 of every file
      weights.safetensors      engine-named, fused, cast weights
      generation_config.json   copied from the checkpoint, when present
      tokenizer/               tokenizer files (+ chat_template.jinja)
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine_builder import __version__
from engine_builder.checkpoint import Checkpoint
from engine_builder.model_config import ModelConfig

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
FORMAT_NAME = "inflight-engine"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class EngineDirError(ValueError):
    """The engine directory is missing, corrupt or from an incompatible builder."""


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """Sizes the engine was built for; the server never exceeds them."""

    max_seq_len: int  # prompt + generated tokens of one request
    max_batch_size: int  # requests in one step
    max_num_tokens: int  # new tokens in one step (prompt chunks + decodes)


@dataclass(frozen=True, slots=True)
class Manifest:
    model: ModelConfig
    dtype: str  # one of DTYPES
    limits: EngineLimits
    builder_version: str
    load_format: str  # "auto" (real weights) or "dummy" (random)
    files: dict[str, str]  # relative path -> sha256


def resolve_dtype(name: str, hf_config: dict[str, Any]) -> str:
    """'auto' takes the checkpoint's dtype (float32 if it names none)."""
    if name == "auto":
        name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported (choose from auto, {', '.join(DTYPES)})")
    return name


def default_limits(
    config: ModelConfig, max_seq_len: int | None, max_batch_size: int | None, max_num_tokens: int | None
) -> EngineLimits:
    """Fill unset limits and check them against the model."""
    longest = config.max_position_embeddings
    if config.sliding_window is not None:
        longest = min(longest, config.sliding_window)  # attention beyond the window is not implemented
    seq_len = max_seq_len if max_seq_len is not None else longest
    if seq_len < 1 or seq_len > longest:
        reason = "sliding window" if config.sliding_window is not None and seq_len > config.sliding_window else "context"
        raise ValueError(f"--max-seq-len {seq_len} must be between 1 and the model's {reason} length {longest}")
    batch = max_batch_size if max_batch_size is not None else 256
    tokens = max_num_tokens if max_num_tokens is not None else max(8192, batch)
    if batch < 1:
        raise ValueError(f"--max-batch-size {batch} must be at least 1")
    if tokens < batch:
        raise ValueError(f"--max-num-tokens {tokens} must be at least --max-batch-size {batch}")
    return EngineLimits(max_seq_len=seq_len, max_batch_size=batch, max_num_tokens=tokens)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_engine_dir(
    output: Path,
    checkpoint: Checkpoint,
    weights: dict[str, torch.Tensor],
    dtype: str,
    limits: EngineLimits,
    load_format: str,
) -> None:
    """Write the engine directory atomically: into a temporary sibling, then rename.

    Directories and files get the modes `mkdir` and `open` give (0755 and 0644 under umask 022), whatever the
    checkpoint's files have.

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
        tokenizer_dir = staging / "tokenizer"
        tokenizer_dir.mkdir()
        for file in checkpoint.tokenizer_files:
            shutil.copyfile(file, tokenizer_dir / file.name)  # the contents, not the checkpoint's modes
        if checkpoint.chat_template is not None and not (tokenizer_dir / "chat_template.jinja").exists():
            (tokenizer_dir / "chat_template.jinja").write_text(checkpoint.chat_template, encoding="utf-8")
        if checkpoint.generation_config is not None:
            (staging / "generation_config.json").write_text(json.dumps(checkpoint.generation_config, indent=2))
        files = {
            str(path.relative_to(staging)): sha256_of(path) for path in sorted(staging.rglob("*")) if path.is_file()
        }
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "builder_version": __version__,
            "model": checkpoint.model_config.to_dict(),
            "dtype": dtype,
            "limits": asdict(limits),
            "load_format": load_format,
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_manifest(directory: Path, verify: bool = True) -> Manifest:
    """Read and check an engine directory's manifest; with verify, check every file's sha256.

    Raises:
        EngineDirError: naming the file that is missing, altered or from another format version.
    """
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineDirError(f"{directory}: no {MANIFEST}; not an engine directory") from None
    except (OSError, json.JSONDecodeError) as error:
        raise EngineDirError(f"{path}: unreadable manifest ({error})") from None
    if data.get("format") != FORMAT_NAME or data.get("format_version") != FORMAT_VERSION:
        raise EngineDirError(
            f"{path}: engine format {data.get('format')} v{data.get('format_version')} is not"
            f" {FORMAT_NAME} v{FORMAT_VERSION}; rebuild the engine with this inflight-build"
        )
    if verify:
        for name, expected in data["files"].items():
            file = Path(directory) / name
            if not file.exists():
                raise EngineDirError(f"{file}: listed in the manifest but missing; rebuild the engine")
            if sha256_of(file) != expected:
                raise EngineDirError(f"{file}: checksum does not match the manifest (file altered or corrupt); rebuild the engine")
    return Manifest(
        model=ModelConfig.from_dict(data["model"]),
        dtype=data["dtype"],
        limits=EngineLimits(**data["limits"]),
        builder_version=data["builder_version"],
        load_format=data.get("load_format", "auto"),
        files=data["files"],
    )
