"""Host time tensor parallelism adds to a step: rank 0 pickles the plan once and sends it to every other rank.

    python -m benchmarks.tp_overhead [--num-requests 256] [--ranks 2 4 8]

Builds the plan of a decode step of --num-requests requests (1000-token prompts, real scheduler), then times what
MultiprocExecutor.launch does before rank 0's own launch: the plan stripped of the grammar bitmask, pickled, and
sent on each worker's step channel (a TCP connection, as between ranks; the receivers only read). Prints one JSON
line per rank count: the plan's size and the median and 99th percentile microseconds per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import pickle
import statistics
import time
import uuid
from multiprocessing.connection import Client, Listener

from server.engine.core.kv_cache_manager import KVCacheManager
from server.engine.core.request import Request
from server.engine.core.scheduler import Scheduler
from server.engine.sampling_params import SamplingParams

AUTHKEY = b"tp-overhead"


def decode_plan(num_requests: int, prompt_len: int = 1000):
    """The StepPlan of a decode step of `num_requests` requests (prefilled first, as the engine would)."""
    blocks_each = -(-(prompt_len + 16) // 16)
    scheduler = Scheduler(KVCacheManager(num_requests * blocks_each, 16), num_requests, 65_536, prompt_len + 16)
    for _ in range(num_requests):
        scheduler.add_request(Request(f"cmpl-{uuid.uuid4().hex}-0", list(range(prompt_len)),
                                      SamplingParams(max_tokens=8), arrival_time=0.0))
    while True:
        output = scheduler.schedule()
        scheduler.update_from_output(output, {r.request_id: [1] for r in output.sampled_requests})
        if all(n == 1 for n in output.plan.num_new_tokens) and not output.plan.new_requests:
            return output.plan


def drain(port: int) -> None:
    with Client(("127.0.0.1", port), authkey=AUTHKEY) as channel:
        while channel.recv_bytes() != b"stop":
            pass


def measure(plan, num_workers: int, steps: int) -> dict:
    listener = Listener(("127.0.0.1", 0), authkey=AUTHKEY)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=drain, args=(listener.address[1],)) for _ in range(num_workers)]
    for worker in workers:
        worker.start()
    channels = [listener.accept() for _ in workers]
    times = []
    for step in range(steps + 50):
        start = time.perf_counter()
        message = pickle.dumps((1, dataclasses.replace(plan, grammar_request_ids=[], grammar_bitmask=None)),
                               protocol=pickle.HIGHEST_PROTOCOL)
        for channel in channels:
            channel.send_bytes(message)
        if step >= 50:  # warm-up
            times.append((time.perf_counter() - start) * 1e6)
    for channel in channels:
        channel.send_bytes(b"stop")
    for worker in workers:
        worker.join()
    listener.close()
    times.sort()
    return {"benchmark": "tp plan broadcast", "ranks": num_workers + 1, "num_requests": plan.num_rows,
            "plan_bytes": len(message), "median_us": round(statistics.median(times), 1),
            "p99_us": round(times[int(0.99 * len(times))], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    plan = decode_plan(args.num_requests)
    for ranks in args.ranks:
        print(json.dumps(measure(plan, ranks - 1, args.steps)), flush=True)


if __name__ == "__main__":
    main()
