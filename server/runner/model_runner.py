"""One step on the device: step plan -> ForwardBatch -> backend.forward -> sampler -> host.

The runner owns the KV cache tensors (one K and one V pool per layer, allocated by the ModelBackend with the
block count the engine decided) and its own state of every request it runs (request_state.py), which each
plan updates (step_plan.py). It copies results to the host once per step.

Steps are launched and collected in order: `launch` queues a step's GPU work and the copy of its results
without waiting; `collect` waits for the oldest launched step. A step launched before the previous one was
collected (async scheduling) is fed that step's sampled tokens on the device, where it has placeholders.

Under tensor parallelism every rank runs a runner over its shard and the same plans; the model returns the same
logits on every rank, rank 0 alone samples and broadcasts the tokens, which the other ranks record (and feed).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from engine_builder.forward_batch import LayerKVCache, build_forward_batch
from engine_builder.runtime.backend import ModelBackend
from server.engine.outputs import TokenLogprob
from server.engine.step_plan import PLACEHOLDER, BeamCandidates, BlockCopy, KVTransfer, RunnerOutput, StepPlan
from server.runner.prompt_logprobs import PromptRows, logits_layout, prompt_chunks, score_prompt_tokens
from server.runner.request_state import RequestState, apply_plan
from server.runner.sampler import Sampler, SamplerOutput, SamplingTensors
from server.runner.tensor_parallel import TensorParallelGroup

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LaunchedStep:
    """A step whose GPU work is queued and whose results are being copied to the host."""

    requests: list[RequestState]  # the requests sampled, in row order
    result: SamplerOutput | None  # on the device; None when no request sampled
    host: list[torch.Tensor | None] = field(default_factory=list)  # result's tensors, host copies in flight
    copied: Any = None  # a CUDA event recorded after the copies (None: they are done)
    row_of: dict[str, int] = field(default_factory=dict)  # request id -> its row in result.sampled_token_ids
    prompt: PromptRows | None = None  # the prompt tokens it scored (prompt logprobs); None when none
    prompt_host: list[torch.Tensor] = field(default_factory=list)  # their scores, host copies in flight


class ModelRunner:
    """Runs scheduled steps of one ModelBackend over its paged KV cache."""

    def __init__(
        self, backend: ModelBackend, num_kv_blocks: int, block_size: int, eos_token_ids: list[int],
        cuda_graphs: bool = False, max_num_seqs: int | None = None, group: TensorParallelGroup | None = None,
        logprobs_mode: str = "raw_logprobs", num_host_blocks: int = 0,
    ):
        """Allocate the KV cache and, when asked and possible, capture decode CUDA graphs over it.

        Args:
            backend: the loaded engine's backend (engine_builder.loader.Engine.backend).
            num_kv_blocks: blocks in the pool.
            block_size: tokens per block.
            eos_token_ids: the model's end-of-sequence ids (Engine.eos_token_ids).
            cuda_graphs: capture decode graphs (CUDA backends only; others ignore it).
            max_num_seqs: the largest decode batch a graph is captured for (None: the backend's max_batch_size).
            group: the tensor-parallel group this runner is a rank of (None: it runs the whole model).
            logprobs_mode: what returned logprobs of generated tokens are (sampler.py): "raw_logprobs", the model's,
                or "processed_logprobs", after penalties and temperature. Prompt logprobs are always the model's.
            num_host_blocks: blocks of the host-memory KV tier (server/engine/core/host_tier.py; pinned on CUDA).
        """
        self.backend = backend
        self.group = group
        self.num_kv_blocks = num_kv_blocks
        self.device = torch.device(backend.device)
        self.block_size = block_size
        self.vocab_size = backend.config.vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.kv_caches = backend.allocate_kv_cache(num_kv_blocks, block_size)
        self.host_kv_caches = [  # the same layout as the device pool, in (pinned) host memory
            LayerKVCache(key=torch.empty((num_host_blocks, *layer.key.shape[1:]), dtype=layer.key.dtype,
                                         pin_memory=self.device.type == "cuda"),
                         value=torch.empty((num_host_blocks, *layer.value.shape[1:]), dtype=layer.value.dtype,
                                           pin_memory=self.device.type == "cuda"))
            for layer in self.kv_caches
        ] if num_host_blocks else []
        self.sampler = Sampler(logprobs_mode)
        self.requests: dict[str, RequestState] = {}  # every request it has seen and not been told is finished
        self._in_flight: deque[LaunchedStep] = deque()  # launched, not collected yet (oldest first)
        self.uses_cuda_graphs = False  # decode steps replay captured graphs
        if cuda_graphs and self.device.type == "cuda":
            self.uses_cuda_graphs = backend.capture_cuda_graphs(
                self.kv_caches, block_size, max_num_seqs, progress=True
            )
            logger.info(
                "decode CUDA graphs: %s", "captured" if self.uses_cuda_graphs else "not available, running eagerly"
            )

    @property
    def num_in_flight(self) -> int:
        """Steps launched and not collected yet."""
        return len(self._in_flight)

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> None:
        """Apply the plan to the runner's requests, queue the step's GPU work and the copy of its results to the
        host, without waiting for either; `collect` waits for it.

        Args:
            plan: the scheduler's plan (at least one row). Rows whose last token is a placeholder are fed the
                token the step launched before sampled (still on the device).
        """
        rows = apply_plan(self.requests, plan)
        self.transfer_blocks(plan.kv_transfers)
        self.copy_blocks(plan.block_copies)
        layout = logits_layout(rows, plan)
        batch = build_forward_batch(
            token_ids=[state.token_ids(start, start + num_new)
                       for state, start, num_new in zip(rows, plan.num_computed_tokens, plan.num_new_tokens)],
            num_cached=plan.num_computed_tokens,
            block_tables=[state.block_ids for state in rows],
            block_size=self.block_size,
            num_outputs_per_request=layout.num_outputs,
            device=self.device,
        )
        self._feed_placeholders(batch.input_ids, plan, rows)
        sampling = [state for state, sample in zip(rows, plan.needs_sample) if sample]
        is_driver = self.group is None or self.group.is_driver
        tensors = None
        if sampling and is_driver:
            tensors = self.sampling_tensors(sampling, plan.grammar_request_ids, plan.grammar_bitmask)  # no waits
        logits = self.backend.forward(batch, self.kv_caches)
        step = LaunchedStep(requests=sampling, result=None,
                            row_of={state.request_id: row for row, state in enumerate(sampling)})
        if layout.prompt is not None and is_driver:  # scored before the sampler changes the logits in place
            step.prompt = layout.prompt
            step.prompt_host = [t.to("cpu", non_blocking=True) for t in score_prompt_tokens(logits, layout.prompt)]
        if sampling:
            if tensors is not None:
                if layout.sample_rows is not None:
                    logits = logits[self._upload(torch.tensor(layout.sample_rows, dtype=torch.int64))]
                step.result = self.sampler(logits, tensors)
                if self.group is not None:
                    self.group.broadcast_tokens(step.result.sampled_token_ids)
            else:  # another rank: the same forward pass (its collectives), then rank 0's tokens
                assert self.group is not None  # not the driver
                step.result = SamplerOutput(self.group.receive_tokens(len(sampling)), None, None, None)
            step.host = [None if t is None else t.to("cpu", non_blocking=True) for t in step.result.tensors()]
        if self.device.type == "cuda" and (step.host or step.prompt_host):
            step.copied = torch.cuda.Event()
            step.copied.record(torch.cuda.current_stream(self.device))
        for state in sampling:
            if state.params.beam_search is None:  # a beam's next token is the engine's choice (BeamSearch)
                state.append_placeholder()
        self._in_flight.append(step)

    def collect(self) -> RunnerOutput:
        """Wait for the oldest launched step's results (the step's one host-device synchronisation), resolve its
        placeholders and key the results by request.

        Returns:
            Sampled token ids and logprobs per request id.
        """
        step = self._in_flight.popleft()
        if step.copied is not None:
            step.copied.synchronize()
        output = RunnerOutput(sampled_token_ids={}, logprobs={})
        if step.result is not None:
            output = self._to_host(step.requests, step.host)
            for state in step.requests:
                for token in output.sampled_token_ids.get(state.request_id, ()):
                    state.resolve_placeholder(token)
        if step.prompt is not None:
            output.prompt_logprobs = prompt_chunks(step.prompt, step.prompt_host)
        return output

    def _feed_placeholders(self, input_ids: torch.Tensor, plan: StepPlan, rows: list[RequestState]) -> None:
        """Write the tokens the previous launched step sampled (still on the device) where this batch feeds their
        placeholders."""
        previous = self._in_flight[-1] if self._in_flight else None
        flat_index, positions, source_rows = -1, [], []
        for state, num_new, sample in zip(rows, plan.num_new_tokens, plan.needs_sample):
            flat_index += num_new
            if state.num_placeholders and sample:  # its last token is the one `previous` sampled
                assert state.output_token_ids[-1] == PLACEHOLDER
                assert previous is not None, "a placeholder is fed from the step launched before"
                positions.append(flat_index)
                source_rows.append(previous.row_of[state.request_id])
        if positions:
            assert previous is not None and previous.result is not None, "a step with placeholders sampled them"
            index = self._upload(torch.tensor([positions, source_rows], dtype=torch.int64))
            input_ids[index[0]] = previous.result.sampled_token_ids[index[1]]

    def transfer_blocks(self, transfers: list[KVTransfer]) -> None:
        """Copy blocks between the device pool and the host tier, in order, queued on the device's stream (pinned
        host memory: the host does not wait)."""
        for transfer in transfers:
            for device, host in zip(self.kv_caches, self.host_kv_caches):
                for device_pool, host_pool in ((device.key, host.key), (device.value, host.value)):
                    if transfer.to_host:
                        host_pool[transfer.slot].copy_(device_pool[transfer.block], non_blocking=True)
                    else:
                        device_pool[transfer.block].copy_(host_pool[transfer.slot], non_blocking=True)

    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        """Copy whole KV blocks src -> dst in every layer (copy-on-write before a step writes them)."""
        if copies:
            self.backend.copy_kv_blocks(self.kv_caches, [c.src for c in copies], [c.dst for c in copies])

    def sampling_tensors(
        self, requests: list[RequestState], grammar_request_ids: list[str] | None = None,
        grammar_bitmask: torch.Tensor | None = None,
    ) -> SamplingTensors:
        """Per-request sampling parameters as tensors on the device, one row per request.

        Args:
            requests: the requests sampled this step, in row order.
            grammar_request_ids: requests whose tokens a grammar constrains, in grammar_bitmask's row order.
            grammar_bitmask: their allowed tokens, [len(grammar_request_ids), ceil(vocab / 32)] int32 (host).

        Returns:
            The SamplingTensors (optional parts are None when no row needs them).
        """
        params = [r.params for r in requests]

        def column(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
            return self._upload(torch.tensor(values, dtype=dtype))

        vocab = self.vocab_size
        uses_penalties = any(
            p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1 for p in params
        )
        masked_rows, masked_ids = self._min_tokens_mask(requests)
        bias_rows = [row for row, p in enumerate(params) for _ in p.logit_bias]
        beam_rows = [row for row, p in enumerate(params) if p.beam_search is not None]
        beam_width = max((p.num_beam_row_tokens(self.eos_token_ids) for p in params if p.beam_search), default=0)
        temperatures = [0.0 if p.beam_search is not None else p.temperature for p in params]
        row_of = {r.request_id: row for row, r in enumerate(requests)}
        grammar_rows = [row_of[request_id] for request_id in grammar_request_ids or []]
        return SamplingTensors(
            temperature=column(temperatures, torch.float32),
            top_k=column([min(p.top_k or vocab, vocab) for p in params], torch.int64)
            if any(p.top_k is not None and p.top_k < vocab for p in params)
            else None,
            top_p=column([p.top_p for p in params], torch.float32) if any(p.top_p < 1 for p in params) else None,
            min_p=column([p.min_p for p in params], torch.float32) if any(p.min_p > 0 for p in params) else None,
            presence_penalty=column([p.presence_penalty for p in params], torch.float32) if uses_penalties else None,
            frequency_penalty=column([p.frequency_penalty for p in params], torch.float32) if uses_penalties else None,
            repetition_penalty=column([p.repetition_penalty for p in params], torch.float32)
            if uses_penalties
            else None,
            output_token_ids=self._padded([r.output_token_ids for r in requests]) if uses_penalties else None,
            prompt_token_ids=self._padded([r.prompt_token_ids for r in requests]) if uses_penalties else None,
            masked_rows=column(masked_rows, torch.int64) if masked_rows else None,
            masked_token_ids=column(masked_ids, torch.int64) if masked_rows else None,
            generators=self._row_generators(requests),
            num_logprobs=[None if p.beam_search is not None else p.logprobs for p in params],
            all_greedy=all(t == 0 for t in temperatures),
            bias_rows=column(bias_rows, torch.int64) if bias_rows else None,
            bias_token_ids=column([t for p in params for t in p.logit_bias], torch.int64) if bias_rows else None,
            bias_values=column([v for p in params for v in p.logit_bias.values()], torch.float32)
            if bias_rows
            else None,
            beam_rows=column(beam_rows, torch.int64) if beam_rows else None,
            num_beam_tokens=min(beam_width, vocab),
            grammar_rows=column(grammar_rows, torch.int64) if grammar_rows else None,
            grammar_bitmask=self._upload(grammar_bitmask) if grammar_rows and grammar_bitmask is not None else None,
        )

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """Copy a host tensor to the device without waiting for the GPU (pinned memory, non-blocking)."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _padded(self, rows: list[list[int]]) -> torch.Tensor:
        """[len(rows), longest] int64 padded with vocab_size (a column that is dropped after scatter)."""
        width = max(1, max(len(r) for r in rows))
        return self._upload(torch.tensor([r + [self.vocab_size] * (width - len(r)) for r in rows], dtype=torch.int64))

    def _min_tokens_mask(self, requests: list[RequestState]) -> tuple[list[int], list[int]]:
        """(rows, token ids) to forbid: stop ids and EOS of requests with fewer than min_tokens outputs."""
        rows: list[int] = []
        token_ids: list[int] = []
        for row, request in enumerate(requests):
            params = request.params
            if request.num_output_tokens >= params.min_tokens:
                continue
            stop_ids = {t for t in params.stop_ids(self.eos_token_ids) if 0 <= t < self.vocab_size}
            rows.extend([row] * len(stop_ids))
            token_ids.extend(sorted(stop_ids))
        return rows, token_ids

    def _row_generators(self, requests: list[RequestState]) -> dict[int, torch.Generator]:
        generators = {}
        for row, request in enumerate(requests):
            seed = request.params.seed
            if seed is None or request.params.temperature == 0:
                continue
            if request.generator is None:
                request.generator = torch.Generator(device=self.device).manual_seed(seed)
            generators[row] = request.generator
        return generators

    def _to_host(self, requests: list[RequestState], host: list[torch.Tensor | None]) -> RunnerOutput:
        """Key a step's results (SamplerOutput.tensors(), copied to the host) by request id."""
        sampled_ids, chosen, top_ids, top_logprobs, beam_ids, beam_logprobs, nonfinite = (
            None if t is None else t.tolist() for t in host
        )
        assert sampled_ids is not None, "every step samples"
        beam_requests = [r for r in requests if r.params.beam_search is not None]
        candidates = {
            r.request_id: BeamCandidates(token_ids=ids, logprobs=values)
            for r, ids, values in zip(beam_requests, beam_ids or [], beam_logprobs or [])
        }
        sampled = {r.request_id: [token] for r, token in zip(requests, sampled_ids) if r.params.beam_search is None}
        logprobs = {}
        for row, request in enumerate(requests):
            wanted = request.params.logprobs
            if wanted is None or chosen is None or request.params.beam_search is not None:
                continue
            top = (dict(zip(top_ids[row][:wanted], top_logprobs[row][:wanted]))
                   if wanted and top_ids and top_logprobs is not None else {})
            logprobs[request.request_id] = [TokenLogprob(token_id=sampled_ids[row], logprob=chosen[row], top=top)]
        failed = {request.request_id for request, bad in zip(requests, nonfinite or []) if bad}
        return RunnerOutput(sampled_token_ids=sampled, logprobs=logprobs, beam_candidates=candidates,
                            nonfinite_request_ids=failed)
