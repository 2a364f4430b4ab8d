"""bf16 on the GPU: our engine (Triton kernels, CUDA graphs) against transformers on the same GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from engine_builder.forward_batch import build_forward_batch
from engine_builder.loader import load_engine
from engine_builder.runtime.torch_backend import TorchBackend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False,
        # The ignores here: transformers takes these through **kwargs and types .to/.cuda as if `self` were an
        # argument; its stubs are wrong, not the calls.
        rope_theta=500000.0,  # pyright: ignore[reportCallIssue]
        torch_dtype="bfloat16",  # pyright: ignore[reportCallIssue]
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)  # pyright: ignore[reportArgumentType]
    directory = tmp_path_factory.mktemp("gpu_llama")
    model.save_pretrained(directory)
    return directory, model.cuda().eval()  # pyright: ignore[reportCallIssue]


def _blocks_for(lengths: list[int], num_blocks: int) -> list[list[int]]:
    """Blocks handed out from the top down, so each request's blocks are not in allocation order."""
    tables, next_block = [], num_blocks - 1
    for n in lengths:
        tables.append(list(range(next_block, next_block - (-(-n // 16)), -1)))
        next_block -= -(-n // 16)
    return tables


def _teacher_forced(engine, prompts: list[list[int]]) -> torch.Tensor:
    lengths = [len(p) for p in prompts]
    num_blocks = sum(-(-n // 16) for n in lengths) + 4
    kv = engine.backend.allocate_kv_cache(num_blocks, 16)
    batch = build_forward_batch(prompts, [0] * len(prompts), _blocks_for(lengths, num_blocks), 16, lengths, "cuda")
    return engine.backend.forward(batch, kv)


def _hf_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([p], device="cuda")).logits[0].float() for p in prompts])


def _compare(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    relative = ((ours - reference).norm() / reference.norm()).item()
    top1 = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return relative, top1


def test_teacher_forced_logits_within_bf16_tolerance(checkpoint):
    """Reference: transformers in float32 on the same weights. transformers' own bf16 run shows the noise floor."""
    directory, hf_model = checkpoint
    engine = load_engine(directory, device="cuda", dtype="bfloat16", progress=False)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 32000, (n,)).tolist() for n in (200, 31, 512, 7)]
    ours = _teacher_forced(engine, prompts)
    hf_bf16 = _hf_logits(hf_model, prompts)
    reference = _hf_logits(hf_model.float(), prompts)
    hf_model.to(torch.bfloat16)
    relative, top1 = _compare(ours, reference)
    floor_relative, floor_top1 = _compare(hf_bf16, reference)
    print(f"ours bf16 vs fp32: rel {relative:.2e} top-1 {top1:.4f}; "
          f"transformers bf16: rel {floor_relative:.2e} top-1 {floor_top1:.4f}")
    assert relative <= 2e-2
    assert top1 >= floor_top1 - 0.01  # random weights give near-tied logits; trained weights are checked below


def test_top1_agreement_on_the_bundled_model():
    """A trained model has decisive logits: top-1 under teacher forcing must agree on >= 99% of positions."""
    bundled = Path(__file__).resolve().parents[2] / "models" / "inflight-tiny"
    engine = load_engine(bundled, device="cuda", dtype="bfloat16", progress=False)
    text = [
        "Return the number of items in a container. The argument may be a sequence or a collection.",
        "Open file and return a stream. Raise OSError upon failure. file is either a text or byte string",
        "Create a new dictionary with keys from iterable and values set to value.",
        "Split the string at the last occurrence of sep, and return a 3-tuple containing the part before",
    ]
    assert engine.tokenizer is not None  # the bundled model has one
    prompts = [engine.tokenizer(t)["input_ids"] for t in text]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(bundled, dtype=torch.float32)
    hf_model = hf_model.cuda().eval()  # pyright: ignore[reportCallIssue]  (transformers' stubs: see checkpoint())
    relative, top1 = _compare(_teacher_forced(engine, prompts), _hf_logits(hf_model, prompts))
    print(f"bundled model, ours bf16 vs transformers fp32: rel {relative:.2e} top-1 {top1:.4f}")
    assert relative <= 2e-2
    assert top1 >= 0.99


def test_cuda_graph_decode_matches_eager(checkpoint):
    directory, _ = checkpoint
    engine = load_engine(
        directory, device="cuda", dtype="bfloat16", max_batch_size=64, max_seq_len=1024, progress=False
    )
    kv = engine.backend.allocate_kv_cache(800, 16)
    torch.manual_seed(2)
    num_requests = 37  # not a bucket size: exercises padding
    prompts = [torch.randint(0, 32000, (int(n),)).tolist() for n in torch.randint(5, 300, (num_requests,))]
    tables = [list(range(i * 20, i * 20 + 20)) for i in range(num_requests)]
    engine.backend.forward(build_forward_batch(prompts, [0] * num_requests, tables, 16, device="cuda"), kv)
    decode = build_forward_batch([[7]] * num_requests, [len(p) for p in prompts], tables, 16, device="cuda")
    saved = [(c.key.clone(), c.value.clone()) for c in kv]
    eager = engine.backend.forward(decode, kv)
    for cache, (key, value) in zip(kv, saved):
        cache.key.copy_(key)
        cache.value.copy_(value)
    assert engine.backend.capture_cuda_graphs(kv, 16, progress=False)
    for cache, (key, value) in zip(kv, saved):  # capture's warm-up wrote into block 0; restore
        cache.key.copy_(key)
        cache.value.copy_(value)
    assert isinstance(engine.backend, TorchBackend)  # CUDA graphs are the torch backend's
    assert engine.backend.graphs is not None
    assert engine.backend.graphs.can_run(decode, kv)
    graphed = engine.backend.forward(decode, kv)
    # The graph may split long contexts differently from the eager call: same function, another bf16 rounding.
    row_error = (graphed - eager).norm(dim=-1) / eager.norm(dim=-1)
    assert row_error.max().item() < 2e-2, row_error  # a wrong or unwritten row would be ~100%
    assert (graphed.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.9


def test_kv_pool_sized_after_warm_up_leaves_room_for_the_largest_step(checkpoint):
    from server.engine.engine_config import EngineConfig
    from server.runner.kv_sizing import resolve_num_kv_blocks

    directory, _ = checkpoint
    engine = load_engine(directory, device="cuda", dtype="bfloat16", max_num_tokens=8192, progress=False)
    config = EngineConfig(max_num_batched_tokens=8192, max_num_seqs=256, kv_cache_memory_fraction=0.9)
    assert engine.backend.profile_peak_memory(8192, 256, 16) > 0
    num_blocks = resolve_num_kv_blocks(engine, config)
    kv = engine.backend.allocate_kv_cache(num_blocks, 16)
    free_after, _total = torch.cuda.mem_get_info()
    assert num_blocks * engine.kv_cache_spec.bytes_per_block(16) > 0.5 * free_after  # the pool took most of it
    # The largest step still runs with the pool allocated.
    engine.backend.profile_peak_memory(8192, 256, 16)
    del kv
