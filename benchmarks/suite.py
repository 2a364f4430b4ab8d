"""The whole GPU benchmark set in one command, ending in one table (see benchmarks/RESULTS.md).

    python -m benchmarks.suite [--quick] [--out DIR]

Runs, each in its own process on the same card: the roofline (copy bandwidth vs weight bytes), our batch-1
decode and 512 x 128/128 offline throughput (benchmarks/throughput.py), the same workload over HTTP through
benchmarks/serving.py against inflight-serve, and the transformers peer (generate_batch, batch-1 generate
plain and with a static cache). Random bf16 weights (--load-format dummy), ignore_eos. With --fp8 also the 8B
rows with FP8 linears (--quantization fp8, quantized while loading) beside the FP8 roofline and TensorRT-LLM's
published H200 figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = {"1B": CONFIGS / "llama-3.2-1b", "8B": CONFIGS / "llama-3.1-8b"}


def run_json(args: list[str], log: Path, timeout: float) -> list[dict]:
    """Run a module, tee its output to log, return the JSON lines it printed."""
    print(f"$ {' '.join(args)}", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        output = f"{error.stdout or ''}{error.stderr or ''}\nTIMEOUT after {timeout}s"
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(args)}\n{output}\n")
    results = []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    print(f"  {time.perf_counter() - started:.0f}s, {len(results)} result(s)", flush=True)
    return results


def serving_model_dir(config_dir: Path, workdir: Path) -> Path:
    """A config-only model plus a word-level tokenizer covering its vocabulary, so the server can detokenize."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = json.loads((config_dir / "config.json").read_text())
    target = workdir / config_dir.name
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(config))
    vocab = {f"t{i} ": i for i in range(config["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0 "))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="t2 ").save_pretrained(str(target))
    return target


