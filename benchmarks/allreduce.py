"""All-reduce cost at the sizes of a decode step: the floor tensor parallelism adds per layer (two per layer).

    python -m benchmarks.allreduce [--ranks 2] [--hidden 4096] [--batch 1 8 64 256]

Spawns --ranks processes (NCCL, one GPU each; gloo on a machine without GPUs), all-reduces [batch, hidden] bf16
tensors, and prints one JSON line per batch: median microseconds and the bus bandwidth (2 (N-1)/N x bytes / time,
as nccl-tests report it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist


def rank_main(rank: int, size: int, port: int, hidden: int, batches: list[int], iterations: int) -> None:
    from server.runner.tensor_parallel import NCCL_ENVIRONMENT

    cuda = torch.cuda.is_available()
    if cuda:
        os.environ.update(NCCL_ENVIRONMENT)
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    for batch in batches:
        tensor = torch.randn(batch, hidden, dtype=torch.bfloat16 if cuda else torch.float32, device=device)
        times = []
        for step in range(iterations + 20):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            if cuda:
                torch.cuda.synchronize()
            if step >= 20:
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        nbytes = tensor.numel() * tensor.element_size()
        if rank == 0:
            print(json.dumps({"benchmark": "all_reduce", "ranks": size, "batch": batch, "hidden": hidden,
                              "bytes": nbytes, "median_us": round(seconds * 1e6, 1),
                              "bus_gb_s": round(2 * (size - 1) / size * nbytes / seconds / 1e9, 2),
                              "device": torch.cuda.get_device_name() if cuda else "cpu"}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    ranks = [context.Process(target=rank_main, args=(r, args.ranks, port, args.hidden, args.batch, args.iterations))
             for r in range(args.ranks)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()


if __name__ == "__main__":
    main()
