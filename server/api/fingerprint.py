"""system_fingerprint: one stable string for the engine a server runs, as OpenAI and vLLM send on chat responses.

    "fp_" + sha256(inflight version, served model name, the engine's manifest.json (an engine directory) or the
                   checkpoint's config.json, tokenizer files, context length, vocabulary size)[:12]

It changes when the model, its build or the server version changes, so that clients can tell replies of different
backends apart (OpenAI: "the backend configuration that the model runs with"); restarts of one build keep it.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any

# The files that say what the engine is, by where they are in an engine directory or a checkpoint directory.
IDENTITY_FILES = ("manifest.json", "config.json", "tokenizer_config.json", "tokenizer.json",
                  "tokenizer/tokenizer_config.json", "tokenizer/tokenizer.json")


def server_version() -> str:
    """The installed inflight package's version ("unknown" when it runs from a source tree it was not installed
    from)."""
    try:
        return metadata.version("inflight")
    except metadata.PackageNotFoundError:
        return "unknown"


def model_directory(tokenizer: Any) -> Path | None:
    """The served model's directory, found from where its tokenizer was loaded (an engine's tokenizer/ sits in it)."""
    name = getattr(tokenizer, "name_or_path", None)
    if not name or not Path(name).is_dir():
        return None
    directory = Path(name)
    return directory.parent if directory.name == "tokenizer" and (directory.parent / "manifest.json").exists() \
        else directory


def system_fingerprint(model_name: str, tokenizer: Any, max_model_len: int, vocab_size: int) -> str:
    """The fingerprint of the served engine.

    Args:
        model_name: the name clients use in "model".
        tokenizer: the engine's tokenizer (its directory leads to the model's files).
        max_model_len: the served context length.
        vocab_size: the model's vocabulary size.

    Returns:
        "fp_" and 12 hex digits.
    """
    digest = hashlib.sha256()
    for part in (server_version(), model_name, str(max_model_len), str(vocab_size)):
        digest.update(part.encode() + b"\0")
    directory = model_directory(tokenizer)
    for name in IDENTITY_FILES:
        path = None if directory is None else directory / name
        if path is not None and path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return f"fp_{digest.hexdigest()[:12]}"
