"""The Triton KV-cache kernels with an FP8 cache against the torch references on the GPU (bf16 inputs), and the bundled
model's FP8 KV cache through the whole GPU path: block copies, the host tier's copies, decode CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from engine_builder.forward_batch import build_forward_batch
from engine_builder.kernels.kv_cache import quantize_kv
from engine_builder.kernels.paged_attention import paged_attention_reference
from engine_builder.kernels.rotary import apply_rotary
from engine_builder.loader import load_engine
from tests.engine_builder.kernels.kernel_cases import ATTENTION_LAYOUTS, random_layout, relative_error
from tests.engine_builder.test_fp8 import BUNDLED, held_out_stream
from tests.engine_builder.test_fp8_kv_cache import teacher_forced_through_the_cache, torch_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
triton_elementwise = pytest.importorskip("engine_builder.kernels.triton_elementwise")
triton_attention = pytest.importorskip("engine_builder.kernels.triton_attention")
FP8 = torch.float8_e4m3fn


def assert_fp8_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 2**-9,
                     share_differing: float = 0.01) -> None:
    """FP8 entries equal, but for rare ones a step apart (a float32 last bit that crossed a rounding boundary).
    atol: what the value may differ by before rounding to FP8 (e.g. the bfloat16 rounding of a rotation)."""
    actual, expected = actual.cpu().float(), expected.cpu().float()
    difference = (actual - expected).abs()
    assert (difference <= (expected.abs() + atol) / 8 + atol + 2**-9).all()
    assert (difference > 0).float().mean() < share_differing


def test_write_kv_stores_the_references_fp8_and_skips_padding():
    torch.manual_seed(0)
    key = 8 * torch.randn(20, 8, 128, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.randperm(32 * 16, device="cuda")[:20]
    key_cache = torch.zeros(32, 16, 8, 128, device="cuda", dtype=FP8)
    value_cache = torch.zeros_like(key_cache)
    triton_elementwise.write_kv_triton(key, value, key_cache, value_cache, slots, torch.tensor([15], device="cuda"),
                                       0.02, 0.5)
    flat_key, flat_value = key_cache.view(-1, 8, 128), value_cache.view(-1, 8, 128)
    assert_fp8_close(flat_key[slots[:15]], quantize_kv(key[:15].cpu(), 0.02))
    assert_fp8_close(flat_value[slots[:15]], quantize_kv(value[:15].cpu(), 0.5))
    assert (flat_key[slots[15:]].float() == 0).all()  # padding past num_valid_tokens is not written
    assert flat_key[slots[:15]].float().abs().max() == 448  # 8 sigma / 0.02 clips


def test_fused_rotary_and_kv_write_stores_the_references_fp8():
    torch.manual_seed(4)
    tokens, heads, kv_heads, dim = 40, 32, 8, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
    query, key, value = (t.reshape(tokens, -1, dim) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim],
                                                                          dim=-1))
    positions = torch.randint(0, 8000, (tokens,), device="cuda")
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    slots = torch.randperm(64 * 16, device="cuda")[:tokens]
    key_cache = torch.zeros(64, 16, kv_heads, dim, device="cuda", dtype=FP8)
    value_cache = torch.zeros_like(key_cache)
    rotated = triton_elementwise.rotary_write_kv_triton(query, key, value, positions, inv_freq, key_cache,
                                                        value_cache, slots, None, 0.1, 0.3)
    assert relative_error(rotated, apply_rotary(query.cpu().float(), positions.cpu(), inv_freq.cpu())) < 1e-2
    rotated_key = apply_rotary(key.cpu(), positions.cpu(), inv_freq.cpu())  # bf16, as the kernel computes it
    # the kernel rotates in bfloat16 with its own cos/sin (positions up to 8000 rad): a rotated key may differ by a
    # bfloat16 step of the terms it sums (|first| + |second|), so a value near 0 may land a few FP8 steps away
    terms = (key.abs() + key.roll(dim // 2, dims=-1).abs()).cpu().float() / 0.1
    assert_fp8_close(key_cache.view(-1, kv_heads, dim)[slots], quantize_kv(rotated_key, 0.1),
                     atol=terms.max().item() * 2**-8, share_differing=0.05)
    assert_fp8_close(value_cache.view(-1, kv_heads, dim)[slots], quantize_kv(value.cpu(), 0.3))


@pytest.mark.parametrize(
    "query_lens,cached,heads,kv_heads,head_dim,block_size",
    ATTENTION_LAYOUTS,
)
@pytest.mark.parametrize(("k_scale", "v_scale"), [(1.0, 1.0), (0.02, 0.3)])
def test_paged_attention_over_an_fp8_cache_matches_the_reference(query_lens, cached, heads, kv_heads, head_dim,
                                                                 block_size, k_scale, v_scale):
    torch.manual_seed(len(query_lens))
    num_blocks = sum(-(-(q + c) // block_size) for q, c in zip(query_lens, cached)) + 8
    batch = random_layout(query_lens, cached, block_size, num_blocks, seed=1)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = (2 * torch.randn(shape, device="cuda")).to(FP8)
    value_cache = torch.randn(shape, device="cuda").to(FP8)
    query = torch.randn(sum(query_lens), heads, head_dim, device="cuda", dtype=torch.bfloat16)
    expected = paged_attention_reference(query.float(), key_cache.float() * k_scale, value_cache.float() * v_scale,
                                         batch.attention, head_dim**-0.5)
    for splits in (None, 2, 4) if batch.attention.max_query_len == 1 else (None,):
        actual = triton_attention.paged_attention_triton(query, key_cache, value_cache, batch.attention,
                                                         head_dim**-0.5, num_splits=splits, k_scale=k_scale,
                                                         v_scale=v_scale)
        assert relative_error(actual, expected) < 1e-2
    # the launch choices the defaults are not: K transposed from memory, bfloat16 tiles, two stages, small tiles
    for launch in (triton_attention.AttentionLaunch(k_rows=False, fp16_tiles=False, num_stages=2),
                   triton_attention.AttentionLaunch(block_n=32, block_q=8, num_warps=8)):
        actual = triton_attention.paged_attention_triton(query, key_cache, value_cache, batch.attention,
                                                         head_dim**-0.5, k_scale=k_scale, v_scale=v_scale,
                                                         launch=launch)
        assert relative_error(actual, expected) < 1e-2, launch
    # FP8 dots round the query (per row) and the softmax weights to e4m3 (3 mantissa bits): on these random inputs,
    # whose attention is spread over every key, that moves the output by 2-6% (a torch emulation of the rounding
    # gives 2.2-5.8% for 192 and 2048 keys); a wrong scale or layout moves it by ~100%
    for launch in (triton_attention.AttentionLaunch(fp8_qk=True),
                   triton_attention.AttentionLaunch(fp8_pv=True, block_n=32),
                   triton_attention.AttentionLaunch(fp8_qk=True, fp8_pv=True, k_rows=False)):
        actual = triton_attention.paged_attention_triton(query, key_cache, value_cache, batch.attention,
                                                         head_dim**-0.5, k_scale=k_scale, v_scale=v_scale,
                                                         launch=launch)
        assert relative_error(actual, expected) < 0.08, launch


def test_fp8_blocks_copy_on_the_device_and_to_pinned_host_memory():
    engine = load_engine(BUNDLED, device="cuda", dtype="bfloat16", progress=False, kv_cache_dtype="fp8")
    caches = engine.backend.allocate_kv_cache(4, 16)
    caches[0].key[1] = torch.randn(16, 2, 64, device="cuda").to(FP8)
    engine.backend.copy_kv_blocks(caches, [1], [3])
    assert torch.equal(caches[0].key[3].view(torch.uint8), caches[0].key[1].view(torch.uint8))
    host = torch.empty((2, *caches[0].key.shape[1:]), dtype=FP8, pin_memory=True)
    host[1].copy_(caches[0].key[1], non_blocking=True)
    caches[0].key[2].copy_(host[1], non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(caches[0].key[2].view(torch.uint8), caches[0].key[1].view(torch.uint8))


def test_the_bundled_model_with_an_fp8_kv_cache_on_the_gpu_eagerly_and_in_cuda_graphs():
    fp8 = load_engine(BUNDLED, device="cuda", dtype="bfloat16", progress=False, kv_cache_dtype="fp8",
                      max_batch_size=4)
    cpu = load_engine(BUNDLED, device="cpu", dtype="float32", progress=False, kv_cache_dtype="fp8")
    prompts = [[5, 17, 99, 3, 250, 41, 8, 77, 12, 300] * 4, [9, 64, 1000, 7] * 3]
    tables = [[0, 1, 2], [3, 4]]
    prefill = build_forward_batch(prompts, [0, 0], tables, 16, device="cuda")
    decode = build_forward_batch([[11], [12]], [len(p) for p in prompts], tables, 16, device="cuda")
    caches = fp8.backend.allocate_kv_cache(6, 16)
    assert caches[0].key.dtype == FP8
    assert fp8.backend.capture_cuda_graphs(caches, 16, progress=False)  # before the prompts: capture writes slot 0
    fp8.backend.forward(prefill, caches)
    graphs = torch_backend(fp8).graphs
    assert graphs is not None and graphs.can_run(decode, caches)
    graphed = fp8.backend.forward(decode, caches)
    eager = torch_backend(fp8).model(decode, caches)  # rewrites the same slots with the same K/V
    assert relative_error(graphed, eager) < 1e-2  # graphs split the keys for max_seq_len, eager for the longest request
    cpu_caches = cpu.backend.allocate_kv_cache(6, 16)
    cpu.backend.forward(build_forward_batch(prompts, [0, 0], tables, 16), cpu_caches)
    reference = cpu.backend.forward(build_forward_batch([[11], [12]], [len(p) for p in prompts], tables, 16),
                                    cpu_caches)
    assert relative_error(eager, reference) < 0.05  # bf16 weights and activations vs float32, both with FP8 K/V


@pytest.mark.parametrize("fp8_dots", [False, True], ids=["fp16-dots", "fp8-dots"])
def test_the_bundled_model_with_an_fp8_kv_cache_on_the_gpu_keeps_its_held_out_loss_and_greedy_choices(
        fp8_dots, monkeypatch):
    """Issue 16's bar for the FP8 KV cache, through the Triton kernels: bfloat16 on the GPU with the FP8 cache
    against bfloat16 with the bfloat16 cache, teacher-forced over the held-out set in prompt chunks."""
    import functools

    import transformers

    launch = functools.partial(triton_attention.AttentionLaunch, fp8_qk=fp8_dots, fp8_pv=fp8_dots)
    monkeypatch.setattr(triton_attention, "AttentionLaunch", launch)
    # two engines on the same text: the device's stdlib need not give training's exact split
    stream = held_out_stream(transformers.AutoTokenizer.from_pretrained(BUNDLED), exact_split=False)
    bf16 = load_engine(BUNDLED, device="cuda", dtype="bfloat16", progress=False)
    fp8_kv = load_engine(BUNDLED, device="cuda", dtype="bfloat16", progress=False, kv_cache_dtype="fp8")
    loss, greedy, logits = teacher_forced_through_the_cache(bf16, stream, device="cuda")
    fp8_loss, fp8_greedy, fp8_logits = teacher_forced_through_the_cache(fp8_kv, stream, device="cuda")
    agreement = (greedy == fp8_greedy).float().mean().item()
    print(f"held-out loss bf16 KV {loss:.4f}, FP8 KV {fp8_loss:.4f} ({(fp8_loss / loss - 1) * 100:+.2f}%); greedy "
          f"top-1 agreement {agreement:.2%} over {len(greedy)} tokens; logits relative difference "
          f"{relative_error(fp8_logits, logits):.4f} ({'FP8' if fp8_dots else 'float16'} dots)")
    assert relative_error(fp8_logits, logits) > 1e-3  # the cache is FP8: the logits move
    assert fp8_loss <= loss * 1.02
    assert agreement >= 0.97
