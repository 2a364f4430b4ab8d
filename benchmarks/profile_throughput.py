"""Where the offline throughput run spends its time: per step, launching (batch inputs, queuing the forward
pass and sampling), waiting for the GPU (the one host sync), and the engine's other host work (scheduling,
detokenizing, outputs), split into steps with prompt tokens and pure decode steps. With async scheduling
the wait is what is left of the GPU's time after the host's work for the next step. On CUDA, each launch is
bracketed by two events on the stream: their distance is the GPU's time for that step's work (`decode_gpu_ms`);
a step is host-bound when its wall time exceeds it (the GPU idled between steps).

    python -m benchmarks.profile_throughput --model benchmarks/configs/llama-3.1-8b --num-requests 512
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine_builder.loader import load_engine
from server.engine.core.engine_core import EngineCore
from server.engine.engine_config import EngineConfig
from server.engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--no-async-scheduling", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quantization", default="none", choices=["none", "fp8"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument("--max-num-seqs", type=int, default=256)
    args = parser.parse_args()
    engine = load_engine(args.model, device=args.device, dtype="bfloat16", load_format="dummy",
                         max_seq_len=args.input_len + args.output_len + 16, max_batch_size=args.max_num_seqs,
                         max_num_tokens=args.max_num_batched_tokens, progress=False,
                         quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    core = EngineCore(engine, EngineConfig(max_num_seqs=args.max_num_seqs,
                                           max_num_batched_tokens=args.max_num_batched_tokens,
                                           max_queued_requests=args.num_requests,
                                           async_scheduling=not args.no_async_scheduling))
    seconds = {"launch": 0.0, "wait": 0.0}  # of the current step
    launch, collect = core.executor.launch, core.executor.collect

    def timed(name, function):
        def wrapper(*call_args):
            start = time.perf_counter()
            result = function(*call_args)
            seconds[name] += time.perf_counter() - start
            return result
        return wrapper

    gpu_spans: list[tuple[int, int, object, object]] = []  # (rows, tokens, start, end events) per launch

    def launch_and_bracket(plan):
        if not torch.cuda.is_available() or args.device == "cpu":
            return launch(plan)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        result = launch(plan)
        end.record()
        gpu_spans.append((plan.num_rows, plan.num_batched_tokens, begin, end))
        return result

    # The ignore: the benchmark wraps the executor's methods in timers (a measuring seam, not a new signature).
    core.executor.launch, core.executor.collect = timed("launch", launch_and_bracket), timed("wait", collect)  # pyright: ignore[reportAttributeAccessIssue]
    prompts = torch.randint(0, engine.config.vocab_size, (args.num_requests, args.input_len)).tolist()
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i in range(8):
        core.add_request(f"w{i}", prompts[i % len(prompts)], params)
    while core.has_unfinished_requests:
        core.step()
    for i, prompt in enumerate(prompts):
        core.add_request(str(i), prompt, params)
    gpu_spans.clear()
    steps = []
    start = time.perf_counter()
    while core.has_unfinished_requests:
        seconds.update(launch=0.0, wait=0.0)
        step_start = time.perf_counter()
        outputs = core.step()
        steps.append((time.perf_counter() - step_start, seconds["launch"], seconds["wait"], len(outputs)))
    total = time.perf_counter() - start
    decode = [s for s in steps if s[3] >= min(200, args.num_requests) and s[0] < 0.05]
    other = [s for s in steps if s not in decode]

    if gpu_spans:
        torch.cuda.synchronize()
    gpu_decode = [begin.elapsed_time(end) for rows, tokens, begin, end in gpu_spans  # pyright: ignore[reportAttributeAccessIssue]
                  if rows >= min(200, args.num_requests) and tokens == rows]  # pure decode steps, median below

    def mean_ms(rows, column):
        return round(1e3 * sum(row[column] for row in rows) / max(len(rows), 1), 2)

    summary = {
        "async_scheduling": core.config.async_scheduling,
        "total_s": round(total, 3),
        "steps": len(steps),
        "output_tokens": sum(s[3] for s in steps),
        "decode_steps": len(decode),
        "decode_step_ms": mean_ms(decode, 0),
        "decode_launch_ms": mean_ms(decode, 1),
        "decode_wait_ms": mean_ms(decode, 2),
        "decode_other_host_ms": round(mean_ms(decode, 0) - mean_ms(decode, 1) - mean_ms(decode, 2), 2),
        "decode_gpu_ms": round(sorted(gpu_decode)[len(gpu_decode) // 2], 2) if gpu_decode else None,
        "other_steps": len(other),
        "other_steps_s": round(sum(s[0] for s in other), 3),
        "preemptions": core.scheduler.num_preemptions_total,
        "num_kv_blocks": core.num_kv_blocks,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
