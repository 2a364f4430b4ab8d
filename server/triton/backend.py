"""The `inflight` model of a Triton Inference Server model repository (Python backend, decoupled).

Triton loads deploy/triton/model.py, which is this TritonPythonModel. It runs the same engine client as
`inflight-serve` (its core in a thread of the Triton model process), so requests from Triton are batched in flight
with each other by the one scheduler:

    tritonserver ─ execute(requests) ─▶ one task per request on this model's event loop ─▶ EngineCoreClient.generate
                 ◀── response sender: one response per token (stream), or one with the whole text; then FINAL ──┘

Inputs are named as TensorRT-LLM's Triton models name them: text_input, max_tokens, stream, temperature, top_k,
top_p, seed, stop_words, end_id, beam_width (and min_tokens, presence_penalty, frequency_penalty,
repetition_penalty); outputs text_output and output_ids (the new tokens). A cancelled request (the client went away,
or cancelled its gRPC stream) is aborted in the engine and its KV blocks are freed. The model config's parameters
set the engine (engine_path, device, max_num_seqs, num_kv_blocks, kv_cache_memory_fraction, max_model_len,
metrics_port: Inflight's Prometheus metrics, served on that port when given).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from server.engine.errors import InvalidRequest
from server.engine.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)

CANCEL_CHECK_SECONDS = 0.05  # how often a running request asks Triton whether its client cancelled it
STREAM_UNSUPPORTED_WITH_BEAMS = "beam_width > 1 cannot stream: the best beam is known only at the end"


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """The model config's `parameters` as name -> string."""
    return {name: value["string_value"] for name, value in model_config.get("parameters", {}).items()}


def sampling_params_of(inputs: dict[str, Any], max_model_len: int, num_prompt_tokens: int) -> SamplingParams:
    """SamplingParams from a request's inputs (name -> first element, or the list for stop_words).

    Raises InvalidRequest naming the input that cannot work.
    """
    beam_width = int(inputs.get("beam_width", 1))
    if beam_width < 1:
        raise InvalidRequest(f"beam_width {beam_width} must be at least 1", "beam_width")
    max_tokens = int(inputs.get("max_tokens", max(1, min(16, max_model_len - num_prompt_tokens))))
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(inputs.get("temperature", 1.0)),
        top_p=float(inputs.get("top_p", 1.0)),
        top_k=int(inputs["top_k"]) if int(inputs.get("top_k", 0)) > 0 else None,  # 0: TensorRT-LLM's "all"
        seed=int(inputs["seed"]) if "seed" in inputs else None,
        stop=[word for word in inputs.get("stop_words", []) if word],
        stop_token_ids=[int(inputs["end_id"])] if "end_id" in inputs else [],
        min_tokens=int(inputs.get("min_tokens", 0)),
        presence_penalty=float(inputs.get("presence_penalty", 0.0)),
        frequency_penalty=float(inputs.get("frequency_penalty", 0.0)),
        repetition_penalty=float(inputs.get("repetition_penalty", 1.0)),
        beam_search=BeamSearchParams(num_beams=beam_width) if beam_width > 1 else None,
    )
    if params.beam_search is not None:
        params.temperature = 0.0
    params.validate()
    return params


