"""Load test of the real server on the bundled model: 520 requests from 64 concurrent clients, completions and
chat, streamed and not, random valid parameters; one client in ten hangs up mid-stream.

    zero unexpected errors          every request that was not abandoned answers 200 and finishes
    greedy = alone                  every greedy output equals the same request run alone beforehand
    abandoned work is freed         the engine aborts the hung-up requests; afterwards no KV block is in use
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

MODEL = "inflight-tiny"
NUM_REQUESTS = 520
CONCURRENCY = 64
DISCONNECT_SHARE = 0.1
PROMPTS = ["Return the number of", "Create a new", "The default value", "If the file is", "Raise an error",
           "Return a list of", "This function", "Convert the"]
CHAT_MESSAGES = ["Describe the function.", "What does this return?", "Explain the error.", "Name a module."]


@dataclass
class Job:
    """One client's request and what it should do with the answer."""

    path: str  # "/v1/completions" or "/v1/chat/completions"
    body: dict[str, Any]
    disconnect: bool = False  # hang up after the first streamed event
    key: str = field(init=False)  # the request without its stream flag: greedy jobs with equal keys answer alike

    def __post_init__(self) -> None:
        self.key = json.dumps({"path": self.path, **{k: v for k, v in self.body.items() if k != "stream"}},
                              sort_keys=True)

    @property
    def greedy(self) -> bool:
        return self.body.get("temperature") == 0 and not self.disconnect


def make_jobs(rng: random.Random) -> list[Job]:
    jobs = []
    for index in range(NUM_REQUESTS):
        chat = rng.random() < 0.4
        body: dict[str, Any] = {"model": MODEL, "max_tokens": rng.choice([8, 12, 16])}
        if chat:
            body["messages"] = [{"role": "user", "content": rng.choice(CHAT_MESSAGES)}]
        else:
            body["prompt"] = rng.choice(PROMPTS)
        if rng.random() < 0.5:
            body["temperature"] = 0
            if rng.random() < 0.3:
                body["stop"] = [rng.choice(["\n", ".", " the"])]
        else:
            body.update(temperature=rng.choice([0.5, 1.0, 1.3]), top_p=rng.choice([0.8, 1.0]),
                        top_k=rng.choice([None, 5, 50]), seed=rng.choice([None, rng.randrange(10**6)]),
                        presence_penalty=rng.choice([0.0, 0.5]), n=rng.choice([1, 1, 2]))
        disconnect = index % round(1 / DISCONNECT_SHARE) == 3
        if disconnect:  # long enough to be cut off for sure: no stop string may end it before the hang-up is seen
            body.update(max_tokens=200, ignore_eos=True)
            body.pop("stop", None)
        body["stream"] = disconnect or rng.random() < 0.5
        jobs.append(Job(path="/v1/chat/completions" if chat else "/v1/completions", body=body, disconnect=disconnect))
    return jobs


def text_of(choice: dict[str, Any]) -> str:
    if "message" in choice:
        return choice["message"]["content"] or ""
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice["text"]


async def run_job(client: httpx.AsyncClient, job: Job) -> dict[int, tuple[str, str | None]] | None:
    """Send the job; per choice index its text and finish reason (None for a job that hung up)."""
    if not job.body["stream"]:
        response = await client.post(job.path, json=job.body)
        assert response.status_code == 200, response.text
        return {c["index"]: (text_of(c), c["finish_reason"]) for c in response.json()["choices"]}
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    async with client.stream("POST", job.path, json=job.body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if job.disconnect:
                return None  # leaving the block closes the connection mid-stream
            if line == "data: [DONE]":
                break
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + text_of(choice)
                if choice["finish_reason"]:
                    reasons[choice["index"]] = choice["finish_reason"]
    return {index: (texts[index], reasons.get(index)) for index in texts}


async def run_all(url: str, jobs: list[Job], concurrency: int) -> list[Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def limited(job: Job) -> Any:
            async with semaphore:
                return await run_job(client, job)

        return await asyncio.gather(*(limited(job) for job in jobs))


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.slow
@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_load_with_disconnects(bundled_model_dir: Any, tiny_server_fn, engine_of_fn, engine_process: bool) -> None:
    running = tiny_server_fn(model=bundled_model_dir, served_model_name=MODEL, num_kv_blocks=1024,
                             max_num_seqs=64, max_num_batched_tokens=1024, max_model_len=256,
                             engine_process=engine_process)
    try:
        engine = engine_of_fn(running)
        jobs = make_jobs(random.Random(0))
        assert sum(job.disconnect for job in jobs) >= DISCONNECT_SHARE * NUM_REQUESTS
        greedy = {job.key: job for job in jobs if job.greedy}
        alone = dict(zip(greedy, asyncio.run(run_all(running.url, list(greedy.values()), concurrency=1))))
        start = time.monotonic()
        results = asyncio.run(run_all(running.url, jobs, CONCURRENCY))
        seconds = time.monotonic() - start
        for job, result in zip(jobs, results):
            if job.disconnect:
                assert result is None
                continue
            assert len(result) == job.body.get("n", 1) and all(reason in ("stop", "length")
                                                               for _, reason in result.values()), (job, result)
            if job.greedy:
                assert result == alone[job.key], (job.key, result, alone[job.key])
        deadline = time.monotonic() + 10
        while engine.has_unfinished_requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.has_unfinished_requests
        if not engine_process:  # in process mode the blocks are counted by the gauge below (sent by the child)
            assert engine.core.kv_cache_manager.num_used_blocks == 0
        metrics = httpx.get(running.url + "/metrics").text
        assert metric(metrics, "inflight_kv_cache_blocks_used") == 0
        num_disconnected = sum(job.body.get("n", 1) for job in jobs if job.disconnect)
        assert metric(metrics, "inflight_requests_cancelled_total") == num_disconnected
        # every hung-up job had at least one choice in the engine; a sibling choice not yet added is never started
        num_aborted = metric(metrics, 'inflight_request_success_total{finished_reason="abort"}')
        assert sum(job.disconnect for job in jobs) <= num_aborted <= num_disconnected
        print(f"{NUM_REQUESTS} requests, {len(greedy)} distinct greedy ones, {seconds:.1f} s at concurrency "
              f"{CONCURRENCY}")
    finally:
        running.stop()
