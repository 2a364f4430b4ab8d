"""The model's own sampling defaults: a request that omits a sampling field gets the checkpoint's value for it.

    generation_config.json (in the engine directory, copied there from the checkpoint by inflight-build, or in the
    Hugging Face checkpoint itself)
        {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1, "max_new_tokens": 128, ...}
      ─▶ GenerationDefaults.load(model_dir, "auto")       once, at start-up (logged)
      ─▶ routes.py: request = defaults.apply(request)       per request, before serving sees it

As vLLM's `--generation-config auto` (its default): the fields are temperature, top_p, top_k, min_p and
repetition_penalty; a field counts as omitted when the client did not send it (pydantic's `model_fields_set`), so an
explicit `"temperature": 1.0` stays 1.0. A beam search request (use_beam_search) gets only the temperature: beam
search refuses the others. `--generation-config none` keeps the OpenAI defaults (vLLM calls it "vllm").

max_new_tokens becomes the default max_tokens of requests that send none (chat; completions default to 16 as
OpenAI's do), capped by the context left after the prompt as vLLM does: `OpenAIServing.prepare_prompt` applies it,
since only serving knows the prompt's length.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from server.api.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)
GENERATION_CONFIG = "generation_config.json"  # the file name (engine_builder/engine_dir.py writes it there too)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # vLLM's, in its order
BEAM_SEARCH_FIELDS = ("temperature",)  # what beam search takes of them (as vLLM's to_beam_search_params)
Request = TypeVar("Request", CompletionRequest, ChatCompletionRequest)


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """Sampling values for the fields a request omits (empty: the requests' own defaults stay)."""

    values: dict[str, float | int] = field(default_factory=dict)  # request field -> the model's value
    max_new_tokens: int | None = None  # generation_config.json's, for the log and for serving's default max_tokens
    source: Path | None = None  # the file they came from

    @classmethod
    def load(cls, model_dir: Path, mode: str) -> GenerationDefaults:
        """Read the defaults of the model in `model_dir`.

        Args:
            model_dir: the engine directory or Hugging Face checkpoint directory being served.
            mode: --generation-config: "auto" reads model_dir/generation_config.json; "none" reads nothing.

        Returns:
            The defaults (none when the file is absent or names no sampling field). A value that a request could not
            hold (temperature 3, top_k 0, a string) is left out with a warning naming it. Raises ValueError for a
            file that is not a JSON object, or an unknown mode.
        """
        if mode == "none":
            return cls()
        if mode != "auto":
            raise ValueError(f"generation_config must be 'auto' or 'none'; got {mode!r}")
        path = model_dir / GENERATION_CONFIG
        if not path.is_file():
            return cls()
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {path}: {error} (or serve with --generation-config none)") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a JSON object (or serve with --generation-config none)")
        given = {name: config[name] for name in SAMPLING_FIELDS if config.get(name) is not None}
        if given.get("top_k") == 0:  # Hugging Face's "no top-k": the requests' own default (None) already says so
            del given["top_k"]
        values = {name: value for name, value in given.items() if _valid(name, value, path)}
        max_new_tokens = config.get("max_new_tokens")
        if not (isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens >= 1):
            max_new_tokens = None
        return cls(values=values, max_new_tokens=max_new_tokens, source=path)

    def apply(self, request: Request) -> Request:
        """`request` with the model's value in every sampling field it did not send.

        Args:
            request: a parsed /v1/completions or /v1/chat/completions request.

        Returns:
            The same request when nothing applies, else a copy with those fields set.
        """
        names = BEAM_SEARCH_FIELDS if request.use_beam_search else SAMPLING_FIELDS
        updates = {name: value for name, value in self.values.items()
                   if name in names and name not in request.model_fields_set}
        return request.model_copy(update=updates) if updates else request

    def describe(self) -> str:
        """One line for the start-up log."""
        if not self.values:
            return "requests that omit sampling fields get the OpenAI defaults"
        shown = ", ".join(f"{name}={value}" for name, value in self.values.items())
        if self.max_new_tokens is not None:
            shown += f", max_tokens={self.max_new_tokens} (from max_new_tokens)"
        return (f"requests that omit them get the model's sampling defaults from {self.source}: {shown} "
                "(--generation-config none keeps the OpenAI defaults)")


def _valid(name: str, value: Any, path: Path) -> bool:
    """Whether `value` is one a request's `name` field could hold (both request models take the same ranges)."""
    try:
        CompletionRequest.model_validate({"model": "any", "prompt": "", name: value})
    except ValidationError as error:
        logger.warning("%s: %s=%r is not a value requests take (%s); it is not applied", path, name, value,
                       error.errors()[0]["msg"])
        return False
    return True

