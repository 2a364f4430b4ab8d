#!/usr/bin/env python
"""Train the tiny model bundled with Inflight (``models/inflight-tiny/``).

The bundled model exists so that the server, the engine builder and the tests
have a real Hugging Face checkpoint to load without network access. It is a
small ``LlamaForCausalLM`` (GQA, RoPE, SwiGLU, tied embeddings) trained from
scratch on CPU in about twenty minutes. It is not instruction-tuned: it writes
text in the style of Python docstrings.

Everything is built offline from material already on the machine:

1. Corpus: the docstrings of the Python standard library. Every ``.py`` file
   under ``sysconfig.get_paths()["stdlib"]`` (minus ``SKIP_DIRS``: test suites,
   idlelib, demos, lib2to3, ``site-packages``) is parsed with :mod:`ast`; module, class and function
   docstrings are collected in sorted path order and de-duplicated. About 2 %
   of them, picked by a hash of their text, are held out for validation.
2. Tokenizer: a byte-level BPE (``tokenizers``) trained on the training
   docstrings, saved as a ``PreTrainedTokenizerFast`` with a chat template.
3. Model: trained on ``<|bos|> docstring <|eos|>`` sequences, packed into
   fixed-length windows, with AdamW and a warmup + cosine schedule, float32,
   one CPU thread by default. Seeded: the same ``--steps`` on the same
   Python (whose stdlib is the corpus) and torch gives bit-identical weights.
   With ``--minutes`` the step count is sized from a short timing probe and
   recorded in training_report.json as the exact ``--steps`` command.
4. Evaluation: mean cross-entropy per token on the held-out docstrings,
   printed beside ln(vocab_size), the loss of a uniform guess.
5. Output: config.json, model.safetensors, tokenizer files,
   generation_config.json and training_report.json in ``--out``.

Usage (from the repository root)::

    python tools/train_bundled_model.py                 # ~20 min time budget
    python tools/train_bundled_model.py --steps 1600    # the bundled run, reproducible
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import random
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models" / "inflight-tiny"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *CHAT_TOKENS]

# Renders [{"role": ..., "content": ...}, ...] as
#   <|bos|><|user|>\nHello<|eos|>\n<|assistant|>\n
# Unknown roles fall back to <|user|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% else %}{{ '<|user|>\\n' }}{% endif %}"
    "{{ message['content'] }}{{ eos_token }}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Directories of the standard library whose docstrings we do not want:
# test suites, GUI demos, vendored third-party packages, bundled wheels.
SKIP_DIRS = {
    "test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages",
    "dist-packages", "ensurepip", "__pycache__", "lib2to3", "pydoc_data",
}

SAMPLE_PROMPT = "Return the number of"


@dataclass
class Corpus:
    """Training and validation docstrings plus where they came from."""

    train: list[str]
    valid: list[str]
    n_files: int
    stdlib: str


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--minutes", type=float, default=20.0,
                   help="training time budget, used when --steps is not given")
    p.add_argument("--steps", type=int, default=None,
                   help="exact number of optimizer steps (reproducible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256, help="training window")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.03, help="warmup fraction")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--valid-percent", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250)
    return p


def retrain_command(args: argparse.Namespace, steps: int) -> str:
    """The command line that reproduces this run exactly (non-default flags only)."""
    defaults = build_parser().parse_args([])
    parts = ["python tools/train_bundled_model.py", f"--steps {steps}"]
    for key, value in sorted(vars(args).items()):
        if key in ("steps", "minutes", "log_every", "eval_every") or value == getattr(defaults, key):
            continue
        parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def iter_stdlib_files(stdlib: Path) -> list[Path]:
    """Return the standard library's .py files in a deterministic order."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(Path(dirpath) / name)
    return files


