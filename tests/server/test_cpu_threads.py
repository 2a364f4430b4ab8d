"""torch's intra-op threads per process: the rule (--cpu-threads > $OMP_NUM_THREADS > usable cores less one for the
API process; tensor-parallel ranks on a node share the budget; the API process takes 1), the setting from every
source, and real `inflight-serve` processes that set and report them (each logs torch.get_num_threads() as read back
in that process)."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import openai
import pytest

from server.cli import parse_settings
from server.engine.cpu_threads import (
    ThreadChoice,
    api_threads,
    engine_budget,
    node_rank_threads,
    omp_num_threads,
    rank_threads,
)
from server.engine.parallel_config import ParallelConfig

SERVE_ARGS = ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "64", "--max-num-seqs", "4",
              "--max-num-batched-tokens", "64"]


def test_the_flag_wins_over_omp_num_threads_and_the_cores() -> None:
    assert engine_budget(3, {"OMP_NUM_THREADS": "1"}, separate_api_process=True, cores=8) == ThreadChoice(
        3, "--cpu-threads 3")


def test_omp_num_threads_wins_over_the_cores() -> None:
    choice = engine_budget(None, {"OMP_NUM_THREADS": "2"}, separate_api_process=True, cores=8)
    assert choice == ThreadChoice(2, "$OMP_NUM_THREADS=2")


def test_by_default_one_core_is_left_to_the_api_process() -> None:
    assert engine_budget(None, {}, separate_api_process=True, cores=2).num_threads == 1
    assert engine_budget(None, {}, separate_api_process=True, cores=16).num_threads == 15
    assert engine_budget(None, {}, separate_api_process=True, cores=1).num_threads == 1  # never 0
    assert engine_budget(None, {}, separate_api_process=False, cores=2).num_threads == 2  # nothing beside it


def test_the_default_reads_this_process_affinity() -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    assert engine_budget(None, {}, separate_api_process=False).num_threads == cores


@pytest.mark.parametrize(("raw", "expected"), [("4", 4), (" 2 ", 2), ("4,2", 4), ("", None), ("0", None),
                                               ("-1", None), ("many", None)])
def test_omp_num_threads_is_read_as_openmp_does(raw: str, expected: int | None) -> None:
    assert omp_num_threads({"OMP_NUM_THREADS": raw}) == expected


def test_an_unusable_omp_num_threads_falls_back_to_the_cores() -> None:
    assert engine_budget(None, {"OMP_NUM_THREADS": "0"}, separate_api_process=False, cores=4).num_threads == 4


def test_tensor_parallel_ranks_on_a_node_share_its_budget() -> None:
    assert rank_threads(ThreadChoice(8, "--cpu-threads 8"), 4).num_threads == 2
    assert rank_threads(ThreadChoice(3, "--cpu-threads 3"), 2).num_threads == 1
    assert rank_threads(ThreadChoice(1, "--cpu-threads 1"), 4).num_threads == 1  # at least one each
    shared = node_rank_threads(4, ParallelConfig(tensor_parallel_size=2), {})
    assert shared == ThreadChoice(2, "--cpu-threads 4, shared by 2 ranks on this node")


def test_a_headless_node_leaves_no_core_to_an_api_process() -> None:
    parallel = ParallelConfig(tensor_parallel_size=2, nnodes=2, node_rank=1, master_port=29500)
    import os

    cores = len(os.sched_getaffinity(0))
    assert node_rank_threads(None, parallel, {}).num_threads == cores  # one rank on this node, no API process


def test_the_api_process_takes_one_thread_beside_an_engine_process() -> None:
    assert api_threads(None, True, {"OMP_NUM_THREADS": "8"}).num_threads == 1
    assert api_threads(4, False, {}).num_threads == 4  # the engine runs in it: its budget


def test_cpu_threads_from_every_source() -> None:
    assert parse_settings(["--cpu-threads", "3"], {}).cpu_threads == 3
    assert parse_settings([], {"INFLIGHT_CPU_THREADS": "2"}).cpu_threads == 2
    assert parse_settings([], {}).cpu_threads is None
    with pytest.raises(ValueError, match="--cpu-threads must be at least 1; got 0"):
        parse_settings(["--cpu-threads", "0"], {})
    with pytest.raises(ValueError, match="--cpu-threads must be an integer, got 'two'"):
        parse_settings(["--cpu-threads", "two"], {})


def test_cpu_threads_from_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("cpu-threads = 5\n")
    assert parse_settings(["--config", str(config)], {}).cpu_threads == 5


def thread_lines(log: str) -> dict[str, tuple[int, str]]:
    """process -> (threads, reason) from the server log's "<process> process: N torch intra-op thread(s) (why)"."""
    found = re.findall(r"server\.engine\.cpu_threads: (.+?) process: (\d+) torch intra-op threads? \((.*)\)$", log,
                       re.MULTILINE)
    return {process: (int(count), reason) for process, count, reason in found}


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        assert process.wait(timeout=60) == 0
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def complete_four_tokens(port: int) -> None:
    """A greedy completion of 4 tokens from the server on `port`, through the openai client."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    result = client.completions.create(model="inflight-tiny", prompt="Return the", max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert result.usage is not None and result.usage.completion_tokens == 4


def test_a_served_engine_runs_with_the_threads_given(bundled_model_dir: Path, tmp_path: Path, port: int,
                                                     serve_cli_fn) -> None:
    log = tmp_path / "server.log"
    process = serve_cli_fn([*SERVE_ARGS, "--cpu-threads", "1"], log, port, env={"OMP_NUM_THREADS": "2"})
    try:
        complete_four_tokens(port)
    finally:
        stop(process)
    lines = thread_lines(log.read_text())
    assert lines == {"API": (1, "the engine core has its own process"),
                     "engine core": (1, "--cpu-threads 1")}, log.read_text()  # the flag beat $OMP_NUM_THREADS


@pytest.mark.slow
def test_tensor_parallel_ranks_share_omp_num_threads(bundled_model_dir: Path, tmp_path: Path, port: int,
                                                     serve_cli_fn) -> None:
    log = tmp_path / "server.log"
    process = serve_cli_fn([*SERVE_ARGS, "-tp", "2"], log, port, env={"OMP_NUM_THREADS": "4"})
    try:
        complete_four_tokens(port)
    finally:
        stop(process)
    shared = (2, "$OMP_NUM_THREADS=4, shared by 2 ranks on this node")
    assert thread_lines(log.read_text()) == {"API": (1, "the engine core has its own process"),
                                             "engine core": shared, "tensor-parallel rank 1": shared}, log.read_text()
