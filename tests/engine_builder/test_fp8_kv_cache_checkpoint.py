"""A checkpoint's KV-cache scales, as ModelOpt calibrates and exports them (FP8_DEFAULT_CFG + FP8_KV_CFG, on CPU),
run the FP8 KV cache: the engine's logits are those of transformers on ModelOpt's dequantized weights with the same FP8
rounding of the linears' inputs and of K and V (after rotary, at the checkpoint's scales) in the attention.

llm-compressor's kv_cache_scheme writes no scales with this transformers (test_quantized_checkpoint.py says why).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_builder.forward_batch import build_forward_batch
from engine_builder.layers.attention import Attention
from engine_builder.loader import load_engine
from tests.engine_builder.test_fp8_kv_cache import torch_model
from tests.engine_builder.test_quantized_checkpoint import FP8_RTOL, write  # noqa: F401  (`write` is a fixture)

pytestmark = pytest.mark.slow  # the checkpoint is written by ModelOpt in a subprocess (~10 s)

FP8 = torch.float8_e4m3fn
PROMPT = [5, 17, 99, 3, 250, 41, 8, 77, 12, 300, 9, 64, 33, 21, 180, 7]


def fake_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x rounded as an FP8 tensor with one scale stores it: clamp(x / scale, ±448) in e4m3, times scale."""
    return (x.float() / scale).clamp(-448, 448).to(FP8).float().to(x.dtype) * scale


def checkpoint_scale(written: dict[str, torch.Tensor], layer: int, kind: str) -> torch.Tensor:
    (name,) = [n for n in written if re.fullmatch(rf"model\.layers\.{layer}\.self_attn\.(\w+\.)?{kind}_scale", n)]
    return written[name].float().reshape(())


def reference_logits(directory: Path, tiny_llama_dir: Path, kv_scales: dict[int, tuple[torch.Tensor, torch.Tensor]],
                     ) -> torch.Tensor:
    """transformers on ModelOpt's dequantized weights, each decoder linear's input rounded to FP8 at the checkpoint's
    static input_scale, and K and V rounded to FP8 at kv_scales[layer] where the attention reads them."""
    from transformers import AttentionInterface, LlamaForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fp8_kv_attention(module, query, key, value, *args, **kwargs):
        k_scale, v_scale = kv_scales[module.layer_idx]
        return sdpa_attention_forward(module, query, fake_fp8(key, k_scale), fake_fp8(value, v_scale), *args, **kwargs)

    AttentionInterface.register("fp8_kv_reference", fp8_kv_attention)
    written = load_file(directory / "model.safetensors")
    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32,
                                             attn_implementation="fp8_kv_reference").eval()
    state = model.state_dict()
    reference = load_file(directory.with_name(directory.name + ".reference.safetensors"))
    state.update({name: tensor for name, tensor in reference.items() if name in state})
    model.load_state_dict(state)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            scale = written[f"{name}.input_scale"].float().reshape(())
            module.register_forward_pre_hook(lambda _m, inputs, s=scale: (fake_fp8(inputs[0], s),))
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].float()


def chunked_logits(engine) -> torch.Tensor:
    """The prompt's logits, fed in two chunks so that the second attends to keys and values read from the cache."""
    kv = engine.backend.allocate_kv_cache(1, 16)
    half = len(PROMPT) // 2
    logits = []
    for start, chunk in ((0, PROMPT[:half]), (half, PROMPT[half:])):
        batch = build_forward_batch([chunk], [start], [[0]], 16, num_outputs_per_request=[len(chunk)])
        logits.append(engine.backend.forward(batch, kv))
    return torch.cat(logits)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def test_modelopts_kv_cache_scales_are_loaded_and_used(write: Callable[[str, str], Path],  # noqa: F811
                                                       tiny_llama_dir: Path) -> None:
    directory = write("modelopt", "FP8_DEFAULT_CFG+KV")
    written = load_file(directory / "model.safetensors")
    amax = load_file(directory.with_name(directory.name + ".reference.safetensors"))
    engine = load_engine(directory, device="cpu", dtype="float32", progress=False, kv_cache_dtype="fp8")
    layers = [m for m in torch_model(engine).modules() if isinstance(m, Attention)]
    scales = {layer: (checkpoint_scale(written, layer, "k"), checkpoint_scale(written, layer, "v")) for layer in (0, 1)}
    for layer, module in enumerate(layers):
        assert (module.k_scale, module.v_scale) == (scales[layer][0].item(), scales[layer][1].item())
        for kind, value in zip("kv", (module.k_scale, module.v_scale)):  # ModelOpt's scale: its calibrated amax / 448
            expected = amax[f"model.layers.{layer}.self_attn.{kind}_amax"].item() / 448
            assert value == pytest.approx(expected, rel=FP8_RTOL)
    assert engine.backend.allocate_kv_cache(1, 16)[0].key.dtype == FP8
    ours = chunked_logits(engine)
    theirs = reference_logits(directory, tiny_llama_dir, scales)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)
    # and the scales matter: at 1.0 (or without an FP8 cache) the logits leave the reference
    for module in layers:
        module.k_scale = module.v_scale = 1.0
    unscaled = chunked_logits(engine)
    auto = chunked_logits(load_engine(directory, device="cpu", dtype="float32", progress=False))
    error = relative_error(ours, theirs)
    print(f"relative error vs the reference: {error:.2e} with the checkpoint's KV scales, "
          f"{relative_error(unscaled, theirs):.2e} at scale 1.0, {relative_error(auto, theirs):.2e} without FP8 K/V")
    assert relative_error(unscaled, theirs) > 10 * error and relative_error(auto, theirs) > 10 * error
