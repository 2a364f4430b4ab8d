"""Where a decode step's time goes: graph replay alone vs the whole step, and the kernels of one eager step.

    python -m benchmarks.profile_step --model benchmarks/configs/llama-3.2-1b --batch-size 1
    python -m benchmarks.profile_step --model benchmarks/configs/llama-3.1-8b --batch-size 4 --prompt-len 2048

With --prompt-len the step is a prefill of that many new tokens per request (eager, as the engine runs prompts):
its time and kernels only.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from engine_builder.arithmetic import ceil_div
from engine_builder.forward_batch import build_forward_batch
from engine_builder.loader import load_engine
from engine_builder.runtime.torch_backend import TorchBackend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--context", type=int, default=192)
    parser.add_argument("--quantization", default="none", choices=["none", "fp8"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument("--prompt-len", type=int, default=0, help="profile a prefill step of this many new tokens")
    args = parser.parse_args()
    block_size, batch_size = 16, args.batch_size
    engine = load_engine(args.model, device="cuda", dtype="bfloat16", load_format="dummy", max_seq_len=4096,
                         max_batch_size=max(8, batch_size), progress=False,
                         quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    new_tokens = max(1, args.prompt_len)
    per_request = ceil_div(args.context + new_tokens, block_size)
    kv = engine.backend.allocate_kv_cache(batch_size * per_request + 1, block_size)
    tables = [list(range(1 + i * per_request, 1 + (i + 1) * per_request)) for i in range(batch_size)]
    batch = build_forward_batch([[5] * new_tokens] * batch_size, [args.context] * batch_size, tables, block_size,
                                device="cuda")

    def timed(fn, repeats=200) -> float:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - start) / repeats

    eager_ms = timed(lambda: engine.backend.forward(batch, kv), 50)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.backend.forward(batch, kv)
        torch.cuda.synchronize()
    if args.prompt_len:
        tokens = batch_size * new_tokens
        print(f"{args.model} prefill {batch_size} x {new_tokens} tokens after {args.context}: {eager_ms:.3f} ms "
              f"({tokens / eager_ms:.0f} tokens/ms)")
        print_kernels(prof)
        return
    engine.backend.capture_cuda_graphs(kv, block_size, max_batch_size=max(8, batch_size), progress=False)
    assert isinstance(engine.backend, TorchBackend), "CUDA graphs are the torch backend's"
    graphs = engine.backend.graphs
    assert graphs is not None, "captured just above"
    bucket = next(b for b in graphs.buckets if b >= batch_size)
    engine.backend.forward(batch, kv)  # fills the graph's static inputs with this batch, so the replays below attend
    replay_ms = timed(lambda: graphs.graphs[bucket].replay())
    run_ms = timed(lambda: engine.backend.forward(batch, kv))

    def full_step():
        step = build_forward_batch([[5]] * batch_size, [args.context] * batch_size, tables, block_size, device="cuda")
        engine.backend.forward(step, kv).argmax(-1).tolist()

    step_ms = timed(full_step)
    print(f"{args.model} batch {batch_size}: graph replay {replay_ms:.3f} ms | + input copies {run_ms:.3f} ms"
          f" | + host batch build, argmax, sync {step_ms:.3f} ms | eager {eager_ms:.3f} ms")
    print_kernels(prof)


def print_kernels(prof: profile) -> None:
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in kernels)
    count = sum(e.count for e in kernels)
    print(f"eager step: {count} kernels, {total / 1e3:.3f} ms of kernel time")
    for event in kernels[:12]:
        print(f"  {event.device_time_total / 1e3:8.3f} ms  x{event.count:<4} {event.key[:90]}")


if __name__ == "__main__":
    main()
