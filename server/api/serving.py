"""What completions and chat completions share: model check, limits, sampling params, starting the choices
(choices.py merges their outputs)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request

from server.api import decoding
from server.api.choices import ChoiceOutput, beam_choices, best_of_choices, merge_choices
from server.api.errors import (
    APIError,
    ClientDisconnected,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    api_error_of,
    internal_error,
)
from server.api.protocol import (
    MAX_STOP_STRING_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from server.api.user_text import PromptEncoder
from server.engine.protocol import EngineClient
from server.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_CHOICES_PER_REQUEST = 128  # engine requests one API request may start: prompts x n
MIN_TEMPERATURE = 0.01  # lower temperatures (but 0, greedy) are raised to it: logits / 1e-300 are inf


@dataclass(slots=True)
class PreparedPrompt:
    """A tokenized prompt checked against the model's limits."""

    token_ids: list[int]
    text: str  # the prompt as text (decoded when it came as token ids); used by echo
    max_tokens: int  # new tokens allowed for this prompt


def stream_error(error: Exception) -> APIError:
    """An exception raised while streaming, as the APIError sent in the stream's error event."""
    known = api_error_of(error)
    if known is not None:
        return known
    return internal_error("the request failed while streaming", f"{type(error).__name__}: {error}")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """`stop` as a list; empty strings are an error (they would stop before the first character), and so is one
    string longer than a list's strings may be (MAX_STOP_STRING_CHARS)."""
    if isinstance(stop, str) and len(stop) > MAX_STOP_STRING_CHARS:
        raise InvalidRequestError(f"'stop' is {len(stop)} characters long; a stop string may have at most "
                                  f"{MAX_STOP_STRING_CHARS}", "stop")
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not string for string in strings):
        raise InvalidRequestError("'stop' must not contain empty strings", "stop")
    return strings


