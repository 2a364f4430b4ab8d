"""Prefix caching on vs off, offline on the engine core, the same requests in the same process.

    python -m benchmarks.prefix_caching --model benchmarks/configs/llama-3.1-8b --load-format dummy \
        [--workload shared|chat|both] [--quick]

Workloads (random token ids, ignore_eos, greedy):
- shared: 256 requests, each a 2,048-token shared system prompt + 64 unique tokens, 128 output tokens, all
  submitted at once.
- chat: 64 conversations of 4 turns; every turn resends the whole history (earlier prompts and replies) plus 64
  new user tokens, 128 output tokens; a conversation's next turn is sent when its reply has finished.

Each prints one JSON line per (workload, cache on/off): output tok/s, TTFT p50/p99 (arrival to first token),
prompt tokens looked up and found in the cache.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from engine_builder.loader import load_engine
from server.engine.core.engine_core import EngineCore
from server.engine.engine_config import EngineConfig
from server.engine.sampling_params import SamplingParams
from server.engine.stats import FinishedRequestStats, StepStats


@dataclass(slots=True)
class Counts:
    """A StatsSink that adds up the prefix cache's queries and hits."""

    queries: int = 0
    hits: int = 0

    def record_state(self, *values: int) -> None:
        pass

    def record_step(self, stats: StepStats) -> None:
        self.queries += stats.num_prefix_queries
        self.hits += stats.num_prefix_hits

    def record_finished(self, stats: FinishedRequestStats) -> None:
        pass

    def record_step_failure(self) -> None:
        pass


@dataclass(slots=True)
class Conversation:
    """One chat: its history so far and the turns left."""

    history: list[int]
    turns_left: int
    arrivals: dict[str, float] = field(default_factory=dict)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_workload(core: EngineCore, workload: str, args: argparse.Namespace, vocab: int) -> dict:
    """Run one workload to the end; its throughput and first-token times."""
    rng = random.Random(0)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(count)]

    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    arrivals: dict[str, float] = {}
    first_tokens: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    conversations: dict[str, Conversation] = {}
    start = time.perf_counter()

    def submit(request_id: str, prompt: list[int]) -> None:
        arrivals[request_id] = time.perf_counter()
        outputs[request_id] = []
        core.add_request(request_id, prompt, params)

    if workload == "shared":
        system = tokens(args.shared_len)
        for i in range(args.num_requests):
            submit(f"shared-{i}", system + tokens(args.unique_len))
    else:
        for i in range(args.num_conversations):
            conversation = Conversation(history=tokens(args.unique_len), turns_left=args.num_turns - 1)
            conversations[f"chat-{i}"] = conversation
            submit(f"chat-{i}-turn-0", list(conversation.history))
    generated = 0
    while core.has_unfinished_requests:
        for output in core.step():
            now = time.perf_counter()
            generated += len(output.new_token_ids)
            outputs[output.request_id] += output.new_token_ids
            if output.new_token_ids and output.request_id not in first_tokens:
                first_tokens[output.request_id] = now - arrivals[output.request_id]
            if output.finished and workload == "chat":
                name, turn = output.request_id.rsplit("-turn-", 1)
                conversation = conversations[name]
                conversation.history += outputs[output.request_id]
                if conversation.turns_left:
                    conversation.turns_left -= 1
                    conversation.history += tokens(args.unique_len)
                    submit(f"{name}-turn-{int(turn) + 1}", list(conversation.history))
    if torch.device(core.engine.device).type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    ttft = list(first_tokens.values())
    return {
        "seconds": round(elapsed, 2),
        "requests": len(arrivals),
        "output_tokens": generated,
        "output_tok_s": round(generated / elapsed, 1),
        "ttft_p50_s": round(statistics.median(ttft), 4),
        "ttft_p99_s": round(percentile(ttft, 0.99), 4),
        "preemptions": core.scheduler.num_preemptions_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workload", default="both", choices=["shared", "chat", "both"])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--shared-len", type=int, default=2048)
    parser.add_argument("--unique-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-conversations", type=int, default=64)
    parser.add_argument("--num-turns", type=int, default=4)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="a small run (CPU, the bundled model): sizes / 8")
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.shared_len, args.unique_len, args.output_len = 32, 256, 16, 16
        args.num_conversations, args.max_num_seqs, args.max_num_batched_tokens = 8, 32, 1024
    longest = args.shared_len + args.unique_len + args.output_len
    longest = max(longest, args.num_turns * (args.unique_len + args.output_len))
    engine = load_engine(args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
                         progress=False, max_seq_len=longest + 16, max_batch_size=args.max_num_seqs,
                         max_num_tokens=max(args.max_num_batched_tokens, args.max_num_seqs))
    device = torch.cuda.get_device_name() if torch.device(engine.device).type == "cuda" else "cpu"
    workloads = ["shared", "chat"] if args.workload == "both" else [args.workload]
    for workload in workloads:
        for caching in (False, True):
            counts = Counts()
            config = EngineConfig(block_size=16, max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_queued_requests=max(args.num_requests, args.num_conversations) + 1,
                                  enable_prefix_caching=caching)
            core = EngineCore(engine, config, metrics=counts)  # type: ignore[arg-type]
            result = run_workload(core, workload, args, engine.config.vocab_size)
            print(json.dumps({"benchmark": "inflight prefix caching", "workload": workload, "prefix_caching": caching,
                              **result, "prefix_queries": counts.queries, "prefix_hits": counts.hits,
                              "model": str(args.model), "device": device}), flush=True)
            core.executor.shutdown()
            del core
            if torch.device(engine.device).type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