def serve_and_load(model_dir: Path, log: Path, port: int, num_requests: int, concurrency: int, timeout: float,
                   extra: list[str] | None = None) -> list[dict]:
    """Start inflight-serve on dummy weights, wait for /health, run the HTTP load generator, stop the server."""
    command = [
        sys.executable, "-m", "server", str(model_dir), "--port", str(port), "--device", "cuda", "--dtype", "bfloat16",
        "--load-format", "dummy", "--max-num-seqs", str(concurrency), "--max-num-batched-tokens", "8192",
        "--served-model-name", "bench", "--max-model-len", "512", *(extra or []),
    ]
    print(f"$ {' '.join(command)}", flush=True)
    with open(log, "a") as handle:
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if server.poll() is not None:
                return [{"benchmark": "serving", "error": f"server exited with {server.returncode}"}]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        results = run_json(
            ["-m", "benchmarks.serving", "--base-url", f"http://127.0.0.1:{port}", "--model", "bench",
             "--num-requests", str(num_requests), "--max-concurrency", str(concurrency), "--vocab-size", str(vocab)],
            log, timeout,
        )
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
        except httpx.HTTPError as error:
            health = repr(error)
        return [{**result, "health_after": health} for result in results]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def table(rows: list[tuple[str, str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.mkdtemp())))
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="run ours on this many ranks (GPUs); the peers run on one")
    parser.add_argument("--baselines", action="store_true",
                        help="also run ours with --no-async-scheduling offline and --no-engine-process over HTTP "
                             "(what each gains, same card and call)")
    parser.add_argument("--fp8", action="store_true", help="also the 8B batch-1 and offline rows with FP8 weights")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "suite.log"
    results: dict[str, dict] = {}
    roofline = subprocess.run(
        [sys.executable, "-m", "benchmarks.roofline", "--model", str(MODELS["8B"]), "--model", str(MODELS["1B"])],
        capture_output=True, text=True,
    ).stdout
    print(roofline, flush=True)
    ideal = {}
    for name, path in MODELS.items():
        found = re.search(rf"{path.name}: .* decode (\d+) tokens/s", roofline)
        assert found is not None, f"benchmarks.roofline printed no line for {path.name}"
        ideal[name] = float(found.group(1))
        found = re.search(rf"{path.name}: .* FP8 batch-1 decode (\d+) tokens/s", roofline)
        if found is not None:
            ideal[f"{name} FP8"] = float(found.group(1))
    bandwidth = re.search(r"copy bandwidth: ([\d.]+) TB/s \((.*)\)", roofline)
    for name, path in MODELS.items():
        common = ["-m", "benchmarks.throughput", "--model", str(path), "--load-format", "dummy", "--input-len", "128",
                  "--tensor-parallel-size", str(args.tensor_parallel_size)]
        variants = [("", [])] + ([(" sync", ["--no-async-scheduling"])] if args.baselines else [])
        if args.fp8 and name == "8B":
            variants.append((" FP8", ["--quantization", "fp8"]))
        for suffix, extra in variants:
            for result in run_json(common + extra + ["--num-requests", "1", "--output-len", "256"], log, 300):
                results[f"{name} batch-1{suffix}"] = result
        if name == "8B":
            for suffix, extra in variants:
                for result in run_json(
                    common + extra + ["--num-requests", str(args.num_requests), "--output-len", "128"], log, 400
                ):
                    results[f"{name} throughput{suffix}"] = result
            for suffix, extra in variants:
                if suffix == " FP8":  # profile_throughput has no --quantization
                    continue
                for result in run_json(["-m", "benchmarks.profile_throughput", "--model", str(path), *extra], log, 300):
                    results[f"{name} throughput profile{suffix}"] = result
    if not args.skip_serving:
        with tempfile.TemporaryDirectory() as workdir:
            model_dir = serving_model_dir(MODELS["8B"], Path(workdir))
            for result in serve_and_load(model_dir, log, 18123, args.num_requests, 256, 400,
                                         ["--tensor-parallel-size", str(args.tensor_parallel_size)]):
                results["8B serving"] = result
            if args.baselines:
                for result in serve_and_load(
                    model_dir, log, 18124, args.num_requests, 256, 400, ["--no-engine-process"]
                ):
                    results["8B serving thread"] = result
    if not args.skip_peer:
        for result in run_json(["-m", "benchmarks.peer_transformers", "--model", str(MODELS["8B"]),
                                "--num-requests", str(args.num_requests), "--output-len", "128"], log, 600):
            results[f"8B peer {result.get('peer')}"] = result
        for result in run_json(["-m", "benchmarks.peer_transformers", "--model", str(MODELS["1B"]), "--skip-batch",
                                "--output-len", "128"], log, 400):
            results[f"1B peer {result.get('peer')}"] = result
    (args.out / "suite.json").write_text(json.dumps(results, indent=2))
    rows = [("measurement", "output tok/s", "reference", "ratio")]
    for name in ("1B", "8B"):
        for suffix, note in (("", ""), (" sync", ", no async scheduling"), (" FP8", ", FP8 linears")):
            result = results.get(f"{name} batch-1{suffix}", {})
            ours = result.get("decode_tok_s")
            limit = ideal.get(f"{name} FP8" if suffix == " FP8" else name)
            if ours and limit:
                rows.append((f"{name} batch-1 decode, 1/TPOT (ours{note})", f"{ours:.0f}", f"roofline {limit:.0f}",
                             f"{ours / limit:.0%}"))
                rows.append((f"{name} batch-1 end to end, prompt step included{note}", f"{result['output_tok_s']:.0f}",
                             f"roofline {limit:.0f}", f"{result['output_tok_s'] / limit:.0%}"))
        for key, value in results.items():
            if key.startswith(f"{name} peer") and "output_tok_s" in value:
                rows.append((f"{name} {value['peer']}", f"{value['output_tok_s']:.0f}", "", ""))
    peer_batch = results.get("8B peer transformers generate_batch", {}).get("output_tok_s")
    offline = results.get("8B throughput", {}).get("output_tok_s")
    if offline:
        rows.append((f"8B {args.num_requests}x128/128 offline (ours)", f"{offline:.0f}",
                     f"generate_batch {peer_batch:.0f}" if peer_batch else "peer not run",
                     f"{offline / peer_batch:.1f}x" if peer_batch else ""))
    offline_sync = results.get("8B throughput sync", {}).get("output_tok_s")
    if offline_sync:
        rows.append((f"8B {args.num_requests}x128/128 offline (ours, no async scheduling)", f"{offline_sync:.0f}",
                     f"generate_batch {peer_batch:.0f}" if peer_batch else "peer not run",
                     f"{offline_sync / peer_batch:.1f}x" if peer_batch else ""))
    offline_fp8 = results.get("8B throughput FP8", {}).get("output_tok_s")
    if offline_fp8:  # TensorRT-LLM v1.0's perf overview, Llama-3.1-8B FP8, 128/128, one H200
        rows.append((f"8B {args.num_requests}x128/128 offline (ours, FP8 linears)", f"{offline_fp8:.0f}",
                     "TensorRT-LLM FP8 (published) 27911", f"{offline_fp8 / 27911:.0%}"))
    for key, label in (("8B serving", "ours"), ("8B serving thread", "ours, engine in a thread of the API process")):
        serving = results.get(key, {})
        if serving.get("output_tok_s"):
            rows.append((f"8B {args.num_requests}x128/128 HTTP c=256 ({label})", f"{serving['output_tok_s']:.0f}",
                         f"offline {offline:.0f}" if offline else "",
                         f"{serving['output_tok_s'] / offline:.0%}" if offline else ""))
    print(f"\ncard: {bandwidth.group(2) if bandwidth else '?'}, "
          f"copy bandwidth {bandwidth.group(1) if bandwidth else '?'} TB/s")
    print(table(rows))


if __name__ == "__main__":
    main()
