"""HTTP load generator for any OpenAI-compatible server (ours, vLLM, TensorRT-LLM, SGLang).

Streams /v1/completions requests with random token-id prompts and fixed output lengths (ignore_eos),
either open-loop at --request-rate (Poisson arrivals) or closed-loop at --max-concurrency, and reports
TTFT, TPOT (time per output token after the first), inter-token latency and end-to-end percentiles,
plus output tokens/s.

    python -m benchmarks.serving --base-url http://127.0.0.1:8000 --model NAME --num-requests 512 \
        --input-len 128 --output-len 128 --max-concurrency 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass(slots=True)
class RequestResult:
    """Timings of one streamed request."""

    ok: bool  # the stream completed with a usage chunk
    ttft: float = 0.0  # seconds from send to the first token
    e2e: float = 0.0  # seconds from send to the end of the stream
    output_tokens: int = 0  # completion_tokens from the usage chunk
    chunk_gaps: list[float] = field(default_factory=list)  # seconds between consecutive content chunks
    error: str = ""


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, prompt: list[int]) -> RequestResult:
    body = {
        "model": args.model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.chunk_gaps.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.ok = True
    except httpx.HTTPError as error:
        result.error = repr(error)
    result.e2e = time.perf_counter() - start
    return result


async def run_share(args: argparse.Namespace, prompts: list[list[int]], concurrency: int | None, rate: float,
                    seed: int) -> tuple[list[RequestResult], float, float]:
    """One worker's share: its prompts at its concurrency / its part of the request rate."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency or 1024, max_keepalive_connections=concurrency or 1024)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, timeout=None, limits=limits, headers=headers) as client:
        semaphore = asyncio.Semaphore(concurrency or len(prompts))

        async def limited(prompt):
            async with semaphore:
                return await one_request(client, args, prompt)

        start = time.time()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, start, time.time()


def _worker(job: tuple) -> tuple[list[RequestResult], float, float]:
    return asyncio.run(run_share(*job))


def run(args: argparse.Namespace) -> dict:
    """Split the requests over worker processes (one Python client cannot read thousands of SSE events a
    second), each with its share of the concurrency and of the request rate; merge their timings."""
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(args.vocab_size) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    asyncio.run(run_share(args, [prompts[0][:8]], 1, float("inf"), 0))  # warm-up
    workers = max(1, min(args.num_workers, len(prompts), args.max_concurrency or len(prompts)))
    jobs = []
    for w in range(workers):
        share = prompts[w::workers]
        concurrency = (
            None
            if args.max_concurrency is None
            else args.max_concurrency // workers + (w < args.max_concurrency % workers)
        )
        jobs.append((args, share, concurrency, args.request_rate / workers, args.seed + 1 + w))
    if workers == 1:
        outcomes = [_worker(jobs[0])]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            outcomes = pool.map(_worker, jobs)
    results = [r for outcome in outcomes for r in outcome[0]]
    elapsed = max(o[2] for o in outcomes) - min(o[1] for o in outcomes)
    return summarize(args, results, elapsed)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"mean_ms": 1e3 * statistics.fmean(ordered), "p50_ms": 1e3 * pick(0.5), "p99_ms": 1e3 * pick(0.99)}


def summarize(args: argparse.Namespace, results: list[RequestResult], elapsed: float) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    errors = [r.error for r in results if not r.ok]
    return {
        "benchmark": "serving", "base_url": args.base_url, "num_requests": len(results), "completed": len(done),
        "failed": len(errors), "first_error": errors[0] if errors else None,
        "max_concurrency": args.max_concurrency,
        "request_rate": None if args.request_rate == float("inf") else args.request_rate, "seconds": round(elapsed, 3),
        "output_tokens": output_tokens, "output_tok_s": round(output_tokens / elapsed, 1),
        "ttft": _percentiles([r.ttft for r in done]), "tpot": _percentiles(tpot),
        "itl": _percentiles([gap for r in done for gap in r.chunk_gaps]), "e2e": _percentiles([r.e2e for r in done]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="model name the server expects")
    parser.add_argument("--api-key")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=32000, help="prompt token ids are drawn below this")
    parser.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once"
    )
    parser.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                        help="client processes sharing the load (default: half the CPUs, at most 8)")
    args = parser.parse_args()
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
