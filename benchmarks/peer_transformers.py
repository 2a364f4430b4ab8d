"""The peer: the same offline workload through transformers on the same card.

- `generate_batch` (transformers' continuous batching with paged attention), default config;
- batch-1 `generate`, plain and with cache_implementation="static" (which compiles the forward).

    python -m benchmarks.peer_transformers --model benchmarks/configs/llama-3.1-8b --num-requests 512 \
        --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import transformers


def random_model(config_dir: str) -> transformers.PreTrainedModel:
    """Random bf16 weights on the GPU from config.json alone (no download)."""
    config = transformers.AutoConfig.from_pretrained(config_dir)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def random_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num, length), generator=generator).tolist()


def bench_generate_batch(model, prompts: list[list[int]], output_len: int) -> dict:
    config = transformers.GenerationConfig(
        max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    model.generate_batch(prompts[:8], generation_config=config)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = model.generate_batch(prompts, generation_config=config)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    generated = sum(len(r.generated_tokens) for r in results.values())
    return {"peer": "transformers generate_batch", "requests": len(prompts), "seconds": elapsed,
            "output_tokens": generated, "output_tok_s": generated / elapsed}


def bench_batch1(model, prompt: list[int], output_len: int, static: bool) -> dict:
    kwargs: dict[str, Any] = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    ids = torch.tensor([prompt], device="cuda")
    for _ in range(2 if static else 1):  # static: first calls compile
        model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    generated = out.shape[1] - len(prompt)
    name = "transformers generate batch-1" + (" static cache (compiled)" if static else "")
    return {"peer": name, "seconds": elapsed, "output_tokens": generated, "output_tok_s": generated / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="directory with config.json")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--skip-batch1", action="store_true")
    parser.add_argument("--no-static", action="store_true", help="skip the compiled static-cache batch-1 run")
    args = parser.parse_args()
    model = random_model(args.model)
    prompts = random_prompts(args.num_requests, args.input_len, model.config.vocab_size)
    results = []
    if not args.skip_batch:
        results.append(bench_generate_batch(model, prompts, args.output_len))
        print(json.dumps(results[-1]), flush=True)
    if not args.skip_batch1:
        for static in ([False] if args.no_static else [False, True]):
            try:
                results.append(bench_batch1(model, prompts[0], args.output_len, static))
            except Exception as error:  # a peer failure is reported, not fatal to the suite
                results.append({"peer": f"batch-1 static={static}", "error": repr(error)[:300]})
            print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
