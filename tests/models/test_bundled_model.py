"""The bundled model: a real Hugging Face checkpoint that transformers loads unchanged and our engine serves."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import transformers

from engine_builder.forward_batch import build_forward_batch
from engine_builder.loader import load_engine

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "inflight-tiny"


def test_files_and_size():
    names = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert names <= {p.name for p in BUNDLED.iterdir()}
    assert sum(p.stat().st_size for p in BUNDLED.iterdir()) <= 25 * 1024 * 1024


def test_transformers_loads_it_and_it_writes_english_like_text():
    tokenizer = transformers.AutoTokenizer.from_pretrained(BUNDLED)
    model = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED).eval()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does len return?"}], add_generation_prompt=True, tokenize=False
    )
    assert "What does len return?" in chat and chat.rstrip().endswith("<|assistant|>")
    # A docstring-like sentence it has not seen verbatim is far more likely than a uniform guess.
    sentence = "Return a list of the lines in the string, breaking at line boundaries."
    ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 0.6 * math.log(tokenizer.vocab_size), f"loss {loss:.2f} vs uniform {math.log(tokenizer.vocab_size):.2f}"
    prompt = tokenizer("Return the number of", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=40, do_sample=False)  # pyright: ignore[reportAttributeAccessIssue]  (transformers' stubs)
    text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    words = re.findall(r"\S+", text)
    wordlike = [w for w in words if re.fullmatch(r"[A-Za-z]+[.,:;]?", w)]
    assert len(words) >= 10 and len(wordlike) / len(words) >= 0.8, text


def test_engine_greedy_matches_transformers_on_the_bundled_model():
    tokenizer = transformers.AutoTokenizer.from_pretrained(BUNDLED)
    model = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED).eval()
    engine = load_engine(BUNDLED, device="cpu", progress=False)
    prompt = tokenizer("Open the file and return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(  # pyright: ignore[reportAttributeAccessIssue]  (transformers' stubs)
            prompt, max_new_tokens=30, do_sample=False, repetition_penalty=1.0, eos_token_id=None
        )[0, prompt.shape[1] :].tolist()
    kv = engine.backend.allocate_kv_cache(8, 16)
    pending, cached, generated = prompt[0].tolist(), 0, []
    for _ in range(30):
        batch = build_forward_batch([pending], [cached], [[5, 0, 3, 6]], 16)
        token = int(engine.backend.forward(batch, kv).argmax(-1))
        cached += len(pending)
        pending = [token]
        generated.append(token)
    assert generated == expected