def file_docstrings(path: Path) -> list[str]:
    """Return the module, class and function docstrings of one source file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc.strip()) >= 8:
                docs.append(doc.strip())
    return docs


def is_held_out(text: str, percent: int) -> bool:
    """Deterministically assign a docstring to the validation split."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def build_corpus(valid_percent: int) -> Corpus:
    """Collect, de-duplicate and split the standard library's docstrings."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = iter_stdlib_files(stdlib)
    seen: set[str] = set()
    train: list[str] = []
    valid: list[str] = []
    for path in files:
        for doc in file_docstrings(path):
            if doc in seen:
                continue
            seen.add(doc)
            (valid if is_held_out(doc, valid_percent) else train).append(doc)
    return Corpus(train=train, valid=valid, n_files=len(files), stdlib=str(stdlib))


def train_tokenizer(texts: list[str], vocab_size: int,
                    max_positions: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=CHAT_TOKENS,
        add_bos_token=True,
        add_eos_token=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_positions,
        clean_up_tokenization_spaces=False,
    )


def encode_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """Encode texts as one stream of ``<|bos|> text <|eos|>`` token ids."""
    ids: list[int] = []
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    # The ignores: transformers types the special token ids as any token attribute (str, list, ...); these are ints.
    for doc in encoded:
        ids.append(tokenizer.bos_token_id)  # pyright: ignore[reportArgumentType]
        ids.extend(doc.ids)
        ids.append(tokenizer.eos_token_id)  # pyright: ignore[reportArgumentType]
    return torch.tensor(ids, dtype=torch.long)


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Create a freshly initialized Llama model sized by the CLI flags."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        rope_theta=10000.0,  # pyright: ignore[reportCallIssue]  (these two are **kwargs the stubs leave out)
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",  # pyright: ignore[reportCallIssue]
    )
    return LlamaForCausalLM(config)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, total: int, peak: float, warmup_frac: float, min_ratio: float) -> float:
    """Linear warmup then cosine decay to ``peak * min_ratio``."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Draw ``batch`` random windows of ``seq_len + 1`` tokens from the stream."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int, batch: int = 16) -> float:
    """Mean cross-entropy per predicted token over the whole stream."""
    model.eval()
    windows = [stream[i : i + seq_len + 1] for i in range(0, len(stream) - 1, seq_len)]
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        width = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), width), 0, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for j, w in enumerate(chunk):
            ids[j, : len(w)] = w
            labels[j, : len(w)] = w
        logits = model(input_ids=ids[:, :-1]).logits
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
            ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((targets != -100).sum())
    model.train()
    return total / count


