"""logit_bias: +100 forces a token, -100 forbids it, only on the rows that asked, greedy or sampled."""

from typing import Any, cast

import torch

from engine_builder.runtime.backend import ModelBackend
from server.engine.sampling_params import SamplingParams
from server.runner.model_runner import ModelRunner
from server.runner.request_state import RequestState
from server.runner.sampler import Sampler

VOCAB = 40
EOS_TOKEN_IDS = [0]


class TinyBackend:
    """Just what ModelRunner.sampling_tensors needs of a ModelBackend."""

    class config:
        vocab_size = VOCAB

    device = "cpu"

    def allocate_kv_cache(self, num_blocks, block_size):
        return []


def tiny_backend(*args: Any) -> ModelBackend:
    """A TinyBackend where a ModelBackend is expected: it has only what the runner's sampling uses."""
    return cast(ModelBackend, TinyBackend(*args))


def request(request_id, **params):
    return RequestState(request_id, [1, 2, 3], [], SamplingParams(**params), block_ids=[])


def test_bias_forces_and_forbids_tokens_only_on_its_rows():
    runner = ModelRunner(tiny_backend(), num_kv_blocks=1, block_size=1, eos_token_ids=EOS_TOKEN_IDS)
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB) * 3
    top = logits.argmax(-1).tolist()
    requests = [
        request("forced-greedy", temperature=0.0, logit_bias={7: 100.0}),
        request("forbidden-greedy", temperature=0.0, logit_bias={top[1]: -100.0}),
        request("forced-sampled", temperature=1.0, logit_bias={11: 100.0, 12: -3.0}),
        request("plain", temperature=0.0),
    ]
    tensors = runner.sampling_tensors(requests)
    for _ in range(50):
        sampled = Sampler()(logits.clone(), tensors).sampled_token_ids.tolist()
        assert sampled[0] == 7 and sampled[2] == 11 and sampled[3] == top[3]
        assert sampled[1] != top[1] and sampled[1] == logits[1].topk(2).indices[1].item()


def test_forbidden_tokens_are_never_sampled():
    runner = ModelRunner(tiny_backend(), num_kv_blocks=1, block_size=1, eos_token_ids=EOS_TOKEN_IDS)
    logits = torch.zeros(1, VOCAB)
    logits[0, :3] = 5.0  # three likely tokens, all forbidden
    tensors = runner.sampling_tensors([request("r", temperature=1.0, logit_bias={0: -100.0, 1: -100.0, 2: -100.0})])
    draws = [Sampler()(logits.clone(), tensors).sampled_token_ids.item() for _ in range(200)]
    assert not {0, 1, 2} & set(draws) and len(set(draws)) > 10
