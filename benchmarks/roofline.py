"""Roofline of batch-1 decode: measured copy bandwidth and the model's weight bytes → ideal tokens/s.

Batch-1 decode of a dense model reads every weight once per token (KV reads are small at short
contexts), so ideal tokens/s = bandwidth / weight bytes.

    python -m benchmarks.roofline --model benchmarks/configs/llama-3.1-8b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from engine_builder.model_config import model_config_from_hf


def weight_bytes(config_dir: str | Path, bytes_per_param: int = 2, linear_bytes: int | None = None) -> int:
    """Bytes read per decode step: all layer weights, the final norm and the LM head (embedding: one row).

    linear_bytes: bytes per parameter of the decoder linears when they differ (1 for FP8, whose norms and LM head
    stay in the model dtype, as inflight-build --quantization fp8 writes them).
    """
    config = model_config_from_hf(json.loads((Path(config_dir) / "config.json").read_text()))
    hidden, inter = config.hidden_size, config.intermediate_size
    linears = hidden * (config.q_size + 2 * config.kv_size) + config.q_size * hidden + 3 * hidden * inter
    head = config.vocab_size * hidden
    per_linear = bytes_per_param if linear_bytes is None else linear_bytes
    return config.num_layers * (per_linear * linears + bytes_per_param * 2 * hidden) + bytes_per_param * (head + hidden)


def copy_bandwidth(num_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").random_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * num_bytes / times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="directory with config.json (repeatable)")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s ({torch.cuda.get_device_name()})")
    for model in args.model:
        weights = weight_bytes(model)
        print(f"{model}: {weights / 1e9:.2f} GB of bf16 weights -> "
              f"ideal batch-1 decode {bandwidth / weights:.0f} tokens/s")
        fp8 = weight_bytes(model, linear_bytes=1)
        print(f"{model}: {fp8 / 1e9:.2f} GB with FP8 linears (bf16 norms and LM head) -> "
              f"ideal FP8 batch-1 decode {bandwidth / fp8:.0f} tokens/s")


if __name__ == "__main__":
    main()
