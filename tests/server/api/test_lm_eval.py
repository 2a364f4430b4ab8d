"""lm-eval (EleutherAI's evaluation harness) scores the served model as it scores the model itself.

Its `local-completions` backend sends loglikelihood requests to the server (token-id prompts, four per request,
echo + logprobs, max_tokens 1); its `hf` backend runs the same checkpoint in transformers. On two tasks of local
data in lm-eval's own task format (tests/server/api/lm_eval_tasks/: a multiple-choice task and a
loglikelihood_rolling perplexity task) on the bundled model, every sample's loglikelihood and every metric agree.

Both backends are told add_bos_token=True: lm-eval's hf backend adds the tokenizer's BOS by default and its API
backend does not, which alone would make their perplexities differ.
"""

import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ["inflight_docstring_choice", "inflight_docstring_perplexity"]


@pytest.fixture(scope="module")
def bundled_server(bundled_model_dir, free_port_fn, start_server_fn) -> Any:
    from server.config import ServerSettings
    from server.launch import build_server

    settings = ServerSettings(model=bundled_model_dir, port=free_port_fn(), device="cpu", dtype="float32",
                              served_model_name="inflight-tiny", num_kv_blocks=256, max_num_seqs=16,
                              max_num_batched_tokens=64, log_level="warning", engine_process=False)
    running = start_server_fn(build_server(settings), settings.url)
    yield running
    running.stop()


def evaluate(model: str, model_args: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """lm_eval.simple_evaluate on the two local tasks, offline, with every sample logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with monkeypatch.context() as scoped:
        scoped.chdir(TASKS_DIR)  # the tasks' data_files are relative to it
        simple_evaluate: Any = lm_eval.simple_evaluate  # its decorator hides the signature from pyright
        results = simple_evaluate(model=model, model_args=model_args, tasks=TASKS, device="cpu", log_samples=True,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR)))
    assert results is not None
    return results


def loglikelihoods(results: dict, task: str) -> list[float]:
    """Every request's loglikelihood of a task, in document and choice order."""
    values = []
    for sample in sorted(results["samples"][task], key=lambda sample: sample["doc_id"]):
        for response in sample["resps"]:
            first = response[0]
            values.append(float(first[0] if isinstance(first, (list, tuple)) else first))
    return values


def test_local_completions_scores_equal_the_hf_backend(bundled_server, bundled_model_dir, tmp_path, monkeypatch):
    served = evaluate(
        "local-completions",
        f"model=inflight-tiny,base_url={bundled_server.api_url}/completions,tokenizer={bundled_model_dir},"
        "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,batch_size=4,add_bos_token=True",
        tmp_path, monkeypatch)
    local = evaluate("hf", f"pretrained={bundled_model_dir},dtype=float32,add_bos_token=True", tmp_path,
                     monkeypatch)
    for task in TASKS:
        ours, theirs = loglikelihoods(served, task), loglikelihoods(local, task)
        assert len(ours) == len(theirs) > 0
        assert ours == pytest.approx(theirs, abs=1e-3), task
        for metric, value in local["results"][task].items():
            if metric.endswith(",none") and isinstance(value, float) and "stderr" not in metric:
                assert math.isclose(served["results"][task][metric], value, rel_tol=1e-5), (task, metric)
    choice = served["results"]["inflight_docstring_choice"]
    assert choice["acc,none"] > 0.5  # the bundled model knows docstring phrasing better than chance (0.25)
