"""Batched sampler: greedy is argmax, truncation masks the right tokens, seeds are batch-independent,
penalties match a naive reference, sampling follows the softmax, logprobs match log_softmax."""

import math
from typing import Any, cast

import pytest
import torch

from engine_builder.runtime.backend import ModelBackend
from server.engine.sampling_params import SamplingParams
from server.runner.model_runner import ModelRunner
from server.runner.request_state import RequestState
from server.runner.sampler import (
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
)

VOCAB = 50
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
)
EOS_TOKEN_IDS = [0]


class TinyBackend:
    """Just what ModelRunner.sampling_tensors needs of a ModelBackend."""

    class config:
        vocab_size = VOCAB

    def __init__(self, device="cpu"):
        self.device = device

    def allocate_kv_cache(self, num_blocks, block_size):
        return []


def tiny_backend(*args: Any) -> ModelBackend:
    """A TinyBackend where a ModelBackend is expected: it has only what the runner's sampling uses."""
    return cast(ModelBackend, TinyBackend(*args))


@pytest.fixture
def runner():
    return ModelRunner(tiny_backend(), num_kv_blocks=1, block_size=1, eos_token_ids=EOS_TOKEN_IDS)


def request(request_id, prompt=(1, 2, 3), output=(), **params):
    return RequestState(request_id, list(prompt), list(output), SamplingParams(**params), block_ids=[])


def sample(runner, requests, logits, logprobs_mode="raw_logprobs"):
    return Sampler(logprobs_mode)(logits.clone(), runner.sampling_tensors(requests))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_greedy_rows_are_exact_argmax_in_a_mixed_batch(device):
    runner = ModelRunner(tiny_backend(device), num_kv_blocks=1, block_size=1, eos_token_ids=EOS_TOKEN_IDS)
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB, device=device)
    requests = [request(f"r{i}", temperature=0.0 if i % 2 == 0 else 1.5) for i in range(6)]
    out = sample(runner, requests, logits)
    assert out.sampled_token_ids[0::2].tolist() == logits.argmax(-1)[0::2].tolist()
    all_greedy = sample(runner, [request("g", temperature=0.0)] * 2, logits[:2])
    assert all_greedy.sampled_token_ids.tolist() == logits[:2].argmax(-1).tolist()


def test_top_k_1_is_greedy_at_any_temperature(runner):
    torch.manual_seed(1)
    logits = torch.randn(8, VOCAB)
    out = sample(runner, [request(f"r{i}", temperature=2.0, top_k=1) for i in range(8)], logits)
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()


def test_truncation_keeps_exactly_the_expected_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda x: torch.isfinite(x[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(apply_top_k_top_p(logits, None, torch.tensor([0.75]))) == [0, 1]
    assert kept(apply_top_k_top_p(logits, None, torch.tensor([0.85]))) == [0, 1, 2]
    assert kept(apply_top_k_top_p(logits, None, torch.tensor([0.01]))) == [0]
    assert kept(apply_top_k_top_p(logits, torch.tensor([3]), None)) == [0, 1, 2]
    assert kept(apply_top_k_top_p(logits, torch.tensor([3]), torch.tensor([0.6]))) == [0, 1]
    assert kept(apply_min_p(logits, torch.tensor([0.5]))) == [0, 1]  # >= 0.25
    assert kept(apply_min_p(logits, torch.tensor([0.2]))) == [0, 1, 2]  # >= 0.1
    shuffled = logits[:, [2, 0, 3, 1]]  # positions must follow the tokens, not the sort order
    assert kept(apply_top_k_top_p(shuffled, torch.tensor([2]), None)) == [1, 3]


def test_sampled_tokens_stay_inside_the_truncated_set(runner):
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (VOCAB - 4)) + 1e-4
    logits = probs.log().repeat(400, 1)
    requests = [request(f"r{i}", top_p=0.6, temperature=1.0) for i in range(200)]
    requests += [request(f"m{i}", min_p=0.6, temperature=1.0) for i in range(200)]
    out = sample(runner, requests, logits).sampled_token_ids
    assert set(out[:200].tolist()) <= {0, 1} and set(out[:200].tolist()) == {0, 1}
    assert set(out[200:].tolist()) == {0, 1}


def test_sampling_frequencies_follow_softmax_of_logits_over_temperature(runner):
    torch.manual_seed(2)
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0] + [-30.0] * (VOCAB - 5))
    num = 20000
    out = sample(runner, [request("r", temperature=0.7)] * num, base.repeat(num, 1)).sampled_token_ids
    expected = torch.softmax(base / 0.7, -1)[:5]
    observed = torch.bincount(out, minlength=VOCAB)[:5].float() / num
    assert torch.allclose(observed, expected, atol=0.015), (observed, expected)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_seeded_request_gets_the_same_tokens_whatever_its_batch(device):
    def run(batch_builder, steps=5):
        seeded = request("seeded", temperature=1.0, seed=1234)
        local = ModelRunner(tiny_backend(device), num_kv_blocks=1, block_size=1, eos_token_ids=EOS_TOKEN_IDS)
        tokens = []
        for step in range(steps):
            torch.manual_seed(100 + step)  # what the unseeded companions draw varies
            companions = batch_builder(step)
            rows = companions[:1] + [seeded] + companions[1:]
            logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(step)).to(device)
            row = rows.index(seeded)
            logits[row] = torch.linspace(-1, 1, VOCAB)  # the seeded row's logits are the same each time
            out = Sampler()(logits, local.sampling_tensors(rows))
            tokens.append(out.sampled_token_ids[row].item())
        return tokens

    alone = run(lambda step: [])
    crowded = run(lambda step: [request(f"c{step}-{i}", temperature=1.0) for i in range(3)])
    other_seeds = run(lambda step: [request(f"s{i}", temperature=0.8, seed=i) for i in range(2)])
    assert alone == crowded == other_seeds
    assert len(set(alone)) > 1  # the generator advances between steps
    different = ModelRunner(tiny_backend(device), 1, 1, EOS_TOKEN_IDS)
    flat = torch.linspace(-1, 1, VOCAB, device=device).repeat(1, 1)
    draws = [Sampler()(flat.clone(), different.sampling_tensors([request("seeded", seed=99)])).sampled_token_ids.item()
             for _ in range(5)]
    assert draws != alone


