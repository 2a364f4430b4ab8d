"""Where the offline throughput run spends its time: per step, the runner (batch inputs, forward, sampling,
the one host sync) versus the engine's host work (scheduling, detokenizing, outputs), split into steps
with prompt tokens and pure decode steps.

    python -m benchmarks.profile_throughput --model benchmarks/configs/llama-3.1-8b --num-requests 512
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine_builder.runtime import load_engine
from server.engine.engine_config import EngineConfig
from server.engine.engine_core import EngineCore
from server.engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = parser.parse_args()
    engine = load_engine(args.model, device="cuda", dtype="bfloat16", load_format="dummy",
                         max_seq_len=args.input_len + args.output_len + 16, max_batch_size=256,
                         max_num_tokens=args.max_num_batched_tokens, progress=False)
    core = EngineCore(engine, EngineConfig(max_num_seqs=256, max_num_batched_tokens=args.max_num_batched_tokens,
                                           max_queued_requests=args.num_requests))
    runner_seconds: list[float] = []
    execute = core.runner.execute

    def timed_execute(output):
        start = time.perf_counter()
        result = execute(output)
        runner_seconds.append(time.perf_counter() - start)
        return result

    core.runner.execute = timed_execute
    prompts = torch.randint(0, engine.config.vocab_size, (args.num_requests, args.input_len)).tolist()
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i in range(8):
        core.add_request(f"w{i}", prompts[i], params)
    while core.has_unfinished_requests:
        core.step()
    runner_seconds.clear()
    for i, prompt in enumerate(prompts):
        core.add_request(str(i), prompt, params)
    steps = []
    start = time.perf_counter()
    while core.has_unfinished_requests:
        step_start = time.perf_counter()
        outputs = core.step()
        steps.append((time.perf_counter() - step_start, runner_seconds[-1], len(outputs)))
    total = time.perf_counter() - start
    tokens = [s[2] for s in steps]
    decode = [s for s in steps if s[2] >= 200 and s[1] < 0.05]
    other = [s for s in steps if s not in decode]
    summary = {
        "total_s": round(total, 3), "steps": len(steps), "output_tokens": sum(tokens),
        "decode_steps": len(decode),
        "decode_step_ms": round(1e3 * sum(s[0] for s in decode) / max(len(decode), 1), 2),
        "decode_runner_ms": round(1e3 * sum(s[1] for s in decode) / max(len(decode), 1), 2),
        "other_steps": len(other), "other_steps_s": round(sum(s[0] for s in other), 3),
        "other_runner_s": round(sum(s[1] for s in other), 3),
        "preemptions": core.scheduler.num_preemptions_total, "num_kv_blocks": core.num_kv_blocks,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
