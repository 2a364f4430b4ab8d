"""Read a Hugging Face checkpoint directory: config, (sharded) safetensors, tokenizer, generation config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from engine_builder.model_config import ModelConfig, model_config_from_hf
from engine_builder.models.registry import model_class

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint cannot be used; the message says which file or tensor and why."""


@dataclass(slots=True)
class Checkpoint:
    """A validated checkpoint directory; tensors are read lazily from `tensor_files`."""

    path: Path
    hf_config: dict[str, Any]  # config.json as parsed
    model_config: ModelConfig
    tensor_files: dict[str, Path]  # tensor name -> safetensors file holding it (empty for dummy loads)
    tokenizer_files: list[Path]  # the tokenizer files present
    generation_config: dict[str, Any] | None  # generation_config.json, if any
    chat_template: str | None  # from chat_template.jinja/json or tokenizer_config.json


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read {what}: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{directory}: weight file {missing[0]} named in {INDEX_FILE} is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{directory}: no *.safetensors weight files (only safetensors checkpoints are supported)"
        )
    return files


def _index_tensors(files: list[Path]) -> dict[str, Path]:
    """Map every tensor to its file, checking that each file's data is complete."""
    tensor_files: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                names = list(handle.keys())
        except Exception as error:  # safetensors raises its own error types for malformed headers
            raise CheckpointError(f"{file}: unreadable safetensors file ({error})") from None
        _check_complete(file)
        for name in names:
            tensor_files[name] = file
    return tensor_files


def _check_complete(file: Path) -> None:
    """A truncated file still has a readable header; compare its data offsets with the file size."""
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    actual = file.stat().st_size - 8 - header_len
    if actual < data_end:
        raise CheckpointError(f"{file}: truncated: holds {actual} bytes of tensor data, header promises {data_end}")


def _chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    as_json = directory / "chat_template.json"
    if as_json.exists():
        return _read_json(as_json, "chat template").get("chat_template")
    template = tokenizer_config.get("chat_template")
    return template if isinstance(template, str) else None


def read_checkpoint(directory: str | Path, with_weights: bool = True) -> Checkpoint:
    """Validate and index a checkpoint directory.

    Args:
        directory: folder with config.json, *.safetensors and tokenizer files.
        with_weights: False for `--load-format dummy`: only config.json and the tokenizer are read.

    Returns:
        The Checkpoint. Raises CheckpointError (a ValueError) naming the problem.
    """
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    hf_config = _read_json(path / "config.json", "config.json")
    try:
        model_config = model_config_from_hf(hf_config)
        model_class(model_config.architecture)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path / 'config.json'}: {error}") from None
    tensor_files = _index_tensors(_weight_files(path)) if with_weights else {}
    tokenizer_files = [path / name for name in TOKENIZER_FILES if (path / name).exists()]
    tokenizer_config_path = path / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_path, "tokenizer config") if tokenizer_config_path.exists() else {}
    generation_path = path / "generation_config.json"
    generation_config = _read_json(generation_path, "generation config") if generation_path.exists() else None
    return Checkpoint(
        path=path,
        hf_config=hf_config,
        model_config=model_config,
        tensor_files=tensor_files,
        tokenizer_files=tokenizer_files,
        generation_config=generation_config,
        chat_template=_chat_template(path, tokenizer_config),
    )
