"""Incremental detokenization and stop conditions, against a real byte-level BPE tokenizer's decode."""

import pytest
from transformers import AutoTokenizer

from server.engine.core.detokenizer import IncrementalDetokenizer
from server.engine.sampling_params import SamplingParams

TEXTS = [
    "Return the path of the file, relative to the current directory.",
    "naïve café — déjà vu: 日本語のテキスト and emoji 🎉🚀 in one line",
    "  leading spaces,\ttabs\nand new lines\n\n",
    "🙂",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir), local_files_only=True)


def stream(detokenizer, token_ids):
    """Feed tokens one by one; returns (pieces, finish reason, number of tokens consumed)."""
    pieces = []
    for count, token in enumerate(token_ids, start=1):
        update = detokenizer.add_token(token)
        pieces.append(update.new_text)
        if update.finish_reason is not None:
            return pieces, update.finish_reason, count
    pieces.append(detokenizer.finish())
    return pieces, None, len(token_ids)


def make(tokenizer, prompt="Hello", **params):
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    params.setdefault("max_tokens", 1000)
    return IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(**params), [tokenizer.eos_token_id])


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode_and_never_shows_a_broken_character(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, reason, _ = stream(make(tokenizer), ids)
    assert reason is None
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_multibyte_characters_split_over_tokens_are_emitted_whole(tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1, "the test tokenizer should split an emoji into byte tokens"
    pieces, _, _ = stream(make(tokenizer), ids)
    assert [p for p in pieces if p] == ["🎉"]


def test_stop_string_is_cut_and_no_part_of_it_is_ever_emitted(tokenizer):
    text = "It returns the path of the file relative to the directory."
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = make(tokenizer, stop=["of the file"])
    pieces, reason, consumed = stream(detokenizer, ids)
    assert reason == "stop"
    assert "".join(pieces) == "It returns the path "
    for i in range(len(pieces)):  # at no point did the stream show the start of the stop string
        assert not "".join(pieces[: i + 1]).endswith(("o", "of", "of ", "of t"))
    assert tokenizer.decode(ids[:consumed]).endswith("of the file")  # it stopped on the completing token
    assert tokenizer.decode(ids[: consumed - 1]).find("of the file") == -1


def test_held_back_text_is_released_when_the_stop_string_does_not_follow(tokenizer):
    text = "one stop short of a stopper, then more"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, reason, _ = stream(make(tokenizer, stop=["stopped", "the end"]), ids)
    assert reason is None and "".join(pieces) == text


def test_earliest_of_several_stop_strings_wins(tokenizer):
    text = "alpha beta gamma delta"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, reason, _ = stream(make(tokenizer, stop=["delta", "beta g"]), ids)
    assert reason == "stop" and "".join(pieces) == "alpha "


def test_stop_string_inside_one_token_cuts_mid_token(tokenizer):
    text = "the directory is here"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, reason, _ = stream(make(tokenizer, stop=["rect"]), ids)
    assert reason == "stop" and "".join(pieces) == "the di"


def test_eos_stops_without_text_unless_ignored_or_before_min_tokens(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("some text", add_special_tokens=False)
    pieces, reason, consumed = stream(make(tokenizer), ids + [eos] + ids)
    assert reason == "stop" and consumed == len(ids) + 1 and "".join(pieces) == "some text"
    pieces, reason, _ = stream(make(tokenizer, ignore_eos=True), ids + [eos] + ids)
    assert reason is None and "".join(pieces) == "some textsome text"
    _, reason, consumed = stream(make(tokenizer, min_tokens=2), [eos, eos, ids[0], eos])
    assert reason == "stop" and consumed == 4  # EOS counts only after min_tokens tokens


def test_stop_token_ids_and_max_tokens(tokenizer):
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)
    _, reason, consumed = stream(make(tokenizer, stop_token_ids=[ids[2]]), ids)
    assert reason == "stop" and consumed == 3
    pieces, reason, consumed = stream(make(tokenizer, max_tokens=3), ids)
    assert reason == "length" and consumed == 3
    assert "".join(pieces) == tokenizer.decode(ids[:3])


def test_length_finish_releases_text_held_for_a_possible_stop_string(tokenizer):
    ids = tokenizer.encode("wait for it", add_special_tokens=False)
    pieces, reason, _ = stream(make(tokenizer, max_tokens=len(ids), stop=["it is"]), ids)
    assert reason == "length" and "".join(pieces) == "wait for it"


def test_no_tokenizer_gives_no_text_but_still_stops(tokenizer):
    detokenizer = IncrementalDetokenizer(None, [1, 2], SamplingParams(max_tokens=3, stop_token_ids=[9]), [])
    assert [detokenizer.add_token(t).finish_reason for t in (5, 9)] == [None, "stop"]


def test_text_flushed_at_the_end_is_still_cut_at_a_stop_string():
    """A request ending by length right after a token holding a partial character: the flushed text is
    searched for stop strings too (a stop string is never emitted)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from server.engine.core.detokenizer import IncrementalDetokenizer
    from server.engine.sampling_params import SamplingParams

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=259, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    backend.train_from_iterator(["a \N{EM DASH}" * 200, "a \N{EN DASH}" * 200], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", clean_up_tokenization_spaces=False)
    ids = tokenizer.encode("a \N{EM DASH}", add_special_tokens=False)
    assert len(ids) >= 2 and tokenizer.decode(ids[:2]).endswith("\ufffd")  # pyright: ignore[reportAttributeAccessIssue]  # the 2nd token ends mid-character
    detokenizer = IncrementalDetokenizer(tokenizer, [0], SamplingParams(max_tokens=2, stop=["a "]), [], None)
    text, reason = "", None
    for token in ids[:2]:
        update = detokenizer.add_token(token)
        text += update.new_text
        reason = update.finish_reason or reason
    assert "a " not in text and reason == "stop"
