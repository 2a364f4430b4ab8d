"""A burst of hundreds of requests at a freshly started `inflight-serve` (engine core in its own process),
before any warm-up, several times over: every request succeeds and the engine stays healthy.

This is how the engine core process "closed its pipe" on an H200 (issue 10 A): uvicorn runs on uvloop where
it is installed (as on the GPU machines), uvloop makes every watched descriptor non-blocking, and a step's
message longer than what had reached the pipe was read halfway (BlockingIOError, taken for the end of the
pipe). Large messages come from many requests per step asking for logprobs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

NUM_REQUESTS = 320
NUM_ROUNDS = 3
BODY = {"prompt": "Return the number of items in the", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "logprobs": 5}


async def burst(url: str) -> list[int]:
    limits = httpx.Limits(max_connections=NUM_REQUESTS, max_keepalive_connections=NUM_REQUESTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        responses = await asyncio.gather(*(client.post("/v1/completions", json=BODY) for _ in range(NUM_REQUESTS)))
    return [response.status_code for response in responses]


def test_a_burst_at_a_cold_server_succeeds_every_time(serve_cli_fn, free_port_fn, tmp_path: Path) -> None:
    pytest.importorskip("uvloop")  # the GPU machines' event loop, where the pipe was misread
    for round_number in range(NUM_ROUNDS):
        port, log = free_port_fn(), tmp_path / f"server-{round_number}.log"
        process = serve_cli_fn(["--device", "cpu", "--max-num-seqs", "256", "--max-num-batched-tokens", "4096",
                                "--num-kv-blocks", "1024"], log, port)
        try:
            statuses = asyncio.run(burst(f"http://127.0.0.1:{port}"))
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
        finally:
            process.terminate()
            process.wait(timeout=60)
        failed = [status for status in statuses if status != 200]
        assert not failed and health == 200, f"round {round_number}: {len(failed)} failed, /health {health}\n" + (
            log.read_text()[-3000:])
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
