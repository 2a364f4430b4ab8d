"""Async scheduling (step N+1 launched before step N's tokens reach the host) changes nothing a client sees.

On a random tiny Llama (float32, CPU): greedy requests under chunked prefill and preemption equal
transformers' generate; a mix of sampling parameters, stop ids and strings, min_tokens, logprobs and
aborts gives exactly the outputs of plain steps; requests that need plain steps (penalties, beam search)
switch the engine over and back. Every step checks the block pool, and it must be whole at the end.
"""

import random
from typing import cast

import pytest

from server.engine.core.engine_core import EngineCore
from server.engine.engine_config import EngineConfig
from server.engine.sampling_params import BeamSearchParams, SamplingParams
from server.runner.executor import UniprocExecutor

MAX_SEQ_LEN = 96


@pytest.fixture(scope="module")
def engine(tiny_engine_fn):
    return tiny_engine_fn(MAX_SEQ_LEN)


class OverlapCounter:
    """Wraps the executor's launch and counts the steps launched while the previous step's tokens were on the
    device."""

    def __init__(self, core: EngineCore):
        self.num_overlapped = 0
        runner = cast(UniprocExecutor, core.executor).runner
        launch = runner.launch

        def counting_launch(plan):
            self.num_overlapped += runner.num_in_flight > 0
            launch(plan)

        runner.launch = counting_launch  # pyright: ignore[reportAttributeAccessIssue]  (a test seam)


def run(core: EngineCore, requests: dict, joining: dict | None = None, abort: dict | None = None) -> dict:
    """Add `requests` (id -> (prompt, params)), step until idle; `joining`/`abort` map a step number to
    requests added / ids aborted before it. Returns id -> (tokens, text, logprobs, finish_reason, usage)."""
    for request_id, (prompt, params) in requests.items():
        core.add_request(request_id, prompt, params)
    results: dict = {}

    def record(output):
        tokens, text, logprobs, _, _ = results.get(output.request_id, ([], "", [], None, None))
        results[output.request_id] = (
            tokens + output.new_token_ids, text + output.new_text, logprobs + (output.new_logprobs or []),
            output.finish_reason, output.num_generated_tokens if output.finished else None,
        )
        if output.beams:
            results[output.request_id] = [(b.token_ids, b.text, b.finish_reason) for b in output.beams]

    step = 0
    while core.has_unfinished_requests or (joining and step <= max(joining)):
        for request_id, (prompt, params) in (joining or {}).get(step, {}).items():
            core.add_request(request_id, prompt, params)
        for request_id in (abort or {}).get(step, []):
            output = core.abort_request(request_id)
            if output is not None:
                record(output)
        for output in core.step():
            record(output)
        core.kv_cache_manager.check_invariants()
        step += 1
        assert step < 1000, "no progress"
    assert core.kv_cache_manager.num_free_blocks == core.num_kv_blocks, "blocks leaked"
    return results


def test_overlapped_greedy_steps_match_transformers_under_chunked_prefill_and_preemption(engine, hf_model,
                                                                                         hf_greedy_fn):
    rng = random.Random(1)
    prompts = [[rng.randrange(7, engine.config.vocab_size) for _ in range(rng.randint(3, 40))] for _ in range(8)]
    max_tokens = [rng.randint(8, 24) for _ in prompts]
    # 24 blocks of 4 tokens for 8 requests of up to ~60 tokens: they preempt each other; 16-token chunks.
    core = EngineCore(engine, EngineConfig(block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=8))
    counter = OverlapCounter(core)
    results = run(core, {f"r{i}": (p, SamplingParams(max_tokens=n, temperature=0)) for i, (p, n)
                         in enumerate(zip(prompts, max_tokens))})
    assert core.scheduler.num_preemptions_total > 0, "the test must exercise preemption"
    assert counter.num_overlapped > 20, "steps must have been launched before the previous tokens were known"
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        tokens, _, _, reason, usage = results[f"r{i}"]
        assert tokens == hf_greedy_fn(hf_model, prompt, n, engine.eos_token_ids), f"request r{i}"
        assert usage == len(tokens) and reason in ("stop", "length")


def test_mixed_requests_give_the_same_outputs_as_plain_steps(engine):
    rng = random.Random(2)
    vocab = engine.config.vocab_size

    def prompt():
        return [rng.randrange(7, vocab) for _ in range(rng.randint(4, 30))]

    plain = EngineCore(engine, EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=24,
                                            async_scheduling=False))
    probe_prompt = prompt()
    probe = run(plain, {"probe": (probe_prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))})
    probe_tokens, probe_text = probe["probe"][0], probe["probe"][1]
    stop_string = probe_text[len(probe_text) // 2: len(probe_text) // 2 + 3]
    requests = {
        "greedy": (prompt(), SamplingParams(max_tokens=30, temperature=0)),
        "seeded": (prompt(), SamplingParams(max_tokens=25, temperature=0.9, top_p=0.9, seed=7, logprobs=2)),
        "stop-id": (probe_prompt, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[probe_tokens[6]])),
        "stop-string": (probe_prompt, SamplingParams(max_tokens=20, temperature=0, stop=[stop_string])),
        "min-tokens": (prompt(), SamplingParams(max_tokens=12, temperature=0.8, seed=3, min_tokens=10,
                                                 stop_token_ids=list(range(7, 200)))),
        "aborted": (prompt(), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)),
        "top-k": (prompt(), SamplingParams(max_tokens=18, temperature=1.2, top_k=5, seed=11, logit_bias={9: 5.0})),
    }
    joining = {  # requests that need plain steps arrive while others run, and leave again
        3: {"penalties": (prompt(), SamplingParams(max_tokens=6, temperature=0, repetition_penalty=1.3,
                                                   frequency_penalty=0.5))},
        9: {"beams": (prompt(), SamplingParams(max_tokens=5, beam_search=BeamSearchParams(num_beams=2)))},
        20: {"late": (prompt(), SamplingParams(max_tokens=15, temperature=0.7, seed=5))},
    }
    abort = {7: ["aborted"]}

    def config(async_scheduling):
        return EngineConfig(
            block_size=4, num_kv_blocks=64, max_num_batched_tokens=24, async_scheduling=async_scheduling
        )

    expected = run(EngineCore(engine, config(False)), requests, joining, abort)
    overlapped_core = EngineCore(engine, config(True))
    counter = OverlapCounter(overlapped_core)
    actual = run(overlapped_core, requests, joining, abort)
    assert counter.num_overlapped > 10
    assert expected["stop-id"][0][-1] == probe_tokens[6] and expected["stop-id"][3] == "stop"
    assert expected["stop-string"][3] == "stop" and stop_string not in expected["stop-string"][1]
    assert expected["aborted"][3] == "abort"
    for request_id in [*requests, "penalties", "beams", "late"]:
        if request_id == "aborted":  # the abort lands after a different number of tokens; it must still end cleanly
            assert actual[request_id][3] == "abort" and actual[request_id][4] == len(actual[request_id][0])
            continue
        exp, act = expected[request_id], actual[request_id]
        if request_id == "beams":
            assert act == exp
            continue
        assert act[:2] == exp[:2] and act[3:] == exp[3:], request_id
        assert [(p.token_id, sorted(p.top)) for p in act[2]] == [(p.token_id, sorted(p.top)) for p in exp[2]]
        values = [[p.logprob, *p.top.values()] for p in act[2]]
        assert values == [pytest.approx([p.logprob, *p.top.values()], abs=1e-5) for p in exp[2]], request_id
        assert act[4] == len(act[0]), f"{request_id}: usage counts a token that was dropped"
