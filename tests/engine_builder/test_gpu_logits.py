"""bf16 on the GPU: our engine (Triton kernels, CUDA graphs) against transformers on the same GPU."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine_builder.forward_batch import build_forward_batch
from engine_builder.runtime import load_engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    directory = tmp_path_factory.mktemp("gpu_llama")
    model.save_pretrained(directory)
    return directory, model.cuda().eval()


def test_teacher_forced_logits_within_bf16_tolerance(checkpoint):
    directory, hf_model = checkpoint
    engine = load_engine(directory, device="cuda", dtype="bfloat16", progress=False)
    torch.manual_seed(1)
    lengths = [200, 31, 512, 7]
    prompts = [torch.randint(0, 32000, (n,)).tolist() for n in lengths]
    num_blocks = sum(-(-n // 16) for n in lengths) + 4
    kv = engine.allocate_kv_cache(num_blocks, 16)
    tables, next_block = [], num_blocks - 1
    for n in lengths:  # blocks handed out from the top down: non-contiguous per request order
        tables.append(list(range(next_block, next_block - (-(-n // 16)), -1)))
        next_block -= -(-n // 16)
    batch = build_forward_batch(prompts, [0] * 4, tables, 16, num_outputs_per_request=lengths, device="cuda")
    ours = engine.forward(batch, kv)
    with torch.no_grad():
        reference = torch.cat([hf_model(torch.tensor([p], device="cuda")).logits[0].float() for p in prompts])
    relative = ((ours - reference).norm() / reference.norm()).item()
    top1 = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"bf16 relative error {relative:.2e}, top-1 agreement {top1:.4f}")
    assert relative <= 2e-2
    assert top1 >= 0.99


def test_cuda_graph_decode_matches_eager(checkpoint):
    directory, _ = checkpoint
    engine = load_engine(directory, device="cuda", dtype="bfloat16", max_batch_size=64, max_seq_len=1024, progress=False)
    kv = engine.allocate_kv_cache(512, 16)
    torch.manual_seed(2)
    num_requests = 37  # not a bucket size: exercises padding
    prompts = [torch.randint(0, 32000, (int(n),)).tolist() for n in torch.randint(5, 300, (num_requests,))]
    tables = [list(range(i * 13, i * 13 + 13)) for i in range(num_requests)]
    engine.forward(build_forward_batch(prompts, [0] * num_requests, tables, 16, device="cuda"), kv)
    decode = build_forward_batch([[7]] * num_requests, [len(p) for p in prompts], tables, 16, device="cuda")
    saved = [(c.key.clone(), c.value.clone()) for c in kv]
    eager = engine.forward(decode, kv)
    for cache, (key, value) in zip(kv, saved):
        cache.key.copy_(key)
        cache.value.copy_(value)
    assert engine.capture_cuda_graphs(kv, 16, progress=False)
    for cache, (key, value) in zip(kv, saved):  # capture's warm-up wrote into block 0; restore
        cache.key.copy_(key)
        cache.value.copy_(value)
    assert engine.graphs.can_run(decode, kv)
    graphed = engine.forward(decode, kv)
    assert torch.allclose(graphed, eager, atol=1e-2, rtol=1e-2)
    assert torch.equal(graphed.argmax(-1), eager.argmax(-1))
