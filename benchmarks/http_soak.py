"""The suite's HTTP run again and again, each against a freshly started server: does a cold server survive the burst?

    python -m benchmarks.http_soak [--runs 10] [--num-requests 512] [--out DIR]

Each run starts `inflight-serve` on the 8B config with dummy bf16 weights (as benchmarks/suite.py does), sends
512 requests of 128 + 128 tokens at concurrency 256 as soon as /health is 200, and stops the server. A run fails
if any request fails, /health is not 200 after the burst, or the server's log holds a traceback or says the
engine died. Prints one JSON line per run, then a summary line; server logs go to DIR/soak-N.log.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.suite import MODELS, serve_and_load, serving_model_dir

DEATH_MARKS = ("Traceback", "the engine is dead", "outputs pipe of the engine core process ended")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--time-limit", type=float, default=float("inf"),
                        help="seconds; no run starts that the last run's duration says would end after it")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.mkdtemp())))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop  # noqa: F401  (uvicorn runs on it when installed: the loop the failure needed)
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    num_runs = passed = 0
    rates = []
    begun, last_run_seconds = time.perf_counter(), 0.0
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = serving_model_dir(MODELS["8B"], Path(workdir))
        for run in range(args.runs):
            if time.perf_counter() - begun + last_run_seconds > args.time_limit:
                print(json.dumps({"stopped": f"time limit before run {run}"}), flush=True)
                break
            log = args.out / f"soak-{run}.log"
            started = time.perf_counter()
            num_runs += 1
            results = serve_and_load(model_dir, log, 18200 + run, args.num_requests, 256, 400)
            result = results[-1] if results else {"error": "no result"}
            text = log.read_text()
            marks = [mark for mark in DEATH_MARKS if mark in text]
            ok = (not marks and result.get("failed", 1) == 0 and result.get("health_after") == 200
                  and result.get("num_requests") == args.num_requests)
            passed += ok
            if ok:
                rates.append(result["output_tok_s"])
            print(
                json.dumps(
                    {
                        "run": run,
                        "ok": ok,
                        "loop": loop,
                        "output_tok_s": result.get("output_tok_s"),
                        "failed": result.get("failed"),
                        "first_error": result.get("first_error"),
                        "health_after": result.get("health_after"),
                        "log_marks": marks,
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                ),
                flush=True,
            )
            last_run_seconds = time.perf_counter() - started
    print(json.dumps({"benchmark": "http_soak", "runs": num_runs, "passed": passed, "loop": loop,
                      "output_tok_s_min": min(rates, default=None), "output_tok_s_max": max(rates, default=None)}))


if __name__ == "__main__":
    main()