async def wait_for_disconnect(raw_request: Request) -> None:
    """Return once the client has closed the connection."""
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(work: Awaitable[T], raw_request: Request) -> T:
    """Await `work`, cancelling it if the client disconnects first (raises ClientDisconnected then).

    A disconnect is one INFO line: the cancelled work is awaited (its engine requests are aborted by then), and
    whatever it ended with is consumed here, so that nothing else logs it.
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(raw_request))
    try:
        done, _ = await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.wait({work_task})  # cancel() only asks: the task ends at its next await
    if work_task in done:
        return work_task.result()
    if not work_task.cancelled() and work_task.exception() is not None:  # consumed: a client gone is the news
        logger.debug("request to %s ended after its client left: %r", raw_request.url.path, work_task.exception())
    logger.info("client disconnected before the response of %s; request cancelled", raw_request.url.path)
    raise ClientDisconnected()


class OpenAIServing:
    """The model behind the API: its name, tokenizer and limits, and how requests reach the engine."""

    def __init__(self, engine: EngineClient, model_name: str, vocab_size: int, special_tokens_in_input: bool = False,
                 default_max_tokens: int | None = None) -> None:
        """
        Args:
            engine: the engine client (EngineCoreClient, or a test stand-in).
            model_name: the name clients use in "model".
            vocab_size: the model's vocabulary size (token ids must be below it).
            special_tokens_in_input: tokenize special-token text in user text as control tokens (unsafe: users can
                forge turns); by default it is plain text.
            default_max_tokens: max_tokens of a request that sends none (the model's generation_config
                max_new_tokens), capped by the context; None: up to the context.
        """
        self.default_max_tokens = default_max_tokens
        self.engine = engine
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.special_tokens_in_input = special_tokens_in_input
        self.draining = False  # set when a shutdown began: new requests get 503, running ones finish
        self._prompt_encoder: PromptEncoder | None = None

    @property
    def is_ready(self) -> bool:
        """True when new requests are accepted: the engine runs and no shutdown is draining."""
        return self.engine.is_running and not self.draining

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def prompt_encoder(self) -> PromptEncoder:
        """How user text becomes prompt tokens (built once the engine has its tokenizer)."""
        if self._prompt_encoder is None or self._prompt_encoder.tokenizer is not self.tokenizer:
            self._prompt_encoder = PromptEncoder(self.tokenizer, self.special_tokens_in_input)
        return self._prompt_encoder

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.max_model_len)])

    def check_model(self, name: str | None) -> None:
        """Raise ModelNotFoundError (404) unless `name` is the served model (or not given)."""
        if name is not None and name != self.model_name:
            raise ModelNotFoundError(
                f"The model '{name}' does not exist; this server serves '{self.model_name}'", "model"
            )

    def check_ready(self) -> None:
        """Raise EngineUnavailableError (503) unless new requests can be served now."""
        if self.draining:
            raise EngineUnavailableError("the server is shutting down and takes no new requests; retry on another "
                                         "replica", reason="draining")
        if not self.engine.is_running:
            raise EngineUnavailableError("the engine is not running; try again once /health returns 200")
        if self.tokenizer is None:
            raise InvalidRequestError("the served model has no tokenizer, so it cannot take text")

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        """Raise a 400 naming `param` unless every id is in the vocabulary."""
        for token_id in token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequestError(
                    f"'{param}' holds token id {token_id}, outside the vocabulary [0, {self.vocab_size})", param
                )

    def prepare_prompt(self, token_ids: list[int], text: str, max_tokens: int | None, param: str,
                       max_tokens_param: str = "max_tokens", num_sequences: int = 1) -> PreparedPrompt:
        """Check a tokenized prompt against the context length and resolve max_tokens.

        Args:
            token_ids: the prompt's tokens.
            text: the prompt as text.
            max_tokens: what the client asked for; None means up to the context length.
            param: the request parameter holding the prompt ("prompt" or "messages").
            max_tokens_param: the parameter holding max_tokens, for the error message.
            num_sequences: sequences the request runs at once (its beam width with beam search): a max_tokens
                the client left out is capped so that they all fit the KV cache.

        Returns:
            The PreparedPrompt. Raises InvalidRequestError (400) when it cannot fit.
        """
        if not token_ids:
            raise InvalidRequestError(f"'{param}' is empty: the prompt needs at least one token", param)
        self.check_token_ids(token_ids, param)
        num_prompt = len(token_ids)
        if num_prompt >= self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{num_prompt} tokens, leaving no room for a completion; shorten '{param}'", param)
        if max_tokens is None:
            # Up to the context length, or what fits the KV cache with num_sequences of them (the last sampled
            # token is never fed back, so it needs no KV slot).
            fits = (self.engine.num_kv_blocks // num_sequences) * self.engine.block_size + 1 - num_prompt
            max_tokens = min(self.max_model_len - num_prompt, fits, self.default_max_tokens or fits)
            if max_tokens < 1:
                beams = f" for each of {num_sequences} beams" if num_sequences > 1 else ""
                raise InvalidRequestError(
                    f"the prompt ({num_prompt} tokens){beams} does not fit the server's KV cache "
                    f"({self.engine.num_kv_blocks * self.engine.block_size} tokens); shorten '{param}'", param)
        elif num_prompt + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for the completion). "
                f"Please reduce the prompt or '{max_tokens_param}'", max_tokens_param)
        return PreparedPrompt(token_ids=token_ids, text=text, max_tokens=max_tokens)

    def sampling_params(self, request: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                        choice: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's SamplingParams for one choice of a request.

        Args:
            request: the validated request (both kinds share the sampling fields).
            max_tokens: the resolved max_tokens of the choice's prompt.
            choice: the choice number within its prompt (0..n-1); seeded requests use seed + choice.
            logprobs: top alternatives per token, or None for no logprobs.
            prompt_logprobs: top alternatives per prompt token, or None to leave the prompt unscored.

        Returns:
            SamplingParams. Raises InvalidRequestError naming a parameter that cannot work.
        """
        stop_token_ids = list(request.stop_token_ids or [])
        self.check_token_ids(stop_token_ids, "stop_token_ids")
        if request.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"'min_tokens' ({request.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
        if request.stream_options is not None and not request.stream:
            raise InvalidRequestError("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if request.response_format is not None and request.response_format.type != "text":
            for name in ("stop", "stop_token_ids"):
                if getattr(request, name):
                    raise InvalidRequestError(
                        f"'{name}' cannot be combined with 'response_format': the grammar decides where the output "
                        "ends, and cutting it earlier would return JSON that does not parse", name)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if request.temperature == 0 else max(request.temperature, MIN_TEMPERATURE),
            top_p=request.top_p,
            top_k=request.top_k,
            min_p=request.min_p,
            seed=None if request.seed is None else request.seed + choice,
            stop=stop_strings(request.stop),
            stop_token_ids=stop_token_ids,
            ignore_eos=request.ignore_eos,
            min_tokens=request.min_tokens,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            cache_salt=request.cache_salt,
            logit_bias=decoding.logit_bias(request.logit_bias, self.vocab_size),
            beam_search=decoding.beam_search(request),
            structured_output=decoding.structured_output(request.response_format),
        )

    def generate(self, request_id: str, prompts: list[PreparedPrompt],
                 params_for: Callable[[PreparedPrompt, int], SamplingParams], n: int, best_of: int | None = None,
                 ) -> AsyncGenerator[ChoiceOutput, None]:
        """Start one engine request per choice (per prompt with beam search) and merge their outputs.

        Args:
            request_id: the API request id; engine requests are f"{request_id}-{index}".
            prompts: the prepared prompts.
            params_for: (prompt, choice number) -> SamplingParams.
            n: choices per prompt.
            best_of: sampled candidates per prompt, of which the n most likely per token are returned (their
                params must ask for logprobs); None (or n) returns every candidate.

        Returns:
            The merged ChoiceOutput stream (see merge_choices); with best_of > n its outputs come at the end,
            one finished output per returned choice.
        """
        num_candidates = max(n, best_of or n)
        if len(prompts) * num_candidates > MAX_CHOICES_PER_REQUEST:
            name = "best_of" if num_candidates > n else "n"
            raise InvalidRequestError(
                f"the request asks for {len(prompts)} prompt(s) x {name}={num_candidates} = "
                f"{len(prompts) * num_candidates} completions; at most {MAX_CHOICES_PER_REQUEST} are allowed per "
                f"request: send fewer prompts or a smaller '{name}'", name)
        if params_for(prompts[0], 0).beam_search is not None:  # one request per prompt: its beams are the choices
            streams = [self.engine.generate(f"{request_id}-{index}", prompt.token_ids, params_for(prompt, 0))
                       for index, prompt in enumerate(prompts)]
            return beam_choices(merge_choices(streams), n)
        streams = []
        for prompt_index, prompt in enumerate(prompts):
            for choice in range(num_candidates):
                index = prompt_index * num_candidates + choice
                params = params_for(prompt, choice)
                streams.append(self.engine.generate(f"{request_id}-{index}", prompt.token_ids, params))
        if num_candidates > n:
            return best_of_choices(merge_choices(streams), n, num_candidates)
        return merge_choices(streams)