class TritonPythonModel:
    """Triton's Python backend interface: initialize, execute, finalize."""

    def initialize(self, args: dict[str, Any]) -> None:
        """Start the engine (its core in a thread of this process) and this model's event loop."""
        import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports]  (Triton's)

        from server.api.metrics import Metrics
        from server.engine.client.core_client import EngineCoreClient
        from server.engine.client.transports import ThreadTransport
        from server.engine.core_args import CoreArgs, EngineLoadArgs
        from server.engine.engine_config import EngineConfig
        from server.log import configure_logging

        self.pb_utils = pb_utils
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))
        parameters = model_parameters(json.loads(args["model_config"]))
        configure_logging(parameters.get("log_level", "info"))
        if "engine_path" not in parameters:
            raise ValueError("the model config needs parameter engine_path (an engine or checkpoint directory)")
        max_num_seqs = int(parameters.get("max_num_seqs", 64))
        load = EngineLoadArgs(model=Path(parameters["engine_path"]), device=parameters.get("device", "auto"),
                              max_seq_len=int(parameters["max_model_len"]) if "max_model_len" in parameters else None,
                              max_batch_size=max_num_seqs)
        num_kv_blocks = parameters.get("num_kv_blocks")
        config = EngineConfig(max_num_seqs=max_num_seqs, num_kv_blocks=int(num_kv_blocks) if num_kv_blocks else None,
                              kv_cache_memory_fraction=float(parameters.get("kv_cache_memory_fraction", 0.9)))
        core_args = CoreArgs(load=load, config=config)
        self.metrics = Metrics()
        if parameters.get("metrics_port"):
            from prometheus_client import start_http_server

            start_http_server(int(parameters["metrics_port"]), registry=self.metrics.registry)
        self.client = EngineCoreClient(core_args, self.metrics, transport=ThreadTransport(core_args))
        self.client.launch()
        from server.api.user_text import PromptEncoder

        self.prompt_encoder = PromptEncoder(self.client.tokenizer, special_tokens_in_input=False)  # as inflight-serve
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="inflight-triton-loop", daemon=True)
        self._loop_thread.start()
        asyncio.run_coroutine_threadsafe(self.client.start(), self.loop).result()
        logger.info("inflight model ready: %s on %s, %d KV blocks", parameters["engine_path"], self.client.device,
                    self.client.num_kv_blocks)

    def execute(self, requests: list[Any]) -> None:
        """Start every request; each answers through its own response sender (decoupled), so this returns now.

        The inputs are read here: their memory belongs to Triton only until execute returns.
        """
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = self._inputs(request)
            except Exception as error:
                self._fail(sender, f"unreadable inputs: {type(error).__name__}: {error}")
                continue
            asyncio.run_coroutine_threadsafe(self._serve(inputs, sender), self.loop)

    def finalize(self) -> None:
        asyncio.run_coroutine_threadsafe(self.client.shutdown(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def _inputs(self, request: Any) -> dict[str, Any]:
        """The request's inputs present: name -> Python value (strings decoded; stop_words as a list)."""
        values: dict[str, Any] = {}
        for name in ("text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "seed", "stop_words",
                     "end_id", "beam_width", "min_tokens", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            tensor = self.pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                continue
            array = tensor.as_numpy().reshape(-1)
            items = [item.decode() if isinstance(item, bytes) else item.item() for item in array]
            values[name] = items if name == "stop_words" else items[0]
        return values

    def _response(self, text: str, token_ids: list[int]) -> Any:
        pb = self.pb_utils
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("text_output", np.array([text.encode()], dtype=np.object_)),
            pb.Tensor("output_ids", np.array(token_ids, dtype=np.int32)),
        ])

    def _per_token(self, generated: list[int], num_new: int, text: str) -> list[tuple[str, list[int]]]:
        """One (text, [token id]) per token of the last `num_new` of `generated` (an output that carries several:
        its stream fell behind and was merged), so that a stream answers once per token as TensorRT-LLM's does.
        Each token's text is its share of the decoded text; where decoding piecewise does not give the engine's
        text `text` back (a stop string held back, say), the earlier tokens carry no text and the last one all."""
        start = len(generated) - num_new
        token_ids = generated[start:]
        if num_new <= 1:
            return [(text, token_ids)]
        context, tokenizer = generated[max(0, start - 6):start], self.client.tokenizer
        assert tokenizer is not None, "the engine client is started"
        decoded = [tokenizer.decode(context + token_ids[:i]) for i in range(len(token_ids) + 1)]
        pairs = list(itertools.pairwise(decoded))
        pieces = [after[len(before):] for before, after in pairs]
        if not all(after.startswith(before) for before, after in pairs) or "".join(pieces) != text:
            pieces = [""] * (len(token_ids) - 1) + [text]
        return [(piece, [token_id]) for piece, token_id in zip(pieces, token_ids)]

    def _fail(self, sender: Any, message: str) -> None:
        pb = self.pb_utils
        sender.send(pb.InferenceResponse(error=pb.TritonError(message)), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    async def _serve(self, inputs: dict[str, Any], sender: Any) -> None:
        """Run one request to its end (or its cancellation) and answer it."""
        final = self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            if "text_input" not in inputs:
                raise InvalidRequest("the input text_input is required", "text_input")
            stream = bool(inputs.get("stream", False))
            token_ids = self.prompt_encoder.encode_prompt(inputs["text_input"])
            if not token_ids:
                raise InvalidRequest("text_input is empty: the prompt needs at least one token", "text_input")
            params = sampling_params_of(inputs, self.client.max_model_len, len(token_ids))
            if stream and params.beam_search is not None:
                raise InvalidRequest(STREAM_UNSUPPORTED_WITH_BEAMS, "beam_width")
            if stream and not self.decoupled:
                raise InvalidRequest("stream needs the model's decoupled transaction policy", "stream")
            outputs = self.client.generate(f"triton-{uuid.uuid4().hex}", token_ids, params)
            texts: list[str] = []
            new_ids: list[int] = []
            next_cancel_check = 0.0
            try:
                async for output in outputs:
                    # is_cancelled asks the Triton server process (a round trip): at most every CANCEL_CHECK_SECONDS
                    if (now := time.monotonic()) >= next_cancel_check:
                        next_cancel_check = now + CANCEL_CHECK_SECONDS
                        if sender.is_cancelled():
                            logger.info("a Triton request was cancelled; aborting it in the engine")
                            break  # closing the stream (below) aborts the request and frees its KV blocks
                    if output.beams:
                        best = output.beams[0]
                        texts, new_ids = [best.text], list(best.token_ids)
                    else:
                        texts.append(output.new_text)
                        new_ids.extend(output.new_token_ids)
                    if stream and (output.new_text or output.new_token_ids):
                        for text, ids in self._per_token(new_ids, len(output.new_token_ids), output.new_text):
                            sender.send(self._response(text, ids))
            finally:
                await outputs.aclose()
            if sender.is_cancelled():  # Triton holds the request (and an unload) until its final response
                pb = self.pb_utils
                sender.send(pb.InferenceResponse(error=pb.TritonError("the request was cancelled",
                                                                      pb.TritonError.CANCELLED)), flags=final)
                return
            if stream:
                sender.send(flags=final)
            else:
                sender.send(self._response("".join(texts), new_ids), flags=final)
        except InvalidRequest as error:
            self._fail(sender, str(error))
        except Exception as error:  # the engine failed the request: it ends with an error, the others go on
            logger.exception("a Triton request failed")
            self._fail(sender, f"{type(error).__name__}: {error}")
