"""Offline throughput: N requests of random token ids with fixed input/output lengths (ignore_eos),
all submitted at once to the engine core (scheduler + KV cache + runner), stepped until done.

    python -m benchmarks.throughput --model benchmarks/configs/llama-3.1-8b --load-format dummy \
        --num-requests 512 --input-len 128 --output-len 128 [--tensor-parallel-size 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from engine_builder.loader import load_engine
from server.engine.core.engine_core import EngineCore
from server.engine.engine_config import EngineConfig
from server.engine.sampling_params import SamplingParams


def start_core(args: argparse.Namespace, config: EngineConfig) -> EngineCore:
    """The engine core over the model: in this process, or as rank 0 of --tensor-parallel-size ranks."""
    limits = {"max_seq_len": args.input_len + args.output_len + 16, "max_batch_size": args.max_num_seqs,
              "max_num_tokens": max(args.max_num_batched_tokens, args.max_num_seqs)}
    if args.tensor_parallel_size == 1:
        engine = load_engine(args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
                             progress=False, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                             **limits)
        return EngineCore(engine, config)
    from server.engine.core_args import CoreArgs, EngineLoadArgs
    from server.engine.parallel_config import ParallelConfig
    from server.runner.multiproc_executor import start_tensor_parallel

    load = EngineLoadArgs(model=args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
                          **limits)
    engine, executor = start_tensor_parallel(CoreArgs(
        load=load, config=config, log_level="warning",
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size)))
    return EngineCore(engine, config, executor=executor)


def run(args: argparse.Namespace) -> dict:
    config = EngineConfig(
        block_size=16, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_queued_requests=max(args.num_requests, 1), enforce_eager=args.enforce_eager,
        async_scheduling=not args.no_async_scheduling,
    )
    core = start_core(args, config)
    engine = core.engine
    generator = torch.Generator().manual_seed(0)
    num_warmup = min(args.num_requests, 8)
    prompts = torch.randint(  # the warm-up's prompts are its own: the prefix cache holds none of the measured ones
        0, engine.config.vocab_size, (args.num_requests + num_warmup, args.input_len), generator=generator
    ).tolist()
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    def drain(count: int, tag: str, first: int = 0) -> tuple[float, float, int]:
        """Run `count` requests (prompts from `first` on) to the end; (seconds, seconds until the first token, tokens
        generated)."""
        for i in range(count):
            core.add_request(f"{tag}-{i}", prompts[first + i], params)
        start = time.perf_counter()
        first_token = None
        generated = 0
        while core.has_unfinished_requests:
            generated += sum(len(o.new_token_ids) for o in core.step())
            if first_token is None and generated:
                first_token = time.perf_counter() - start
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, first_token or 0.0, generated

    drain(num_warmup, "warmup", first=args.num_requests)
    if args.second_pass:  # the measured prompts once before: the run measures them through the prefix cache
        drain(args.num_requests, "first-pass")
    elapsed, first_token, generated = drain(args.num_requests, "bench")
    total = generated + args.num_requests * args.input_len
    decode = {}
    if args.num_requests == 1 and generated > 1:  # one request: its decode rate, the prompt's step excluded (1 / TPOT)
        decode = {"ttft_s": round(first_token, 4), "decode_tok_s": round((generated - 1) / (elapsed - first_token), 1)}
    return {
        **decode,
        "benchmark": "inflight offline throughput",
        "model": args.model,
        "num_requests": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "seconds": round(elapsed, 3),
        "output_tokens": generated,
        "output_tok_s": round(generated / elapsed, 1),
        "total_tok_s": round(total / elapsed, 1),
        "device": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
        "num_kv_blocks": core.num_kv_blocks,
        "preemptions": core.scheduler.num_preemptions_total,
        "cuda_graphs": core.executor.uses_cuda_graphs,
        "async_scheduling": config.async_scheduling,
        "second_pass": args.second_pass,
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "tensor_parallel_size": args.tensor_parallel_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="engine dir, checkpoint dir, or a config-only dir with --load-format dummy"
    )
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--quantization", default="none", choices=["none", "fp8"],
                        help="fp8: the linears quantized to FP8 while loading (one process only)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="fp8: K/V stored as float8_e4m3fn, twice the tokens per GiB (one process only)")
    parser.add_argument("--second-pass", action="store_true",
                        help="run the measured prompts once first, so that they are measured through the prefix cache")
    parser.add_argument("--no-async-scheduling", action="store_true", help="collect each step before planning the next")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="ranks (GPUs) to split the model over")
    args = parser.parse_args()
    if args.tensor_parallel_size > 1:
        import logging

        from server.log import configure_logging

        configure_logging("warning")
        logging.getLogger("server.runner").setLevel(logging.INFO)  # the ranks' start, weights per rank, KV pool
    result = run(args)
    print(json.dumps(result), flush=True)
    sys.stdout.flush()
    if args.tensor_parallel_size > 1:  # end the worker processes before exiting
        from server.process_exit import exit_now

        exit_now(0)


if __name__ == "__main__":
    main()