def train_step(model: LlamaForCausalLM, opt: torch.optim.Optimizer,
               batch: torch.Tensor, lr: float) -> float:
    """One optimizer step of next-token prediction on ``batch``; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    logits = model(input_ids=batch[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def calibrate_steps(model: LlamaForCausalLM, stream: torch.Tensor,
                    args: argparse.Namespace) -> int:
    """Time a few steps on a throwaway copy of the model; size the run to --minutes."""
    probe = LlamaForCausalLM(model.config)
    probe.load_state_dict(model.state_dict())
    opt = make_optimizer(probe, args.lr, args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed + 1)
    times = []
    for _ in range(5):
        batch = sample_batch(stream, args.batch_size, args.seq_len, gen)
        start = time.perf_counter()
        train_step(probe, opt, batch, 0.0)
        times.append(time.perf_counter() - start)
    per_step = sorted(times[1:])[2]
    # Keep a few percent of the budget for the periodic held-out evaluations.
    steps = max(10, int(args.minutes * 60 * 0.95 / per_step))
    print(f"calibration: {per_step:.3f} s/step -> {steps} steps for {args.minutes:g} min",
          flush=True)
    return steps


def train(model: LlamaForCausalLM, train_ids: torch.Tensor, valid_ids: torch.Tensor,
          args: argparse.Namespace, total: int) -> dict[str, float | int]:
    """Run ``total`` optimizer steps, logging progress; return summary numbers."""
    opt = make_optimizer(model, args.lr, args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    model.train()
    start = last = time.perf_counter()
    window: list[float] = []
    last_train_loss = math.nan
    for step in range(total):
        batch = sample_batch(train_ids, args.batch_size, args.seq_len, gen)
        lr = lr_at(step, total, args.lr, args.warmup, args.min_lr_ratio)
        window.append(train_step(model, opt, batch, lr))
        done = step + 1
        if done % args.log_every == 0 or done == total:
            now = time.perf_counter()
            n_steps = (done - 1) % args.log_every + 1
            print(f"step {done:5d}/{total}  loss {sum(window) / len(window):.4f}  "
                  f"lr {lr:.2e}  {n_steps * tokens_per_step / (now - last):6.0f} tok/s  "
                  f"elapsed {now - start:6.0f}s", flush=True)
            last_train_loss = sum(window) / len(window)
            window, last = [], now
        if done % args.eval_every == 0 and done != total:
            print(f"  held-out loss {evaluate(model, valid_ids, args.seq_len):.4f}", flush=True)
            last = time.perf_counter()
    wall = time.perf_counter() - start
    return {"steps": total, "train_loss": round(last_train_loss, 4),
            "train_tokens_seen": total * tokens_per_step, "train_seconds": round(wall, 1)}


def save(out: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Write the model, tokenizer and generation config in Hugging Face format."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("pytorch_model.bin", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (out / stale).unlink(missing_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=128,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        top_k=50,
        repetition_penalty=1.1,
    )
    model.save_pretrained(out, safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600
    (out / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    patch_tokenizer_config(out / "tokenizer_config.json")


def patch_tokenizer_config(path: Path) -> None:
    """Make tokenizer_config.json explicit and readable by older transformers too.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and
    ``extra_special_tokens``; 4.x only knows ``PreTrainedTokenizerFast`` and
    ``additional_special_tokens``. Both versions load this form, and the BOS
    behaviour (prepended by tokenizer.json's post-processor) is spelled out.
    """
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = config.pop("extra_special_tokens", CHAT_TOKENS)
    config["add_bos_token"] = True
    config["add_eos_token"] = False
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def dir_size(path: Path) -> int:
    """Total size in bytes of the files directly inside ``path``."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def greedy_sample(out: Path, prompt: str, new_tokens: int = 40) -> str:
    """Reload the saved directory and greedily continue ``prompt``."""
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.eval()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|assistant|>\n"), chat
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(  # pyright: ignore[reportAttributeAccessIssue]  (transformers' stubs)
            **inputs, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0
        )
    return tokenizer.decode(ids[0], skip_special_tokens=True)


def cpu_name() -> str:
    """A human-readable CPU model name, best effort."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(out: Path, report: dict[str, object]) -> None:
    """Write ``training_report.json`` next to the weights."""
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    """Build the corpus and tokenizer, train, evaluate, save and sample."""
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    corpus = build_corpus(args.valid_percent)
    print(f"corpus: {len(corpus.train)} train / {len(corpus.valid)} held-out docstrings "
          f"from {corpus.n_files} files under {corpus.stdlib}", flush=True)
    tokenizer = train_tokenizer(corpus.train, args.vocab_size, args.max_positions)
    train_ids = encode_stream(tokenizer, corpus.train)
    valid_ids = encode_stream(tokenizer, corpus.valid)
    print(f"tokenizer: vocab {len(tokenizer)}; tokens: {len(train_ids)} train, "
          f"{len(valid_ids)} held-out", flush=True)

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {model.config.num_hidden_layers} layers, "
          f"hidden {model.config.hidden_size}", flush=True)
    total = args.steps if args.steps is not None else calibrate_steps(model, train_ids, args)
    stats = train(model, train_ids, valid_ids, args, total)

    held_out = evaluate(model, valid_ids, args.seq_len)
    ln_vocab = math.log(len(tokenizer))
    print(f"held-out loss {held_out:.4f} nats/token (ln(vocab) = {ln_vocab:.4f}, "
          f"perplexity {math.exp(held_out):.1f})", flush=True)

    save(args.out, model, tokenizer)
    sample = greedy_sample(args.out, SAMPLE_PROMPT)
    print(f"greedy sample: {sample!r}")
    report = {
        "command": retrain_command(args, total),
        "corpus": {"source": "Python standard library docstrings (ast.get_docstring)",
                   "python": platform.python_version(),
                   "files": corpus.n_files,
                   "train_docstrings": len(corpus.train),
                   "heldout_docstrings": len(corpus.valid),
                   "train_chars": sum(map(len, corpus.train)),
                   "train_tokens": len(train_ids), "heldout_tokens": len(valid_ids)},
        "model": {"parameters": n_params, "vocab_size": len(tokenizer),
                  "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "kv_heads": args.kv_heads, "intermediate": args.intermediate,
                  "dtype": "float32"},
        "training": {**stats, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "peak_lr": args.lr, "seed": args.seed, "threads": args.threads,
                     "torch": torch.__version__, "cpu": cpu_name()},
        "heldout_loss": round(held_out, 4),
        "ln_vocab": round(ln_vocab, 4),
        "greedy_sample": {"prompt": SAMPLE_PROMPT, "text": sample},
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    write_report(args.out, report)
    print(f"saved {args.out} ({dir_size(args.out) / 1e6:.1f} MB) "
          f"in {report['wall_seconds']:.0f}s total")


if __name__ == "__main__":
    main()
