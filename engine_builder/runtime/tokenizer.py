"""The tokenizer and chat template a model ships: transformers' tokenizer from a directory of tokenizer files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine_builder.engine_dir import CHAT_TEMPLATE, TOKENIZER_DIR


def load_tokenizer_files(directory: Path, chat_template: str | None) -> Any | None:
    """The transformers tokenizer of `directory`'s tokenizer files.

    Args:
        directory: a folder with tokenizer.json / tokenizer_config.json / ... (checkpoint or engine dir's tokenizer/).
        chat_template: given to the tokenizer when its files define none.

    Returns:
        The tokenizer, or None when the directory has no tokenizer files.
    """
    if not any(directory.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    return tokenizer


def load_engine_dir_tokenizer(engine_dir: Path) -> Any | None:
    """The tokenizer an engine directory ships (its tokenizer/ folder, with the chat template the builder saved).

    Args:
        engine_dir: the engine directory.

    Returns:
        The tokenizer, or None when the engine ships none.
    """
    tokenizer_dir = Path(engine_dir) / TOKENIZER_DIR
    template_file = tokenizer_dir / CHAT_TEMPLATE
    return load_tokenizer_files(tokenizer_dir, template_file.read_text() if template_file.exists() else None)