def naive_penalties(logits, prompt, output, presence, frequency, repetition):
    result = logits.clone()
    for token in set(prompt) | set(output):
        value = result[token].item()
        result[token] = value / repetition if value > 0 else value * repetition
    for token in set(output):
        result[token] -= frequency * output.count(token) + presence
    return result


def test_penalties_match_a_naive_reference(runner):
    torch.manual_seed(3)
    logits = torch.randn(3, VOCAB) * 3
    cases = [
        dict(
            prompt=[1, 2, 2, 7],
            output=[7, 7, 9, 1, 30],
            presence_penalty=0.5,
            frequency_penalty=0.3,
            repetition_penalty=1.3,
        ),
        dict(prompt=[4], output=[], presence_penalty=-0.4, frequency_penalty=1.0, repetition_penalty=0.8),
        dict(prompt=[5, 6], output=[6, 6, 6], presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0),
    ]
    requests = [request(f"r{i}", prompt=c["prompt"], output=c["output"], presence_penalty=c["presence_penalty"],
                        frequency_penalty=c["frequency_penalty"], repetition_penalty=c["repetition_penalty"])
                for i, c in enumerate(cases)]
    got = apply_penalties(logits.clone(), runner.sampling_tensors(requests))
    for row, c in enumerate(cases):
        want = naive_penalties(logits[row], c["prompt"], c["output"], c["presence_penalty"], c["frequency_penalty"],
                               c["repetition_penalty"])
        assert torch.allclose(got[row], want, atol=1e-5)


def test_min_tokens_masks_eos_and_stop_ids_until_reached(runner):
    logits = torch.zeros(3, VOCAB)
    logits[:, 0] = 10.0  # EOS is by far the most likely
    logits[:, 5] = 9.0  # then a stop id
    requests = [
        request("young", output=[], temperature=0.0, min_tokens=2, stop_token_ids=[5]),
        request("grown", output=[8, 8], temperature=0.0, min_tokens=2, stop_token_ids=[5]),
        request("ignore", output=[], temperature=0.0, min_tokens=2, ignore_eos=True),
    ]
    out = sample(runner, requests, logits).sampled_token_ids.tolist()
    assert out[0] not in (0, 5) and out[1] == 0 and out[2] == 0  # ignore_eos: EOS is an ordinary token


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("logprobs_mode", ["raw_logprobs", "processed_logprobs"])
def test_logprobs_are_log_softmax_of_the_model_or_after_penalties_and_temperature(device, logprobs_mode):
    runner = ModelRunner(tiny_backend(device), num_kv_blocks=1, block_size=1, eos_token_ids=EOS_TOKEN_IDS)
    torch.manual_seed(4)
    logits = torch.randn(3, VOCAB, device=device)
    requests = [request("a", temperature=0.5, logprobs=3, logit_bias={7: 3.0}), request("b", temperature=0.0,
                                                                                         logprobs=0),
                request("c", temperature=1.0)]
    out = sample(runner, requests, logits, logprobs_mode)
    if logprobs_mode == "raw_logprobs":  # the model's own distribution: no bias, no temperature
        reference = torch.stack([torch.log_softmax(logits[0], -1), torch.log_softmax(logits[1], -1)])
    else:
        biased = logits[0].clone()
        biased[7] += 3.0
        reference = torch.stack([torch.log_softmax(biased / 0.5, -1), torch.log_softmax(logits[1], -1)])
    assert out.chosen_logprobs is not None and out.top_token_ids is not None and out.top_logprobs is not None
    for row in range(2):
        token = out.sampled_token_ids[row]
        assert out.chosen_logprobs[row].item() == pytest.approx(reference[row, token].item(), abs=1e-5)
    top_values, top_ids = reference[0].topk(3)
    assert out.top_token_ids[0].tolist() == top_ids.tolist()
    assert torch.allclose(out.top_logprobs[0], top_values, atol=1e-5)
    host = runner._to_host(requests, out.tensors())
    assert len(host.logprobs["a"][0].top) == 3 and host.logprobs["b"][0].top == {}
    assert "c" not in host.logprobs
    assert math.isclose(sum(math.exp(v) for v in host.logprobs["a"][0].top.values()),
                        reference[0].exp().topk(3).values.sum().item(), rel_tol=1e-4)
