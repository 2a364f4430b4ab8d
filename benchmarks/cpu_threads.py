"""torch's intra-op threads on a shared CPU: the real server, 1 and 16 streams, with and without a competing load.

    python -m benchmarks.cpu_threads [--rounds 3] [--max-tokens 32] [--out results.json]

Starts `inflight-serve` on the bundled model (models/inflight-tiny, CPU) once per arm, all side by side on their own
ports (an idle server takes no CPU: its engine loop blocks):

    torch default   the behaviour before --cpu-threads: no process sets its threads (torch's default, one per
                    physical core, in the API process and the engine core alike); a wrapper script turns
                    server.engine.cpu_threads.apply into a no-op that only logs torch's count
    --cpu-threads N one arm per N given (--threads; default: every usable core): the engine N, the API process 1
    new default     no option: the rule of server/engine/cpu_threads.py

Then, round after round, for each load (none; one busy-loop process per usable core, as other programs on a shared
machine) and each arm in turn (interleaved: every arm sees the same load window) it sends 1 stream and then 16
concurrent streams of greedy /v1/completions (ignore_eos, --max-tokens each, SSE). Per measurement: output tok/s
(all tokens over the wall time from the first request to the last token) and TPOT, the inter-token latency of a
stream ((last token - first token) / (tokens - 1), as vLLM's benchmark defines it), median over the streams.
Printed: the median over the rounds per arm, load and streams, with the threads each process logged, and the
machine's 1-minute load average over the run (other programs count in it). Raw samples go to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "inflight-tiny"
SERVE_ARGS = ["--device", "cpu", "--max-num-seqs", "16", "--max-num-batched-tokens", "512", "--num-kv-blocks", "256",
              "--log-level", "info"]
# The wrapper for the "torch default" arm; at the top of the main script, so the spawned engine core process
# (which imports the main script as __mp_main__) runs it too.
TORCH_DEFAULT_SERVE = (
    "import logging, sys\n"
    "import server.engine.cpu_threads as cpu_threads\n"
    "def keep_default(choice, process):\n"
    "    import torch\n"
    "    count = torch.get_num_threads()\n"
    "    logging.getLogger(cpu_threads.__name__).info(\n"
    "        '%s process: %d torch intra-op threads (torch default, not set)', process, count)\n"
    "    return count\n"
    "cpu_threads.apply = keep_default\n"
    "if __name__ == '__main__':\n"
    "    from server.cli import main\n"
    "    main(sys.argv[1:])\n"
)
THREADS_LINE = re.compile(r"cpu_threads: (.+?) process: (\d+) torch intra-op threads? \((.*)\)$", re.MULTILINE)


@dataclass
class Arm:
    name: str
    args: list[str]
    script: Path | None = None  # a wrapper script instead of `-m server`
    port: int = 0
    process: subprocess.Popen | None = None
    log: Path | None = None
    threads: dict[str, int] = field(default_factory=dict)  # process -> threads it logged


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(arm: Arm, workdir: Path) -> None:
    arm.port = free_port()
    arm.log = workdir / f"{arm.name.replace(' ', '_')}.log"
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith("INFLIGHT_") and key != "OMP_NUM_THREADS"}
    environ.update(PYTHONPATH=str(REPO_ROOT), INFLIGHT_PORT=str(arm.port))
    command = [sys.executable, str(arm.script)] if arm.script else [sys.executable, "-m", "server"]
    arm.process = subprocess.Popen([*command, *SERVE_ARGS, *arm.args], cwd=REPO_ROOT, env=environ,
                                   stdout=arm.log.open("w"), stderr=subprocess.STDOUT)


def wait_healthy(arm: Arm, timeout: float = 300) -> None:
    assert arm.process is not None and arm.log is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if arm.process.poll() is not None:
            raise RuntimeError(f"{arm.name}: the server exited:\n{arm.log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{arm.port}/health", timeout=1).status_code == 200:
                arm.threads = {process: int(count) for process, count, _ in THREADS_LINE.findall(arm.log.read_text())}
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{arm.name}: not healthy within {timeout} s")


def busy_loop() -> None:
    while True:
        pass


def start_load(num_processes: int) -> list[multiprocessing.Process]:
    processes = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(num_processes)]
    for process in processes:
        process.start()
    return processes


def stop_load(processes: list[multiprocessing.Process]) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.join()


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[list[float], int]:
    """Arrival times of the stream's text chunks, and its completion tokens (from the usage chunk)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    times: list[float] = []
    num_tokens = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                num_tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    return times, num_tokens or len(times)  # a server without usage chunks: one token per text chunk


