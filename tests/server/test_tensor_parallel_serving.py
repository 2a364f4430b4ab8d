"""`inflight-serve -tp 2` on the CPU (gloo), through the official `openai` client, against `-tp 1` started the same
way: greedy and seeded outputs are equal; logprobs, penalties, beam search and structured output work under TP=2;
two "nodes" on 127.0.0.1 (`--nnodes 2`, the second `--headless`) serve TP=2 across them with the same outputs; a
rank that fails to start is one line and exit code 2; a worker killed while serving makes the engine dead (503,
errors, no hang) and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import REPO_ROOT

MODEL = "inflight-tiny"
ARGS = ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "256", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "256", "--served-model-name", MODEL]
PROMPTS = ["Return the number of", "Create a new", "If the file is", "The default value"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
          "required": ["name", "count"], "additionalProperties": False}


def children_of(pid: int) -> list[int]:
    """Every descendant process of `pid` (from /proc)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
                    frontier.append(int(entry.name))
    return found


def stop(process: subprocess.Popen, timeout: float = 60) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def master_port_and_free_port(free_port_fn) -> tuple[int, int]:
    """A --master-port whose next port is free too, and another free port that is neither (for HTTP)."""
    import socket

    while True:
        master = free_port_fn()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", master + 1))
            except OSError:
                continue
        other = free_port_fn()
        if other not in (master, master + 1):
            return master, other


def client_of(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def servers(serve_cli_fn, free_port_fn, tmp_path_factory) -> Iterator[dict[int, openai.OpenAI]]:
    """tensor-parallel size -> a client of `inflight-serve -tp N` (1 and 2), started side by side."""
    logs = tmp_path_factory.mktemp("tp_logs")
    started: dict[int, tuple[subprocess.Popen, int]] = {}
    try:
        for size in (1, 2):
            port = free_port_fn()
            started[size] = (serve_cli_fn([*ARGS, "-tp", str(size)], logs / f"tp{size}.log", port), port)
        yield {size: client_of(port) for size, (_, port) in started.items()}
    finally:
        for process, _ in started.values():
            stop(process)


def completions(client: openai.OpenAI, **kwargs: Any) -> list[tuple[str, str | None]]:
    response = client.completions.create(model=MODEL, **kwargs)
    return [(choice.text, choice.finish_reason) for choice in response.choices]


def test_greedy_and_seeded_outputs_equal_one_rank(servers) -> None:
    for prompt in PROMPTS:
        greedy = {size: completions(client, prompt=prompt, max_tokens=24, temperature=0)
                  for size, client in servers.items()}
        assert greedy[1] == greedy[2], prompt
        seeded = {size: completions(client, prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.95, seed=7, n=2)
                  for size, client in servers.items()}
        assert seeded[1] == seeded[2], prompt
    chats = {size: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a list."}], max_tokens=24, temperature=0,
    ).choices[0].message.content for size, client in servers.items()}
    assert chats[1] == chats[2]


def test_logprobs_penalties_and_beams_under_two_ranks(servers) -> None:
    def logprobs(client: openai.OpenAI) -> Any:
        return client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                         logprobs=3).choices[0].logprobs

    one, two = logprobs(servers[1]), logprobs(servers[2])
    assert one is not None and two is not None and one.tokens == two.tokens
    assert two.token_logprobs == pytest.approx(one.token_logprobs, abs=1e-4)
    assert [set(top) for top in two.top_logprobs or []] == [set(top) for top in one.top_logprobs or []]
    penalized = {size: completions(client, prompt=PROMPTS[1], max_tokens=24, temperature=0, presence_penalty=1.5,
                                   frequency_penalty=0.5, extra_body={"repetition_penalty": 1.3})
                 for size, client in servers.items()}
    assert penalized[1] == penalized[2]
    beams = {size: completions(client, prompt=PROMPTS[2], max_tokens=8, n=2, best_of=3,
                               extra_body={"use_beam_search": True})
             for size, client in servers.items()}
    assert beams[1] == beams[2] and len(beams[2]) == 2


