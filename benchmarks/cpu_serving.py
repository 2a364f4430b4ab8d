"""Per-token host overhead on a CPU (issue 17): the bundled model served by `inflight-serve`, one compute thread.

    python -m benchmarks.cpu_serving [--rounds 5] [--peer NAME=URL ...] [--out results.json]

Starts `inflight-serve` on models/inflight-tiny with `--device cpu --cpu-threads 1` (the thread count is fixed and
printed with each result), then, round after round and interleaved with any peers given (every server sees the same
machine state), sends the three workloads of greedy streamed /v1/completions (ignore_eos):

    1 stream x 256 tokens      the time between two tokens of one stream: scheduling, the forward pass, IPC,
                               detokenizing, SSE
    16 concurrent x 128 tokens
    64 concurrent x 64 tokens

A peer is any OpenAI-compatible server already running on the same model (e.g. llama.cpp's `llama-server -t 1` on an
f32 GGUF of it, or vLLM's CPU build), given as NAME=BASE_URL; it gets the same requests (its /v1/completions must
stream). Printed per server and workload: the median over the rounds of output tok/s (all tokens over the wall time
from the first request to the last token) and of TPOT (the median stream's (last - first token) / (tokens - 1)).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.cpu_threads import Arm, measure, start, wait_healthy

WORKLOADS = ((1, 256), (16, 128), (64, 64))  # (concurrent streams, tokens each)
SERVE_ARGS = ["--cpu-threads", "1", "--max-num-seqs", "64", "--num-kv-blocks", "1024"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=URL",
                        help="another OpenAI-compatible server on the same model (repeatable)")
    parser.add_argument("--dtype", default="auto", help="inflight-serve --dtype (auto: the checkpoint's, float32 here)")
    parser.add_argument("--out", type=Path, default=None, help="raw samples as JSON")
    args = parser.parse_args()
    serve_args = [*SERVE_ARGS, "--dtype", args.dtype]
    ours = Arm("inflight", serve_args)
    servers: dict[str, str] = {}
    samples: list[dict] = []
    try:
        start(ours, Path(tempfile.mkdtemp(prefix="cpu_serving_")))
        wait_healthy(ours)
        servers[f"inflight (1 thread, {args.dtype})"] = f"http://127.0.0.1:{ours.port}"
        for peer in args.peer:
            name, _, url = peer.partition("=")
            servers[name] = url.rstrip("/")
        for url in servers.values():
            asyncio.run(measure(url, 2, 8))  # warm-up
        print(f"# threads logged by inflight-serve: {ours.threads}", flush=True)
        for round_index in range(args.rounds):
            names = list(servers)
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for streams, tokens in WORKLOADS:
                for name in order:
                    result = asyncio.run(measure(servers[name], streams, tokens))
                    sample = {"round": round_index, "server": name, "streams": streams, "tokens": tokens, **result,
                              "loadavg_1m": os.getloadavg()[0]}
                    samples.append(sample)
                    print(json.dumps(sample), flush=True)
    finally:
        if ours.process is not None:
            ours.process.terminate()
            ours.process.wait(60)
    if args.out is not None:
        args.out.write_text(json.dumps({"threads": ours.threads, "samples": samples}, indent=1))
    print(f"\n{args.rounds} rounds, medians; inflight-serve {' '.join(serve_args)} (threads {ours.threads})\n")
    print("| workload | " + " | ".join(servers) + " |")
    print("| --- |" + " ---: |" * len(servers))
    for streams, tokens in WORKLOADS:
        cells = []
        for name in servers:
            mine = [s for s in samples if s["server"] == name and s["streams"] == streams]
            rate = statistics.median(s["output_tok_s"] for s in mine)
            tpot = statistics.median(s["tpot_ms"] for s in mine)
            cells.append(f"{rate:,.0f} tok/s (TPOT {tpot:.2f} ms)")
        print(f"| {streams} x {tokens} tokens | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
