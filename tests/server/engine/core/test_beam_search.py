"""Beam search inside continuous batching equals transformers' generate(num_beams=k) on a random tiny Llama.

Tokens and sequence scores of the returned beams are compared with transformers (float32, CPU) for
several beam widths, length penalties and early_stopping modes, while greedy requests share the
steps; a stop id that the beams actually produce makes some of them end early. The KV block pool's
bookkeeping is checked after every step and must be whole again when the requests end or are aborted.
"""

import random

import pytest
import torch

from server.engine.core.engine_core import EngineCore
from server.engine.engine_config import EngineConfig
from server.engine.sampling_params import BeamSearchParams, SamplingParams

MAX_SEQ_LEN = 96


@pytest.fixture(scope="module")
def engine(tiny_engine_fn):
    return tiny_engine_fn(MAX_SEQ_LEN)


def hf_beams(model, prompt, max_tokens, num_beams, num_return, length_penalty, early_stopping, eos_ids):
    """transformers' returned beams as (generated tokens, sequence score), best first."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_tokens, do_sample=False, num_beams=num_beams, num_return_sequences=num_return,
            length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos_ids,
            output_scores=True, return_dict_in_generate=True,
        )
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    tokens = [row[len(prompt): len(prompt) + n].tolist() for row, n in zip(out.sequences, lengths)]
    return list(zip(tokens, out.sequences_scores.tolist()))


def run_to_end(core: EngineCore, abort_after: int | None = None) -> dict:
    """Step until idle, checking the block pool each step; returns request id -> list of outputs."""
    outputs: dict = {}
    steps = 0
    while core.has_unfinished_requests:
        for output in core.step():
            outputs.setdefault(output.request_id, []).append(output)
        core.kv_cache_manager.check_invariants()
        steps += 1
        if abort_after is not None and steps == abort_after:
            for request_id in core.request_ids:
                outputs.setdefault(request_id, []).append(core.abort_request(request_id))
        assert steps < 500
    assert core.kv_cache_manager.num_free_blocks == core.num_kv_blocks, "blocks leaked"
    core.kv_cache_manager.check_invariants()
    return outputs


CASES = [  # num_beams, n, length_penalty, early_stopping
    (2, 1, 1.0, False),
    (2, 2, 0.0, True),
    (4, 2, 1.0, "never"),
    (4, 3, -0.7, False),
    (4, 4, 2.0, True),
]


@pytest.mark.parametrize("num_beams,n,length_penalty,early_stopping", CASES)
def test_beams_equal_transformers_while_greedy_requests_share_the_batch(
    engine, hf_model, hf_greedy_fn, num_beams, n, length_penalty, early_stopping
):
    rng = random.Random(num_beams * 10 + n)
    vocab = engine.config.vocab_size
    prompts = [[rng.randrange(7, vocab) for _ in range(rng.randint(3, 11))] for _ in range(2)]
    max_tokens = 10
    eos = list(engine.eos_token_ids)
    # A token the first prompt's best beam produces early, made a stop id: beams then end at different lengths.
    free_run = hf_beams(hf_model, prompts[0], max_tokens, num_beams, 1, length_penalty, early_stopping, eos)
    stop_id = free_run[0][0][2]
    stops = eos + [stop_id] if stop_id not in eos else eos
    expected = [hf_beams(hf_model, p, max_tokens, num_beams, n, length_penalty, early_stopping, stops) for p in prompts]
    greedy_prompts = [[rng.randrange(7, vocab) for _ in range(rng.randint(2, 9))] for _ in range(3)]
    greedy_expected = [hf_greedy_fn(hf_model, p, 8, eos) for p in greedy_prompts]

    core = EngineCore(
        engine, EngineConfig(block_size=4, num_kv_blocks=96, max_num_batched_tokens=32, enforce_eager=True)
    )
    beam = BeamSearchParams(num_beams=num_beams, num_return=n, length_penalty=length_penalty,
                            early_stopping=early_stopping)
    for i, prompt in enumerate(prompts):
        core.add_request(f"beam{i}", prompt, SamplingParams(max_tokens=max_tokens, stop_token_ids=[stop_id],
                                                            beam_search=beam, logprobs=2))
        core.add_request(f"greedy{i}", greedy_prompts[i], SamplingParams(max_tokens=8, temperature=0.0))
    core.add_request("greedy2", greedy_prompts[2], SamplingParams(max_tokens=8, temperature=0.0))
    outputs = run_to_end(core)

    for i, want in enumerate(expected):
        (final,) = outputs[f"beam{i}"]
        assert final.finished and len(final.beams) == n
        got = [(b.token_ids, b.score) for b in final.beams]
        assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
        assert [score for _, score in got] == pytest.approx([score for _, score in want], abs=1e-4)
        for b in final.beams:
            assert b.finish_reason == ("stop" if b.token_ids[-1] in stops else "length")
            assert len(b.logprobs) == len(b.token_ids)
            assert sum(lp.logprob for lp in b.logprobs) == pytest.approx(b.cumulative_logprob, abs=1e-4)
            assert all(len(lp.top) == 2 and lp.logprob <= max(lp.top.values()) + 1e-6 for lp in b.logprobs)
    for i, want in enumerate(greedy_expected):
        assert [t for o in outputs[f"greedy{i}"] for t in o.new_token_ids] == want


def test_aborted_and_preempted_beam_requests_return_every_block(engine, hf_model):
    rng = random.Random(5)
    vocab = engine.config.vocab_size
    prompt = [rng.randrange(7, vocab) for _ in range(9)]
    params = SamplingParams(max_tokens=12, ignore_eos=True, beam_search=BeamSearchParams(num_beams=4, num_return=2))
    # Aborted mid-search: every beam's blocks come back.
    core = EngineCore(engine, EngineConfig(block_size=4, num_kv_blocks=64, enforce_eager=True))
    core.add_request("beams", prompt, params)
    core.add_request("other", prompt[:5], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    outputs = run_to_end(core, abort_after=4)
    assert outputs["beams"][-1].finish_reason == "abort"
    # A pool so small that the beams and a greedy request preempt each other: same beams as transformers.
    want = hf_beams(hf_model, prompt, 12, 4, 2, 1.0, False, [])
    core = EngineCore(engine, EngineConfig(block_size=4, num_kv_blocks=20, max_num_batched_tokens=16,
                                           enforce_eager=True))
    core.add_request("other", [rng.randrange(7, vocab) for _ in range(30)],
                     SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    core.add_request("beams", prompt, params)
    outputs = run_to_end(core)
    assert core.scheduler.num_preemptions_total > 0, "the test must exercise preemption"
    assert [b.token_ids for b in outputs["beams"][0].beams] == [tokens for tokens, _ in want]


def test_beams_share_their_prompt_blocks_and_copy_only_the_partly_filled_one(engine):
    core = EngineCore(engine, EngineConfig(block_size=4, num_kv_blocks=64, enforce_eager=True))
    steps = []
    execute = core.executor.execute
    core.executor.execute = lambda plan: steps.append(plan) or execute(plan)  # pyright: ignore[reportAttributeAccessIssue]
    prompt = list(range(10, 27))  # 17 tokens: 4 full blocks and 1 token in a fifth
    core.add_request("beams", prompt, SamplingParams(max_tokens=3, ignore_eos=True,
                                                     beam_search=BeamSearchParams(num_beams=4)))
    core.step()  # prefill: one request, 5 blocks; its row makes the 4 beams, which fork its table
    kv = core.kv_cache_manager
    tables = [kv.block_table(r.request_id) for r in core.scheduler.running]
    assert len(tables) == 4 and all(table == tables[0] for table in tables) and kv.num_used_blocks == 5
    shared = tables[0][4]
    core.step()  # each beam writes position 17, inside the shared fifth block: 3 copies, the last owner keeps it
    decode = steps[-1]
    assert len(decode.new_requests) == 4, "beams just continued are sent whole"
    tables = [new.block_ids for new in decode.new_requests]
    assert len(tables) == 4 and all(table[:4] == tables[0][:4] for table in tables)
    assert len({table[4] for table in tables}) == 4
    copies = decode.block_copies
    assert len(copies) == 3 and {c.src for c in copies} == {shared}
    assert {c.dst for c in copies} == {table[4] for table in tables} - {shared}
    run_to_end(core)


def test_non_finite_logits_on_a_beam_end_its_request_with_error_and_spare_the_others(engine):
    core = EngineCore(engine, EngineConfig(block_size=4, num_kv_blocks=64, enforce_eager=True))
    params = SamplingParams(max_tokens=10, ignore_eos=True, beam_search=BeamSearchParams(num_beams=4, num_return=2))
    core.add_request("beams", [11, 12, 13, 14, 15], params)
    core.add_request("other", [11, 12, 13], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    execute = core.executor.execute
    steps = {"count": 0}

    def poisoned(plan):  # the model's logits for one beam turn NaN on the third step
        result = execute(plan)
        steps["count"] += 1
        if steps["count"] == 3:
            beam = next(request_id for request_id in plan.request_ids if request_id.startswith("beams"))
            result.nonfinite_request_ids.add(beam)
        return result

    core.executor.execute = poisoned
    outputs = run_to_end(core)  # also checks that every block came back
    assert outputs["beams"][-1].finished and outputs["beams"][-1].finish_reason == "error"
    assert outputs["other"][-1].finish_reason == "length" and outputs["other"][-1].num_generated_tokens == 10


def test_a_beam_search_that_fails_while_ranking_ends_alone(engine, hf_model, hf_greedy_fn):
    """The step's per-request parts fail only their request: here one beam search's ranking raises (as an
    overflowing length_penalty did, before the API bounded it) while another search and a greedy request run."""
    from server.engine.core.beam_search import BeamSearch

    prompt = [11, 12, 13, 14, 15]
    beam = BeamSearchParams(num_beams=2)
    want_beams = hf_beams(hf_model, prompt, 6, 2, 1, 1.0, False, list(engine.eos_token_ids))
    want_greedy = hf_greedy_fn(hf_model, [11, 12, 13], 8, list(engine.eos_token_ids))
    core = EngineCore(engine, EngineConfig(block_size=4, num_kv_blocks=64, enforce_eager=True))
    core.add_request("doomed", prompt, SamplingParams(max_tokens=6, beam_search=beam))
    core.add_request("beams", prompt, SamplingParams(max_tokens=6, beam_search=beam))
    core.add_request("greedy", [11, 12, 13], SamplingParams(max_tokens=8, temperature=0.0))
    step = BeamSearch.step
    doomed_search = core._beam_groups["doomed"].search

    calls = {"doomed": 0}

    def overflowing_step(self, candidates):  # the doomed search's ranking raises at its second step
        if self is doomed_search:
            calls["doomed"] += 1
            if calls["doomed"] == 2:
                raise OverflowError("(34, 'Numerical result out of range')")
        return step(self, candidates)

    BeamSearch.step = overflowing_step
    try:
        outputs = run_to_end(core)  # also checks that every block came back
    finally:
        BeamSearch.step = step
    assert outputs["doomed"][-1].finished and outputs["doomed"][-1].finish_reason == "error"
    assert [b.token_ids for b in outputs["beams"][-1].beams] == [tokens for tokens, _ in want_beams]
    assert [t for o in outputs["greedy"] for t in o.new_token_ids] == want_greedy