def test_structured_output_under_two_ranks(servers) -> None:
    outputs = {}
    for size, client in servers.items():
        content = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a thing and count it."}], max_tokens=60,
            temperature=0, response_format={"type": "json_schema",
                                            "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}},
        ).choices[0].message.content
        assert content is not None
        jsonschema.validate(json.loads(content), SCHEMA)
        outputs[size] = content
    assert outputs[1] == outputs[2]


def test_two_nodes_on_one_host_serve_like_one_rank(serve_cli_fn, free_port_fn, servers, tmp_path) -> None:
    master_port, port = master_port_and_free_port(free_port_fn)
    cluster = ["-tp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(master_port)]
    environ = {key: value for key, value in os.environ.items() if not key.startswith("INFLIGHT_")}
    environ.update(PYTHONPATH=str(REPO_ROOT), INFLIGHT_CLUSTER_KEY="test-secret")
    node1 = subprocess.Popen([sys.executable, "-m", "server", *ARGS, *cluster, "--node-rank", "1", "--headless"],
                             cwd=REPO_ROOT, env=environ, stdout=(tmp_path / "node1.log").open("w"),
                             stderr=subprocess.STDOUT)
    node0 = serve_cli_fn([*ARGS, *cluster, "--node-rank", "0"], tmp_path / "node0.log", port,
                         env={"INFLIGHT_CLUSTER_KEY": "test-secret"})
    try:
        for prompt in PROMPTS[:2]:
            assert completions(client_of(port), prompt=prompt, max_tokens=24, temperature=0) == \
                completions(servers[1], prompt=prompt, max_tokens=24, temperature=0)
    finally:
        stop(node0)
    assert node1.wait(30) == 0, (tmp_path / "node1.log").read_text()  # node 0 ended its workers: a clean exit


def test_a_rank_that_fails_to_start_is_one_line_and_exit_code_2(tmp_path) -> None:
    """A model that does not split over 3 ranks (4 heads): every node reports it in one line."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("INFLIGHT_")}
    done = subprocess.run([sys.executable, "-m", "server", *ARGS, "-tp", "3"], cwd=REPO_ROOT, env=environ,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "tensor parallel size 3 does not divide the model's" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


def spawned_children(pid: int) -> list[int]:
    """The direct children of `pid` that multiprocessing spawned (not its resource tracker)."""
    return [child for child in children_of(pid) if Path(f"/proc/{child}").exists()
            and b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
            and int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def outliving(pids: list[int] | set[int], seconds: float = 10.0) -> list[int]:
    """The processes still alive after `seconds` (helpers such as a resource tracker take a moment to see the end)."""
    deadline = time.monotonic() + seconds
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_a_worker_killed_while_serving_makes_the_engine_dead(serve_cli_fn, free_port_fn, tmp_path) -> None:
    port = free_port_fn()
    server = serve_cli_fn([*ARGS, "-tp", "2"], tmp_path / "server.log", port)
    try:
        assert completions(client_of(port), prompt=PROMPTS[0], max_tokens=4, temperature=0)
        [core] = spawned_children(server.pid)  # the engine core process, rank 0
        [worker] = spawned_children(core)  # rank 1
        everything = children_of(server.pid)
        os.kill(worker, signal.SIGKILL)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        deadline = time.monotonic() + 30
        while http.get("/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http.get("/health").status_code == 503
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4})
        assert response.status_code == 503 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    finally:
        stop(server)
    assert not outliving(everything), "a process of the server outlived it"
    assert "tensor-parallel worker is gone" in (tmp_path / "server.log").read_text()


def test_a_worker_killed_while_loading_fails_the_start_cleanly(tmp_path) -> None:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("INFLIGHT_")}
    environ["PYTHONPATH"] = str(REPO_ROOT)
    log = tmp_path / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "server", *ARGS, "-tp", "2"], cwd=REPO_ROOT, env=environ,
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    everything: set[int] = set()
    deadline = time.monotonic() + 60
    worker = None
    while worker is None and time.monotonic() < deadline and server.poll() is None:
        for core in spawned_children(server.pid):
            everything.update(children_of(server.pid))
            worker = next(iter(spawned_children(core)), None)
        time.sleep(0.01)
    assert worker is not None, log.read_text()
    os.kill(worker, signal.SIGKILL)
    assert server.wait(60) == 2, log.read_text()
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("inflight-serve: error: ") and "tensor-parallel" in last, last
    assert "Traceback" not in log.read_text()
    assert not outliving(everything), "a process of the server outlived it"


def test_a_hung_worker_makes_the_engine_dead_within_the_stall_timeout(serve_cli_fn, free_port_fn, tmp_path) -> None:
    port = free_port_fn()
    server = serve_cli_fn([*ARGS, "-tp", "2", "--engine-stall-timeout", "3"], tmp_path / "server.log", port)
    try:
        [core] = spawned_children(server.pid)
        [worker] = spawned_children(core)
        everything = children_of(server.pid)
        os.kill(worker, signal.SIGSTOP)  # alive, silent: rank 0 waits in its first collective
        start = time.monotonic()
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": "x", "max_tokens": 4})
        assert response.status_code in (500, 503) and "error" in response.json()
        assert time.monotonic() - start < 30, "the stall watchdog ends the request"
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 503
    finally:
        stop(server)
    assert not outliving(everything), "a process of the server outlived it"


def test_a_start_that_fails_on_two_nodes_exits_2_on_both(free_port_fn, tmp_path) -> None:
    """-tp 6 over 2 nodes: 4 attention heads do not split over 6 ranks; both nodes end with exit code 2."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("INFLIGHT_")}
    environ.update(PYTHONPATH=str(REPO_ROOT), INFLIGHT_CLUSTER_KEY="test-secret")
    master_port, port = master_port_and_free_port(free_port_fn)
    cluster = [*ARGS, "-tp", "6", "--nnodes", "2", "--master-port", str(master_port)]
    node1 = subprocess.Popen([sys.executable, "-m", "server", *cluster, "--node-rank", "1", "--headless"],
                             cwd=REPO_ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node0 = subprocess.run([sys.executable, "-m", "server", *cluster, "--port", str(port)], cwd=REPO_ROOT,
                           env=environ, capture_output=True, text=True, timeout=180)
    log1, _ = node1.communicate(timeout=60)
    assert node0.returncode == 2 and node1.returncode == 2, (node0.stderr, log1)
    assert "does not divide the model's 4 attention heads" in node0.stderr.strip().splitlines()[-1]
    assert "does not divide the model's 4 attention heads" in log1
    assert "Traceback" not in node0.stderr + log1


@pytest.mark.parametrize("node_rank", ["0", "1"])
def test_several_nodes_without_a_cluster_key_is_one_line(free_port_fn, node_rank: str) -> None:
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("INFLIGHT_", "WORLD_SIZE"))}
    environ["PYTHONPATH"] = str(REPO_ROOT)
    command = [sys.executable, "-m", "server", *ARGS, "-tp", "2", "--nnodes", "2", "--master-port",
               str(free_port_fn()), "--node-rank", node_rank, "--port", str(free_port_fn())]
    done = subprocess.run([*command, *(["--headless"] if node_rank == "1" else [])], cwd=REPO_ROOT, env=environ,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "INFLIGHT_CLUSTER_KEY" in done.stderr.strip().splitlines()[-1] and "Traceback" not in done.stderr


def test_a_node_started_with_other_options_is_refused(free_port_fn, tmp_path) -> None:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("INFLIGHT_")}
    environ.update(PYTHONPATH=str(REPO_ROOT), INFLIGHT_CLUSTER_KEY="test-secret")
    master_port, port = master_port_and_free_port(free_port_fn)
    cluster = [*ARGS, "-tp", "2", "--nnodes", "2", "--master-port", str(master_port)]
    node1 = subprocess.Popen([sys.executable, "-m", "server", *cluster, "--block-size", "32", "--node-rank", "1",
                              "--headless"], cwd=REPO_ROOT, env=environ, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    node0 = subprocess.run([sys.executable, "-m", "server", *cluster, "--port", str(port)], cwd=REPO_ROOT,
                           env=environ, capture_output=True, text=True, timeout=180)
    log1, _ = node1.communicate(timeout=60)
    assert node0.returncode == 2, node0.stderr
    assert "started with other model or engine options" in node0.stderr.strip().splitlines()[-1]
    assert node1.returncode != 0 and "Traceback" not in node0.stderr + log1, log1
