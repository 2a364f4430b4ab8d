"""Prefix caching changes nothing a client sees, only what is computed.

On a random tiny Llama (float32, CPU): requests that share a prefix, run once to fill the cache and again to hit
it, give exactly the outputs of an engine without the cache — greedy (also equal to transformers), seeded
sampling, beam search, n=2, prompt logprobs — under chunked prefill and preemption in a tiny block pool, with
plain and async steps. The scheduler's output shows the hits: a second request with a 200-token shared prefix
computes only its own tokens, and the metrics count them. Salts isolate; idle, every block is free or cached.
"""

import random
from typing import Any

import pytest
import torch

from engine_builder.loader import load_engine
from server.engine.core.engine_core import EngineCore
from server.engine.engine_config import EngineConfig
from server.engine.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputParams
from server.engine.stats import FinishedRequestStats, StepStats

MAX_SEQ_LEN = 256


CUDA_ASYNC = pytest.param(
    "cuda", True, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
)


@pytest.fixture(scope="module")
def engine(tiny_engine_fn):
    return tiny_engine_fn(MAX_SEQ_LEN)


class Sink:
    """A StatsSink keeping the step records."""

    def __init__(self) -> None:
        self.steps: list[StepStats] = []

    def record_state(self, *values: int) -> None:
        pass

    def record_step(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def record_finished(self, stats: FinishedRequestStats) -> None:
        pass

    def record_step_failure(self) -> None:
        pass


def run(core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, Any]:
    """Add the requests, step until idle; id -> (tokens, logprobs, prompt logprobs) or the beams' tokens."""
    for request_id, (prompt, params) in requests.items():
        core.add_request(request_id, prompt, params)
    results: dict[str, Any] = {request_id: ([], [], None) for request_id in requests}
    steps = 0
    while core.has_unfinished_requests:
        for output in core.step():
            tokens, logprobs, prompt_logprobs = results[output.request_id]
            results[output.request_id] = (
                tokens + output.new_token_ids,
                logprobs + [round(entry.logprob, 4) for entry in output.new_logprobs or []],
                prompt_logprobs or [None if e is None else round(e.logprob, 4) for e in output.prompt_logprobs or []],
            )
            if output.beams:
                results[output.request_id] = [beam.token_ids for beam in output.beams]
        core.kv_cache_manager.check_invariants()
        steps += 1
        assert steps < 5000, "no progress"
    assert core.kv_cache_manager.num_free_blocks == core.num_kv_blocks, "blocks leaked"
    return results


def workload(vocab: int, wave: int) -> dict[str, tuple[list[int], SamplingParams]]:
    """Requests sharing a 37-token system prefix (and two of them a longer one), one of each kind."""
    rng = random.Random(5)
    system = [rng.randrange(7, vocab) for _ in range(37)]
    few_shot = system + [rng.randrange(7, vocab) for _ in range(23)]

    def user(length: int) -> list[int]:
        return [rng.randrange(7, vocab) for _ in range(length)]

    requests = {
        "greedy": (system + user(9), SamplingParams(max_tokens=12, temperature=0)),
        "seeded": (few_shot + user(5), SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=3,
                                                      logprobs=2)),
        "beams": (system + user(6), SamplingParams(max_tokens=6, beam_search=BeamSearchParams(num_beams=2))),
        "n2-a": (few_shot + user(4), SamplingParams(max_tokens=8, temperature=1.0, seed=10)),
        "prompt-logprobs": (system + user(7), SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2)),
        "penalties": (system + user(3), SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3)),
        "json": (system + user(5), SamplingParams(max_tokens=10, temperature=0.7, seed=4,
                                                  structured_output=StructuredOutputParams(kind="json_object"))),
    }
    requests["n2-b"] = (requests["n2-a"][0], SamplingParams(max_tokens=8, temperature=1.0, seed=11))
    return {f"{request_id}@{wave}": value for request_id, value in requests.items()}


def config(prefix_caching: bool, async_scheduling: bool) -> EngineConfig:
    # 28 blocks of 4 tokens for requests of up to ~70 tokens: they preempt each other; 16-token chunks.
    return EngineConfig(block_size=4, num_kv_blocks=28, max_num_batched_tokens=16, max_num_seqs=6,
                        async_scheduling=async_scheduling, enable_prefix_caching=prefix_caching)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_outputs_are_identical_with_and_without_the_cache(engine, hf_model, hf_greedy_fn, async_scheduling):
    vocab = engine.config.vocab_size
    without = EngineCore(engine, config(False, async_scheduling))
    cached_sink = Sink()
    cached = EngineCore(engine, config(True, async_scheduling), metrics=cached_sink)  # type: ignore[arg-type]
    for wave in (1, 2):  # the second wave finds what the first cached
        requests = workload(vocab, wave)
        expected = run(without, requests)
        assert run(cached, requests) == expected, f"wave {wave}"
        prompt = requests[f"greedy@{wave}"][0]
        assert expected[f"greedy@{wave}"][0] == hf_greedy_fn(hf_model, prompt, 12, engine.eos_token_ids)
    assert cached.scheduler.num_preemptions_total > 0, "the test must exercise preemption"
    assert sum(step.num_prefix_hits for step in cached_sink.steps) >= 37, "the second wave must hit the cache"
    assert cached.kv_cache_manager.num_cached_blocks > 0


