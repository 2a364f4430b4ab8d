"""Tensor parallelism of the model itself: two gloo ranks, each holding its shard, give the logits of one rank
(and with two GPUs, two NCCL ranks agree with one GPU in bf16).

Every supported architecture (and one with fewer KV heads than ranks) runs the same steps at TP=1 and TP=2 on the
CPU: a batch of prompts, one of them chunked, then chunks next to decode tokens over the paged KV cache. float32
logits must agree within 1e-5 (the all-reduces only reorder float32 sums), from a checkpoint and from an engine
directory (which each rank reads only its slices of).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engine_builder.forward_batch import build_forward_batch
from engine_builder.loader import load_engine
from engine_builder.sharding import Shard, check_shardable, shard_slice
from tests.engine_builder.conftest import ARCHITECTURES, tiny_hf_model

BLOCK_SIZE = 4
KINDS = [*ARCHITECTURES, "llama_one_kv_head"]


def steps(vocab_size: int) -> list[tuple[list[list[int]], list[int], list[list[int]], list[int]]]:
    """(new tokens, cached counts, block tables, outputs per request) for each step: prompts of 5, 17 and 9
    tokens with the 17-token one in two chunks, then decode tokens beside its last chunk, then plain decodes."""
    rng = random.Random(3)
    prompts = [[rng.randrange(vocab_size) for _ in range(n)] for n in (5, 17, 9)]
    tables = [[0, 1, 2], [3, 4, 5, 6, 7, 8], [9, 10, 11, 12]]
    decode = [[rng.randrange(vocab_size)] for _ in range(3)]
    return [
        ([prompts[0], prompts[1][:10], prompts[2]], [0, 0, 0], tables, [5, 0, 9]),
        ([decode[0], prompts[1][10:], decode[2]], [5, 10, 9], tables, [1, 7, 1]),
        ([[rng.randrange(vocab_size)] for _ in range(3)], [6, 17, 10], tables, [1, 1, 1]),
    ]


def run_steps(engine) -> list[torch.Tensor]:
    kv = engine.backend.allocate_kv_cache(16, BLOCK_SIZE)
    logits = []
    for tokens, cached, tables, outputs in steps(engine.config.vocab_size):
        batch = build_forward_batch(tokens, cached, tables, BLOCK_SIZE, num_outputs_per_request=outputs)
        logits.append(engine.backend.forward(batch, kv))
    return logits


def rank_main(rank: int, size: int, port: int, paths: list[str], out: str, device: str = "cpu",
              dtype: str | None = None) -> None:
    """One rank: join the group (gloo on the CPU, NCCL on cuda:<rank>), load its shard of every model, run the
    steps; rank 0 saves the logits."""
    torch.set_num_threads(1)
    if device == "cuda":
        from server.runner.tensor_parallel import NCCL_ENVIRONMENT

        os.environ.update(NCCL_ENVIRONMENT)
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=size)
    try:
        results = [[logits.cpu() for logits in run_steps(load_engine(path, device=device, dtype=dtype, progress=False,
                                                                     shard=Shard(rank, size)))]
                   for path in paths]
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def run_ranks(size: int, paths: list[str], out: Path, device: str = "cpu", dtype: str | None = None) -> list:
    """Run rank_main in `size` spawned processes; rank 0's logits per model and step."""
    port = free_port()
    ranks = [mp.get_context("spawn").Process(target=rank_main, args=(rank, size, port, paths, str(out), device, dtype))
             for rank in range(size)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=300)
    assert [process.exitcode for process in ranks] == [0] * size
    return torch.load(out)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def models(checkpoints, engine_dir, tmp_path_factory) -> dict[str, Path]:
    """kind -> checkpoint dir, plus "engine dir" (the llama checkpoint built by inflight-build)."""
    paths = {kind: checkpoints[kind][0] for kind in ARCHITECTURES}
    one_kv_head = tmp_path_factory.mktemp("ckpt_llama_one_kv_head")
    tiny_hf_model("llama_one_kv_head").save_pretrained(one_kv_head)
    return {**paths, "llama_one_kv_head": one_kv_head, "engine dir": engine_dir}


def test_two_ranks_give_the_logits_of_one(models, tmp_path):
    names = list(models)
    out = tmp_path / "tp2.pt"
    sharded = run_ranks(2, [str(models[n]) for n in names], out)
    for name, tp2 in zip(names, sharded):
        tp1 = run_steps(load_engine(models[name], device="cpu", progress=False))
        for step, (one, two) in enumerate(zip(tp1, tp2)):
            assert one.shape == two.shape, (name, step)
            error = (one - two).abs().max().item()
            assert error <= 1e-5, f"{name}, step {step}: TP=2 logits differ from TP=1 by {error:.3g}"


def test_shards_cover_each_tensor_once_and_replicate_a_lone_kv_head():
    from engine_builder.model_config import model_config_from_hf
    from tests.engine_builder.conftest import tiny_hf_config

    def config_of(kind: str):
        return model_config_from_hf({**tiny_hf_config(kind).to_dict(), "architectures": ["LlamaForCausalLM"]})

    config = config_of("llama")
    columns = [shard_slice("layers.0.attention.o_proj.weight", config, Shard(r, 2)) for r in range(2)]
    assert [c.ranges for c in columns if c] == [((0, 32),), ((32, 64),)]
    one_kv = config_of("llama_one_kv_head")
    qkv = [shard_slice("layers.0.attention.qkv_proj.weight", one_kv, Shard(r, 2)) for r in range(2)]
    assert [s.ranges[1:] for s in qkv if s] == [((64, 80), (80, 96))] * 2  # both ranks keep KV head 0
    vocab = [shard_slice("lm_head.weight", config, Shard(r, 3)) for r in range(3)]
    assert [(s.ranges, s.rows) for s in vocab if s] == [(((0, 54),), 54), (((54, 108),), 54), (((108, 160),), 54)]
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        check_shardable(config, 3)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_agree_with_one_on_the_next_token(models, tmp_path):
    """NCCL on two GPUs, bf16, teacher-forced: the most likely next token agrees with one GPU's at >= 99% of
    positions."""
    names = list(models)
    sharded = run_ranks(2, [str(models[n]) for n in names], tmp_path / "tp2.pt", device="cuda", dtype="bfloat16")
    agree = total = 0
    for name, tp2 in zip(names, sharded):
        tp1 = run_steps(load_engine(models[name], device="cuda:0", dtype="bfloat16", progress=False))
        for one, two in zip(tp1, tp2):
            agree += int((one.cpu().argmax(-1) == two.argmax(-1)).sum())
            total += one.shape[0]
    assert agree >= 0.99 * total, f"top-1 agreement {agree}/{total}"