async def measure(base_url: str, num_streams: int, max_tokens: int) -> dict[str, float]:
    url = f"{base_url}/v1/completions"
    prompts = [f"Return the number of items in list {i} and" for i in range(num_streams)]
    async with httpx.AsyncClient(timeout=600) as client:
        begun = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, prompt, max_tokens) for prompt in prompts))
    end = max(times[-1] for times, _ in results)
    total = sum(num_tokens for _, num_tokens in results)
    tpots = [(times[-1] - times[0]) / (num_tokens - 1) for times, num_tokens in results if num_tokens > 1]
    return {"output_tok_s": total / (end - begun), "tpot_ms": 1000 * statistics.median(tpots),
            "num_tokens": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, nargs="*", default=None,
                        help="--cpu-threads arms (default: one, every usable core)")
    parser.add_argument("--out", type=Path, default=None, help="raw samples as JSON")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    workdir = Path(tempfile.mkdtemp(prefix="cpu_threads_"))
    script = workdir / "torch_default_serve.py"
    script.write_text(TORCH_DEFAULT_SERVE)
    arms = [Arm("torch default", [], script=script)]
    arms += [Arm(f"--cpu-threads {n}", ["--cpu-threads", str(n)]) for n in (args.threads or [cores])]
    arms.append(Arm("new default", []))
    samples: list[dict] = []
    try:
        for arm in arms:
            start(arm, workdir)
        for arm in arms:
            wait_healthy(arm)
            asyncio.run(measure(f"http://127.0.0.1:{arm.port}", 2, 8))  # warm-up
            print(f"# {arm.name}: threads {arm.threads}", flush=True)
        for round_index in range(args.rounds):
            for load in ("none", "busy"):
                busy = start_load(cores) if load == "busy" else []
                try:
                    time.sleep(0.5 if busy else 0)
                    order = arms[round_index % len(arms):] + arms[:round_index % len(arms)]  # rotate who goes first
                    for arm in order:
                        for num_streams in args.streams:
                            result = asyncio.run(measure(f"http://127.0.0.1:{arm.port}", num_streams, args.max_tokens))
                            sample = {"round": round_index, "arm": arm.name, "load": load, "streams": num_streams,
                                      **result, "loadavg_1m": os.getloadavg()[0]}  # what else ran (others too)
                            samples.append(sample)
                            print(json.dumps(sample), flush=True)
                finally:
                    stop_load(busy)
    finally:
        for arm in arms:
            if arm.process is not None:
                arm.process.terminate()
        for arm in arms:
            if arm.process is not None:
                arm.process.wait(60)
    if args.out is not None:
        args.out.write_text(json.dumps({"cores": cores, "arms": {arm.name: arm.threads for arm in arms},
                                        "samples": samples}, indent=1))
    loads = [s["loadavg_1m"] for s in samples if s["load"] == "none"]
    print(f"\n{cores} usable cores, {args.rounds} rounds, {args.max_tokens} tokens per stream; medians over rounds; "
          f"1-minute load average during the no-load measurements {min(loads):.1f}-{max(loads):.1f}\n")
    print("| arm | threads (API / engine core) | load | streams | output tok/s | TPOT ms |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for load in ("none", "busy"):
        for num_streams in args.streams:
            for arm in arms:
                mine = [s for s in samples
                        if s["arm"] == arm.name and s["load"] == load and s["streams"] == num_streams]
                if not mine:
                    continue
                threads = f"{arm.threads.get('API', '?')} / {arm.threads.get('engine core', '?')}"
                rate = statistics.median(s["output_tok_s"] for s in mine)
                tpot = statistics.median(s["tpot_ms"] for s in mine)
                print(f"| {arm.name} | {threads} | {load} | {num_streams} | {rate:.0f} | {tpot:.1f} |")


if __name__ == "__main__":
    main()
