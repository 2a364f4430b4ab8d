"""Scheduler behaviour with a fake model: admission, chunked prefill, preemption + recompute, FIFO, refusal.

The fake model "computes" by appending each step's new tokens to a per-request cache and samples a
token that depends on the whole cached sequence, so a request resumed after preemption only gets
the right tokens if exactly its prompt + outputs were recomputed, in order. It reads the step plan as
the model runner does (its own request states, updated from the plan alone), so every step also checks
that the data-only plan tells the runner exactly the scheduler's tokens and block tables.
"""

import pickle
import random
from typing import NamedTuple

import pytest

from server.engine.core.kv_cache_manager import KVCacheManager
from server.engine.core.request import Request, RequestStatus
from server.engine.core.scheduler import Scheduler
from server.engine.core.scheduler_output import SchedulerOutput
from server.engine.outputs import FinishReason
from server.engine.sampling_params import SamplingParams
from server.runner.request_state import RequestState, apply_plan


def fake_next_token(tokens: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 31 + len(tokens)) % 997


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(fake_next_token(tokens))
    return tokens[len(prompt):]


def make_request(request_id: str, prompt_len: int, max_tokens: int, seed: int = 0) -> Request:
    rng = random.Random(f"{request_id}-{seed}")
    prompt = [rng.randrange(1000) for _ in range(prompt_len)]
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens), arrival_time=0.0)


class Row(NamedTuple):
    request_id: str
    num_new_tokens: int
    needs_sample: bool


def rows(out: SchedulerOutput) -> list[Row]:
    plan = out.plan
    return [Row(*row) for row in zip(plan.request_ids, plan.num_new_tokens, plan.needs_sample)]