def test_a_shared_200_token_prefix_is_found_and_only_the_rest_computed(engine):
    rng = random.Random(9)
    vocab = engine.config.vocab_size
    shared = [rng.randrange(7, vocab) for _ in range(200)]
    sink = Sink()
    core = EngineCore(engine, EngineConfig(block_size=8, num_kv_blocks=96, max_num_batched_tokens=512,
                                           enable_prefix_caching=True), metrics=sink)  # type: ignore[arg-type]
    run(core, {"first": (shared + [11, 12, 13], SamplingParams(max_tokens=3, temperature=0))})
    assert sum(step.num_prefix_hits for step in sink.steps) == 0
    second = shared + [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
    core.add_request("second", second, SamplingParams(max_tokens=3, temperature=0))
    scheduled = core.scheduler.schedule()  # what the step will compute
    row = scheduled.plan.request_ids.index("second")
    assert scheduled.plan.num_computed_tokens[row] == 200  # 25 cached blocks of 8
    assert scheduled.plan.num_new_tokens[row] == len(second) - 200
    assert (scheduled.num_prefix_queries, scheduled.num_prefix_hits) == (len(second), 200)


def test_the_hits_reach_the_metrics_and_salts_isolate(engine):
    rng = random.Random(4)
    vocab = engine.config.vocab_size
    prompt = [rng.randrange(7, vocab) for _ in range(41)]
    sink = Sink()
    core = EngineCore(engine, EngineConfig(block_size=4, num_kv_blocks=64, enable_prefix_caching=True),
                      metrics=sink)  # type: ignore[arg-type]

    def hits(request_id: str, salt: str | None) -> int:
        before = sum(step.num_prefix_hits for step in sink.steps)
        run(core, {request_id: (prompt, SamplingParams(max_tokens=2, temperature=0, cache_salt=salt))})
        return sum(step.num_prefix_hits for step in sink.steps) - before

    assert hits("tenant-a", "a") == 0
    assert hits("tenant-a-again", "a") == 40  # 10 blocks; the 41st token is computed
    assert hits("tenant-b", "b") == 0  # another salt never shares
    assert hits("no-salt", None) == 0
    assert core.kv_cache_manager.num_free_blocks == core.num_kv_blocks  # idle: every block free or cached


@pytest.mark.parametrize(("device", "async_scheduling"), [("cpu", False), ("cpu", True), CUDA_ASYNC])
def test_blocks_offloaded_to_the_host_tier_and_restored_give_identical_outputs(engine, tiny_llama_dir, device,
                                                                                async_scheduling):
    if device == "cuda":  # pinned host slots, copies queued on the stream without waiting; CUDA graphs for decode
        engine = load_engine(tiny_llama_dir, device="cuda", dtype="float32", max_seq_len=MAX_SEQ_LEN, progress=False)
    vocab = engine.config.vocab_size
    block_bytes = engine.kv_cache_spec.bytes_per_block(4)

    def prompts(seed: int) -> list[list[int]]:
        local = random.Random(seed)
        return [[local.randrange(7, vocab) for _ in range(45)] for _ in range(3)]

    first, others = prompts(1), prompts(2)
    sink = Sink()
    # 40 device blocks hold one wave of 3 x 48 tokens; the others evict the first wave's blocks to the host tier.
    tiered = EngineCore(engine, EngineConfig(block_size=4, num_kv_blocks=40, max_num_batched_tokens=32,
                                             async_scheduling=async_scheduling, kv_offload_bytes=80 * block_bytes),
                        metrics=sink)  # type: ignore[arg-type]
    plain = EngineCore(engine, EngineConfig(block_size=4, num_kv_blocks=40, enable_prefix_caching=False))

    def wave(core: EngineCore, batch: list[list[int]], name: str) -> dict[str, Any]:
        return run(core, {f"{name}{i}": (prompt, SamplingParams(max_tokens=3, temperature=0.8, seed=i, logprobs=1))
                          for i, prompt in enumerate(batch)})

    for name, batch in (("first", first), ("others", others), ("again", first)):
        assert wave(tiered, batch, name) == wave(plain, batch, name), name
    offloaded = sum(step.num_blocks_offloaded for step in sink.steps)
    restored = sum(step.num_blocks_restored for step in sink.steps)
    assert offloaded >= 30 and restored >= 30, (offloaded, restored)
    assert max(step.num_offload_bytes for step in sink.steps) > 0
