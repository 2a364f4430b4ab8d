"""Batch-1 (or small-batch) decode speed of the engine itself: CUDA graphs, Triton kernels, greedy on the GPU.

Each step builds its inputs on the host as the server's runner does, replays the decode graph and
reads back the sampled token (one host-device sync per step).

    python -m benchmarks.decode_latency --model benchmarks/configs/llama-3.1-8b --batch-size 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine_builder.arithmetic import ceil_div
from engine_builder.forward_batch import build_forward_batch
from engine_builder.loader import load_engine


def run(model: str, batch_size: int, input_len: int, output_len: int, eager: bool, block_size: int = 16) -> dict:
    engine = load_engine(model, device="cuda", dtype="bfloat16", load_format="dummy", max_seq_len=4096,
                         max_batch_size=max(batch_size, 8), progress=False)
    blocks_per_request = ceil_div(input_len + output_len, block_size)
    kv = engine.backend.allocate_kv_cache(batch_size * blocks_per_request + 1, block_size)
    tables = [list(range(1 + i * blocks_per_request, 1 + (i + 1) * blocks_per_request)) for i in range(batch_size)]
    if not eager:
        engine.backend.capture_cuda_graphs(kv, block_size, max_batch_size=max(batch_size, 8), progress=True)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, engine.config.vocab_size, (batch_size, input_len), generator=generator).tolist()
    logits = engine.backend.forward(
        build_forward_batch(prompts, [0] * batch_size, tables, block_size, device="cuda"), kv
    )
    tokens = logits.argmax(-1).tolist()

    def decode(steps: int, start: int) -> None:
        nonlocal tokens
        for step in range(steps):
            batch = build_forward_batch(
                [[t] for t in tokens], [start + step] * batch_size, tables, block_size, device="cuda"
            )
            tokens = engine.backend.forward(batch, kv).argmax(-1).tolist()

    decode(8, input_len)  # warm-up
    torch.cuda.synchronize()
    begin = time.perf_counter()
    decode(output_len - 8, input_len + 8)
    elapsed = time.perf_counter() - begin
    steps = output_len - 8
    return {"model": model, "batch_size": batch_size, "graphs": not eager, "step_ms": 1e3 * elapsed / steps,
            "tok_s_per_request": steps / elapsed, "output_tok_s": batch_size * steps / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    args = parser.parse_args()
    print(json.dumps(run(args.model, args.batch_size, args.input_len, args.output_len, args.eager)), flush=True)


if __name__ == "__main__":
    main()