class FakeEngine:
    """Drives a scheduler step by step, checking every invariant a user of the engine relies on."""

    def __init__(self, num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256):
        self.kv = KVCacheManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens, max_model_len)
        self.cache: dict[str, list[int]] = {}  # tokens "in the KV cache" per request
        self.states: dict[str, RequestState] = {}  # what the runner knows, from the plans alone
        self.finished: dict[str, Request] = {}
        self.admission_order: list[str] = []

    def add(self, request: Request) -> Request:
        self.scheduler.add_request(request)
        return request

    def step(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        plan = pickle.loads(pickle.dumps(out.plan))  # as a worker process would receive it
        self.kv.check_invariants()
        assert out.num_batched_tokens == sum(plan.num_new_tokens)
        assert out.num_batched_tokens <= self.scheduler.max_num_batched_tokens
        assert len(self.scheduler.running) <= self.scheduler.max_num_seqs
        for request_id in out.preempted_ids:
            self.cache[request_id] = []
        sampled = {}
        states = apply_plan(self.states, plan)
        for request, state, start, num_new, sample in zip(out.requests, states, plan.num_computed_tokens,
                                                          plan.num_new_tokens, plan.needs_sample, strict=True):
            cache = self.cache.setdefault(state.request_id, [])
            if state.request_id not in self.admission_order:
                self.admission_order.append(state.request_id)
            assert num_new > 0
            assert start == len(cache), "computed tokens must match what the cache holds"
            assert state.block_ids == self.kv.block_table(request.request_id), "the runner's table is the scheduler's"
            assert len(state.block_ids) * self.kv.block_size >= start + num_new
            cache.extend(state.token_ids(start, start + num_new))
            assert cache == request.token_ids(0, len(cache))
            assert sample == (len(cache) == request.num_tokens)
            if sample:
                token = fake_next_token(cache)
                sampled[request.request_id] = [token]
                state.append_placeholder()  # as the runner records what it sampled
                state.resolve_placeholder(token)
        for request in self.scheduler.update_from_output(out, sampled):
            if request.num_output_tokens >= request.params.max_tokens:
                finished = self.scheduler.finish_request(request.request_id, FinishReason.LENGTH)
                assert finished is not None
                self.finished[request.request_id] = finished
        self.kv.check_invariants()
        return out

    def run(self, max_steps=10_000) -> list[SchedulerOutput]:
        outputs = []
        while self.scheduler.has_unfinished_requests:
            outputs.append(self.step())
            assert len(outputs) < max_steps, "the scheduler made no progress"
        assert self.kv.num_free_blocks == self.kv.num_blocks
        return outputs


def test_requests_that_fit_are_admitted_together_and_decode_one_token_per_step():
    engine = FakeEngine()
    requests = [engine.add(make_request(f"r{i}", 5, 3)) for i in range(3)]
    first = engine.step()
    assert [i.request_id for i in rows(first)] == ["r0", "r1", "r2"]
    assert all(i.num_new_tokens == 5 and i.needs_sample for i in rows(first))
    second = engine.step()
    assert [i.num_new_tokens for i in rows(second)] == [1, 1, 1]
    engine.run()
    for request in requests:
        assert request.output_token_ids == reference_output(request.prompt_token_ids, 3)
        assert request.status is RequestStatus.FINISHED and request.finish_reason == "length"


def test_long_prompt_is_prefilled_in_chunks_alongside_decodes():
    engine = FakeEngine(max_num_batched_tokens=16)
    short = engine.add(make_request("short", 4, 10))
    engine.step()  # short prefilled; it now decodes
    long = engine.add(make_request("long", 40, 2))
    chunks = []
    while long.num_output_tokens == 0:
        out = engine.step()
        by_id = {i.request_id: i for i in rows(out)}
        assert by_id["short"].num_new_tokens == 1  # the decode goes on during the prefill
        chunks.append((by_id["long"].num_new_tokens, by_id["long"].needs_sample))
    assert chunks == [(15, False), (15, False), (10, True)]
    engine.run()
    assert long.output_token_ids == reference_output(long.prompt_token_ids, 2)
    assert short.output_token_ids == reference_output(short.prompt_token_ids, 10)


def test_max_num_seqs_caps_the_running_batch():
    engine = FakeEngine(max_num_seqs=2)
    for i in range(5):
        engine.add(make_request(f"r{i}", 3, 4))
    out = engine.step()
    assert len(out.requests) == 2 and engine.scheduler.num_waiting == 3
    engine.run()
    assert engine.admission_order == [f"r{i}" for i in range(5)]


def test_admission_is_fifo_a_big_head_is_not_overtaken():
    engine = FakeEngine(num_blocks=10, block_size=4, max_num_batched_tokens=64)
    engine.add(make_request("holder", 20, 8))  # 5 blocks, then 7 as it decodes
    engine.step()
    engine.add(make_request("big", 20, 4))  # needs 5 blocks; holder takes a 6th this step, leaving 4
    engine.add(make_request("small", 2, 2))
    engine.step()
    # After holder grows to 6 blocks, big (5 blocks) cannot fit; small (1 block) could but must wait.
    while "big" not in engine.admission_order:
        assert "small" not in engine.admission_order
        engine.step()
    engine.run()
    assert engine.admission_order == ["holder", "big", "small"]


def test_preemption_takes_the_newest_request_and_resumes_it_with_recompute():
    engine = FakeEngine(num_blocks=8, block_size=4, max_num_batched_tokens=64)
    old = engine.add(make_request("old", 6, 20))
    new = engine.add(make_request("new", 6, 20))
    preempted_at = None
    while preempted_at is None:
        out = engine.step()
        if out.preempted_ids:
            preempted_at = out
    assert preempted_at.preempted_ids == ["new"]
    assert [i.request_id for i in rows(preempted_at)] == ["old"]
    assert new.status is RequestStatus.WAITING and new.num_computed_tokens == 0
    assert engine.scheduler.waiting[0] is new
    kept = list(new.output_token_ids)
    assert kept, "the preempted request had generated tokens"
    engine.run()
    assert new.output_token_ids[: len(kept)] == kept  # generated tokens survive the preemption
    assert new.num_preemptions >= 1 and engine.scheduler.num_preemptions_total >= 1
    assert old.output_token_ids == reference_output(old.prompt_token_ids, 20)
    assert new.output_token_ids == reference_output(new.prompt_token_ids, 20)


def test_a_lone_request_can_preempt_itself_and_still_finish():
    # Three requests share 6 blocks; each alone needs 5: they take turns through preemption.
    engine = FakeEngine(num_blocks=6, block_size=4, max_num_batched_tokens=8)
    requests = [engine.add(make_request(f"r{i}", 9, 11)) for i in range(3)]
    engine.run()
    for request in requests:
        assert request.output_token_ids == reference_output(request.prompt_token_ids, 11)
    assert engine.scheduler.num_preemptions_total > 0


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_keeps_accounting_consistent_and_outputs_exact(seed):
    rng = random.Random(seed)
    engine = FakeEngine(num_blocks=rng.randint(12, 30), block_size=rng.choice([1, 2, 4, 8]),
                        max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(4, 40), max_model_len=96)
    capacity = engine.kv.num_blocks * engine.kv.block_size
    requests, aborted = [], set()
    for _step in range(400):
        if rng.random() < 0.3 and len(requests) < 30:
            prompt_len = rng.randint(1, min(40, capacity))
            max_tokens = rng.randint(1, min(96 - prompt_len, capacity + 1 - prompt_len))
            requests.append(engine.add(make_request(f"q{len(requests)}", prompt_len, max_tokens, seed)))
        if rng.random() < 0.05 and engine.scheduler.requests:
            victim = rng.choice(sorted(engine.scheduler.requests))
            engine.scheduler.finish_request(victim, FinishReason.ABORT)
            engine.kv.check_invariants()
            aborted.add(victim)
        if engine.scheduler.has_unfinished_requests:
            engine.step()
    engine.run()
    for request in requests:
        if request.request_id not in aborted:
            assert request.output_token_ids == reference_output(request.prompt_token_ids, request.params.max_tokens)


def test_requests_that_can_never_fit_are_refused_up_front():
    engine = FakeEngine(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add(make_request("too-long", 60, 10))  # 70 > max_model_len
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add(make_request("too-big", 10, 10))  # 19 KV tokens > 16-token pool
    with pytest.raises(ValueError, match="at least one token"):
        engine.add(make_request("empty", 0, 4))
    engine.add(make_request("exact", 10, 7))  # 16 KV tokens: exactly the pool
    with pytest.raises(ValueError, match="already in use"):
        engine.add(make_request("exact", 1, 1))
    assert [r.request_id for r in engine.scheduler.waiting] == ["exact"]
    engine.run()


def test_finishing_a_waiting_or_running_request_frees_its_blocks():
    engine = FakeEngine(max_num_seqs=1)
    running = engine.add(make_request("running", 8, 50))
    waiting = engine.add(make_request("waiting", 8, 50))
    engine.step()
    assert engine.kv.has_blocks("running") and not engine.kv.has_blocks("waiting")
    assert engine.scheduler.finish_request("waiting", FinishReason.ABORT) is waiting
    assert engine.scheduler.finish_request("running", FinishReason.ABORT) is running
    assert engine.scheduler.finish_request("running", FinishReason.ABORT) is None
    assert running.finish_reason == "abort" and not engine.scheduler.has_unfinished_requests
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.kv.check_invariants()


def test_a_decode_step_of_256_requests_is_a_small_plan_without_their_prompts():
    """The plan crosses to tensor-parallel workers every step: a decode step must not resend what they know."""
    import uuid

    engine = FakeEngine(num_blocks=256 * 64, block_size=16, max_num_seqs=256, max_num_batched_tokens=65_536,
                        max_model_len=2048)
    for _ in range(256):
        engine.add(make_request(f"cmpl-{uuid.uuid4().hex}-0", 1000, 8))
    prefill_sizes = []
    while not all(request.num_output_tokens for request in engine.scheduler.requests.values()):
        prefill_sizes.append(len(pickle.dumps(engine.step().plan)))
    decode = engine.step()
    assert [row.num_new_tokens for row in rows(decode)] == [1] * 256 and not decode.plan.new_requests
    size = len(pickle.dumps(decode.plan))
    assert size < 256 * 80, f"a decode step of 256 requests pickles to {size} bytes"
    assert sum(prefill_sizes) > 256 * 1000, "the prompts themselves are sent once, when each request is new"
    engine.run()
