"""The engine directory format, shared by the builder (engine_writer.py writes it) and the loader (reads it).

    ENGINE_DIR/
      manifest.json            format, builder version, model dims, dtype, limits, backend, quantization,
                               sha256 of every file
      weights.safetensors      engine-named, fused, cast weights
      generation_config.json   copied from the checkpoint, when present
      tokenizer/               tokenizer files (+ chat_template.jinja)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine_builder.model_config import ModelConfig

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_DIR = "tokenizer"
CHAT_TEMPLATE = "chat_template.jinja"  # inside TOKENIZER_DIR
FORMAT_NAME = "inflight-engine"
FORMAT_VERSION = 2  # what this builder writes
# Versions this runtime reads. v1 (before `backend` and `quantization`) reads as backend "torch", unquantized;
# v2 is a new version because a v1 reader would run any v2 engine with its torch code, whatever it declares.
READABLE_FORMAT_VERSIONS = (1, 2)
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
    """What manifest.json declares about an engine directory."""

    model: ModelConfig
    dtype: str  # one of DTYPES
    limits: EngineLimits
    builder_version: str
    load_format: str  # "auto" (real weights) or "dummy" (random)
    backend: str  # which ModelBackend runs it (engine_builder/runtime/backend.py BACKENDS), e.g. "torch"
    quantization: str | None  # how the weights are quantized; None: not quantized (written as null)
    files: dict[str, str]  # relative path -> sha256
    quantization_config: dict[str, Any] | None = None  # the scheme's details (quantize.Quantization), when quantized

    def to_dict(self) -> dict[str, Any]:
        """The manifest.json object, in this format version."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "builder_version": self.builder_version,
            "model": self.model.to_dict(),
            "dtype": self.dtype,
            "limits": asdict(self.limits),
            "load_format": self.load_format,
            "backend": self.backend,
            "quantization": self.quantization,
            "quantization_config": self.quantization_config,
            "files": self.files,
        }


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
        reason = (
            "sliding window" if config.sliding_window is not None and seq_len > config.sliding_window else "context"
        )
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


def read_manifest(directory: Path, verify: bool = True) -> Manifest:
    """Read and check an engine directory's manifest; with verify, check every file's sha256.

    Args:
        directory: the engine directory.
        verify: check the sha256 of every file the manifest lists.

    Returns:
        The Manifest; a v1 manifest (no `backend`, `quantization`) reads as backend "torch", not quantized.

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
    version = data.get("format_version")
    if data.get("format") != FORMAT_NAME or version not in READABLE_FORMAT_VERSIONS:
        readable = "/".join(f"v{v}" for v in READABLE_FORMAT_VERSIONS)
        raise EngineDirError(
            f"{path}: engine format {data.get('format')} v{version} is not"
            f" {FORMAT_NAME} {readable}; rebuild the engine with this inflight-build"
        )
    if verify:
        for name, expected in data["files"].items():
            file = Path(directory) / name
            if not file.exists():
                raise EngineDirError(f"{file}: listed in the manifest but missing; rebuild the engine")
            if sha256_of(file) != expected:
                raise EngineDirError(
                    f"{file}: checksum does not match the manifest (file altered or corrupt); rebuild the engine"
                )
    return Manifest(
        model=ModelConfig.from_dict(data["model"]),
        dtype=data["dtype"],
        limits=EngineLimits(**data["limits"]),
        builder_version=data["builder_version"],
        load_format=data.get("load_format", "auto"),
        backend=_declared(data, "backend", path) if version >= 2 else "torch",
        quantization=_quantization(_declared(data, "quantization", path)) if version >= 2 else None,
        files=data["files"],
        quantization_config=data.get("quantization_config"),
    )


def _declared(data: dict[str, Any], key: str, path: Path) -> Any:
    """A field every manifest of this version has (a string, or null for quantization)."""
    if key not in data:
        raise EngineDirError(f"{path}: manifest lacks {key!r}; rebuild the engine with this inflight-build")
    value = data[key]
    if not isinstance(value, str) and not (key == "quantization" and value is None):
        raise EngineDirError(f"{path}: manifest {key!r} must be a string, got {value!r}")
    return value


def _quantization(value: str | None) -> str | None:
    """'none' and null both mean unquantized weights."""
    return None if value in (None, "none") else value
