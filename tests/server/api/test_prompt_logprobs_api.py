"""Scoring prompts over HTTP, as evaluation harnesses do (echo + logprobs, max_tokens 0, vLLM's prompt_logprobs),
and best_of over sampled candidates, through the official openai client.

References: transformers' log_softmax of the same model's logits (float32, CPU) for every prompt token; for
best_of, the same seeded candidates returned as n choices, ranked by their own logprobs per token.
"""

from typing import Any

import openai
import pytest
import torch

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def server(tiny_server_fn) -> Any:
    running = tiny_server_fn(max_num_batched_tokens=16)  # prompts of 20+ tokens are prefilled in chunks
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def reference_logprobs(hf_model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: transformers' log-distribution of prompt token p + 1 at row p."""
    with torch.no_grad():
        return hf_model(torch.tensor([prompt])).logits[0].float().log_softmax(dim=-1)[:-1]


def check_echoed(logprobs: Any, prompt: list[int], hf_model, num_top: int) -> None:
    """The first len(prompt) entries of a choice's logprobs score the prompt as transformers does."""
    reference = reference_logprobs(hf_model, prompt)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing predicts token 0
    for position in range(1, len(prompt)):
        row = reference[position - 1]
        assert logprobs.token_logprobs[position] == pytest.approx(row[prompt[position]].item(), abs=1e-4)
        top = logprobs.top_logprobs[position]
        assert max(top.values()) == pytest.approx(row.max().item(), abs=1e-4)
        assert len(top) in (num_top, num_top + 1)  # the prompt's own token is listed too when it is not in the top


def test_echo_with_logprobs_scores_token_id_prompts_singly_and_batched(client, hf_model):
    prompts = [[5, 17, 99, 3, 250, 41, 8, 77, 12, 300, 9, 64, 128, 33, 7, 90, 11, 2, 45, 60, 101, 15],
               [9, 44, 120], [6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6]]
    batched = client.completions.create(model=MODEL, prompt=prompts, max_tokens=1, echo=True, logprobs=2,
                                        temperature=0)
    assert [choice.index for choice in batched.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, batched.choices):
        assert choice.logprobs is not None and len(choice.logprobs.tokens) == len(prompt) + 1
        check_echoed(choice.logprobs, prompt, hf_model, 2)
        last = reference_logprobs(hf_model, prompt + [0])[-1]  # the generated token's distribution (greedy)
        assert choice.logprobs.token_logprobs[-1] == pytest.approx(last.max().item(), abs=1e-4)
    single = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=1, echo=True, logprobs=2,
                                       temperature=0)
    alone, together = single.choices[0].logprobs, batched.choices[0].logprobs
    assert alone is not None and alone.tokens == together.tokens and alone.text_offset == together.text_offset
    assert alone.token_logprobs[1:] == pytest.approx(together.token_logprobs[1:], abs=1e-5)  # batching: rounding only


def test_text_prompt_and_max_tokens_zero_return_the_prompt_only(client, hf_model, tokenizer):
    text = "The quick brown fox jumps over the lazy dog, again and again, until the evening"
    response = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1)
    ids = tokenizer.encode(text, split_special_tokens=True)
    choice = response.choices[0]
    assert choice.text == text and choice.finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 0
    assert response.usage.prompt_tokens == len(ids)
    assert choice.logprobs is not None and len(choice.logprobs.tokens) == len(ids)
    check_echoed(choice.logprobs, ids, hf_model, 1)
    # text_offset points into the echoed text: each token's text starts where its offset says
    for token, offset in zip(choice.logprobs.tokens[1:], choice.logprobs.text_offset[1:]):
        assert text.startswith(token, offset), (token, offset)


def test_streamed_echo_with_logprobs_reassembles_to_the_response(client):
    prompt = [5, 17, 99, 3, 250, 41, 8, 77, 12, 300, 9, 64, 128, 33, 7, 90, 11, 2, 45]
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, echo=True, logprobs=3,
                                      temperature=0, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, echo=True, logprobs=3,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    tokens, token_logprobs, text = [], [], ""
    for chunk in chunks:
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            token_logprobs += choice.logprobs.token_logprobs
    assert whole.choices[0].logprobs is not None
    assert text == whole.choices[0].text
    assert tokens == whole.choices[0].logprobs.tokens
    assert token_logprobs == whole.choices[0].logprobs.token_logprobs
    assert chunks[-1].choices[0].finish_reason == "length"


def test_prompt_logprobs_extra_parameter_has_ranks_and_alternatives(client, hf_model):
    prompt = [5, 17, 99, 3, 250, 41, 8, 77, 12, 300, 9, 64, 128, 33, 7, 90, 11]
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                         extra_body={"prompt_logprobs": 3})
    scored = response.choices[0].model_extra["prompt_logprobs"]
    reference = reference_logprobs(hf_model, prompt)
    assert len(scored) == len(prompt) and scored[0] is None
    for position in range(1, len(prompt)):
        entries, row = scored[position], reference[position - 1]
        own = entries[str(prompt[position])]
        assert own["logprob"] == pytest.approx(row[prompt[position]].item(), abs=1e-4)
        assert own["rank"] == int((row > row[prompt[position]]).sum()) + 1
        top_ids = row.topk(3).indices.tolist()
        assert {int(token) for token in entries} == {prompt[position], *top_ids}
        assert entries[str(top_ids[0])]["rank"] == 1
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert "prompt_logprobs" not in (plain.choices[0].model_extra or {})  # only when asked for


def test_best_of_returns_the_candidates_most_likely_per_token(client):
    body: dict[str, Any] = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=11)
    candidates = client.completions.create(n=4, logprobs=0, **body).choices  # the same seeds: seed + candidate
    mean = []
    for candidate in candidates:
        assert candidate.logprobs is not None and candidate.logprobs.token_logprobs
        mean.append(sum(candidate.logprobs.token_logprobs) / len(candidate.logprobs.token_logprobs))
    ranked = sorted(range(4), key=lambda index: -mean[index])
    best = client.completions.create(n=2, best_of=4, **body)
    assert [choice.text for choice in best.choices] == [candidates[index].text for index in ranked[:2]]
    assert [choice.index for choice in best.choices] == [0, 1]
    assert best.choices[0].logprobs is None  # not asked for


def test_bad_scoring_requests_are_400_naming_the_param(client):
    with pytest.raises(openai.BadRequestError, match="echo") as error:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    assert error.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="beam search") as error:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, echo=True, logprobs=1,
                                  extra_body={"use_beam_search": True, "best_of": 2})
    assert error.value.body["param"] == "prompt_logprobs"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="hi", best_of=3, stream=True)
    assert error.value.body["param"] == "best_of"  # type: ignore[index]


def test_chat_prompt_logprobs_score_the_rendered_conversation(client, hf_model, tokenizer):
    messages = [{"role": "user", "content": "Describe the sea in three words"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,  # type: ignore[arg-type]
                                              temperature=0, extra_body={"prompt_logprobs": 1})
    scored = (response.model_extra or {})["prompt_logprobs"]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert response.usage is not None and len(scored) == response.usage.prompt_tokens == len(ids)
    reference = reference_logprobs(hf_model, ids)
    assert scored[0] is None
    for position in range(1, len(ids)):
        own = scored[position][str(ids[position])]
        assert own["logprob"] == pytest.approx(reference[position - 1][ids[position]].item(), abs=1e-4)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=messages, stream=True,  # type: ignore[arg-type]
                                       extra_body={"prompt_logprobs": 1})
    assert error.value.body["param"] == "prompt_logprobs"  # type: ignore[index]
