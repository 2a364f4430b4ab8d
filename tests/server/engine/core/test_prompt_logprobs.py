"""Prompt logprobs (echo + logprobs, prompt_logprobs) equal transformers' log_softmax of the prompt's logits.

On a random tiny Llama (float32, CPU), with the prompt split over several chunks, requests that do and do
not score their prompt batched together, plain and async steps, and preemption under a tiny block pool:
every prompt token's logprob, rank and top alternatives match transformers', and the generated tokens are
what they would be without scoring.
"""

import random

import pytest
import torch

from server.engine.core.engine_core import EngineCore
from server.engine.engine_config import EngineConfig
from server.engine.outputs import TokenLogprob
from server.engine.sampling_params import SamplingParams

MAX_SEQ_LEN = 128


@pytest.fixture(scope="module")
def engine(tiny_engine_fn):
    return tiny_engine_fn(MAX_SEQ_LEN)


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row p is transformers' log-distribution of token p + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return logits.log_softmax(dim=-1)[:-1]


def run(core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    """Step until idle; id -> (output tokens, prompt logprobs of its first output, number of outputs carrying them)."""
    for request_id, (prompt, params) in requests.items():
        core.add_request(request_id, prompt, params)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in requests}
    prompt_logprobs: dict[str, list[TokenLogprob | None] | None] = {}
    carried = dict.fromkeys(requests, 0)
    steps = 0
    while core.has_unfinished_requests:
        for output in core.step():
            tokens[output.request_id] += output.new_token_ids
            if output.prompt_logprobs is not None:
                carried[output.request_id] += 1
                prompt_logprobs[output.request_id] = output.prompt_logprobs
        core.kv_cache_manager.check_invariants()
        steps += 1
        assert steps < 2000, "no progress"
    assert core.kv_cache_manager.num_free_blocks == core.num_kv_blocks, "blocks leaked"
    return {request_id: (tokens[request_id], prompt_logprobs.get(request_id), carried[request_id])
            for request_id in requests}


def check_against_transformers(hf_model, prompt: list[int], scored: list[TokenLogprob | None], num_top: int) -> None:
    reference = hf_prompt_logprobs(hf_model, prompt)
    assert len(scored) == len(prompt) and scored[0] is None
    for position, entry in enumerate(scored[1:]):
        assert entry is not None, f"prompt token {position + 1} was not scored"
        row = reference[position]
        assert entry.token_id == prompt[position + 1]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4), f"token {position + 1}"
        assert entry.rank == int((row > row[entry.token_id]).sum()) + 1
        top_values, top_ids = row.topk(num_top)
        assert list(entry.top) == top_ids.tolist()
        assert list(entry.top.values()) == pytest.approx(top_values.tolist(), abs=1e-4)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_match_transformers_across_chunks_and_preemption(engine, hf_model, hf_greedy_fn,
                                                                         async_scheduling):
    rng = random.Random(3)
    vocab = engine.config.vocab_size
    prompts = [[rng.randrange(7, vocab) for _ in range(rng.randint(2, 60))] for _ in range(7)] + [[42]]
    requests = {}
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=rng.randint(4, 16), temperature=0)
        if i % 2 == 0 or len(prompt) == 1:
            params.prompt_logprobs = i % 4  # 0 (the token alone) .. 3 alternatives
        requests[f"r{i}"] = (prompt, params)
    # 20-token chunks; 30 blocks of 4 tokens for 8 requests of up to 76 tokens: they preempt each other.
    core = EngineCore(engine, EngineConfig(block_size=4, num_kv_blocks=30, max_num_batched_tokens=20, max_num_seqs=8,
                                           async_scheduling=async_scheduling))
    results = run(core, requests)
    assert core.scheduler.num_preemptions_total > 0, "the test must exercise preemption"
    for request_id, (prompt, params) in requests.items():
        tokens, scored, carried = results[request_id]
        assert tokens == hf_greedy_fn(hf_model, prompt, params.max_tokens, engine.eos_token_ids), request_id
        if params.prompt_logprobs is None:
            assert scored is None and carried == 0
            continue
        assert carried == 1, "the prompt logprobs come once, with the first output"
        assert scored is not None
        check_against_transformers(hf_model, prompt, scored, params.prompt_logprobs)


def test_prompt_logprobs_are_refused_with_beam_search(engine):
    from server.engine.errors import InvalidRequest
    from server.engine.sampling_params import BeamSearchParams

    core = EngineCore(engine, EngineConfig(block_size=4, num_kv_blocks=32))
    params = SamplingParams(max_tokens=4, beam_search=BeamSearchParams(num_beams=2), prompt_logprobs=1)
    with pytest.raises(InvalidRequest, match="prompt logprobs") as error:
        core.add_request("beams", [9, 10, 11], params)
    assert error.value.param == "prompt_logprobs"
