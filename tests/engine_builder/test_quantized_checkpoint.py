"""Pre-quantized FP8 checkpoints written by the real libraries (llm-compressor, ModelOpt) on the tiny Llama, on the CPU.

The references are the libraries' own float views of what they wrote: transformers + compressed-tensors loading an
llm-compressor checkpoint decompressed to float32, and ModelOpt's fake-quantized weights and quantizer amax
(fp8_checkpoint_writers.py writes both beside each checkpoint, in its own process). The reader's dequantized weights
must equal them (compressed-tensors: bit for bit; ModelOpt: to 2 float32 ulps, since it divides by 448/amax where
the exported scale is amax/448; one FP8 code apart would be ~6%).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_builder.checkpoint import CheckpointError, read_checkpoint
from engine_builder.fp8_checkpoint_weights import dequantize, read_fp8_weights
from engine_builder.models.registry import expected_shapes, instantiate_model
from engine_builder.quantized_checkpoint import FP8CheckpointScheme, detect_quantization

pytestmark = pytest.mark.slow  # each checkpoint is a subprocess that imports a quantization library (~10 s)

WRITERS = Path(__file__).with_name("fp8_checkpoint_writers.py")
LIBRARIES = {"llm-compressor": "llmcompressor", "modelopt": "modelopt"}  # looked up, never imported here
FP8_RTOL = 2.5e-7  # 2 float32 ulps (see the module docstring)
FUSED = {"attention.qkv_proj": ("self_attn", "qkv"), "mlp.gate_up_proj": ("mlp", ("gate", "up"))}


@pytest.fixture(scope="module")
def write(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """write(producer, scheme) -> the checkpoint directory that library wrote (once per module)."""
    written: dict[tuple[str, str], Path] = {}

    def writer(producer: str, scheme: str) -> Path:
        if importlib.util.find_spec(LIBRARIES[producer]) is None:
            pytest.skip(f"{producer} is not installed (pyproject's test extra says how to get it)")
        if (producer, scheme) not in written:
            out = tmp_path_factory.mktemp("fp8") / f"{producer}-{scheme.replace('+', '-')}"
            result = subprocess.run([sys.executable, str(WRITERS), producer, scheme, str(tiny_llama_dir), str(out)],
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-4000:]
            written[producer, scheme] = out
        return written[producer, scheme]

    return writer


def read(directory: Path) -> tuple[FP8CheckpointScheme, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(scheme, engine weights, the library's reference tensors) of a written checkpoint."""
    checkpoint = read_checkpoint(directory)
    scheme = detect_quantization(checkpoint)
    assert scheme is not None
    shapes = expected_shapes(instantiate_model(checkpoint.model_config, torch.float32))
    weights = dict(read_fp8_weights(checkpoint, shapes, torch.float32, scheme, progress=False))
    return scheme, weights, load_file(directory.with_name(directory.name + ".reference.safetensors"))


def hf_parts(engine_linear: str) -> list[str]:
    """HF module names (model.layers.i....) of an engine linear such as layers.0.attention.qkv_proj."""
    _, layer, block, projection = engine_linear.split(".")
    hf_block, parts = FUSED.get(f"{block}.{projection}", ("self_attn" if block == "attention" else "mlp",
                                                          (projection.removesuffix("_proj"),)))
    return [f"model.layers.{layer}.{hf_block}.{part}_proj" for part in parts]


def linears(weights: dict[str, torch.Tensor]) -> list[str]:
    return [name.removesuffix(".weight") for name, tensor in weights.items() if tensor.dtype == torch.float8_e4m3fn]


def check_weights(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], rtol: float) -> None:
    """Every decoder linear is FP8 with per-row float32 scales and dequantizes to the library's weights."""
    assert len(linears(weights)) == 2 * 4  # qkv, o, gate_up, down in each of the 2 layers
    for linear in linears(weights):
        scale = weights[f"{linear}.weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (weights[f"{linear}.weight"].shape[0],)
        expected = torch.cat([reference[f"{part}.weight"] for part in hf_parts(linear)])
        torch.testing.assert_close(dequantize(weights[f"{linear}.weight"], scale), expected, rtol=rtol, atol=0)


def check_close_to_original(weights: dict[str, torch.Tensor], tiny_llama_dir: Path) -> None:
    """The dequantized weights are the original float ones to FP8 rounding (3 mantissa bits: half a step is 1/16)."""
    original = load_file(tiny_llama_dir / "model.safetensors")
    for linear in linears(weights):
        scale = weights[f"{linear}.weight_scale"]
        dense = torch.cat([original[f"{part}.weight"] for part in hf_parts(linear)])
        error = (dequantize(weights[f"{linear}.weight"], scale) - dense).abs()
        assert (error <= dense.abs() / 16 + scale[:, None] * 2**-9).all(), linear  # 2**-9: e4m3's subnormal step
        assert error.max() > 0  # really quantized


def test_llm_compressor_fp8_dynamic(write: Callable[[str, str], Path], tiny_llama_dir: Path) -> None:
    scheme, weights, reference = read(write("llm-compressor", "FP8_DYNAMIC"))
    assert scheme == FP8CheckpointScheme(source="compressed-tensors", scheme="FP8_DYNAMIC", weights="channel",
                                         activations="dynamic", kv_cache_scales=False, ignored=("lm_head",))
    check_weights(weights, reference, rtol=0)
    check_close_to_original(weights, tiny_llama_dir)
    assert not [name for name in weights if name.endswith(("input_scale", "k_scale", "v_scale"))]
    for name, hf_name in [("embed_tokens.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight"),
                          ("layers.1.input_norm.weight", "model.layers.1.input_layernorm.weight")]:
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], reference[hf_name])


def test_llm_compressor_fp8_static(write: Callable[[str, str], Path], tiny_llama_dir: Path) -> None:
    directory = write("llm-compressor", "FP8")
    scheme, weights, reference = read(directory)
    assert (scheme.source, scheme.scheme, scheme.weights, scheme.activations) == (
        "compressed-tensors", "FP8", "tensor", "static")
    check_weights(weights, reference, rtol=0)
    check_close_to_original(weights, tiny_llama_dir)
    written = load_file(directory / "model.safetensors")
    for linear in linears(weights):
        scales = [written[f"{part}.input_scale"].reshape(()) for part in hf_parts(linear)]
        assert weights[f"{linear}.input_scale"].shape == ()
        assert weights[f"{linear}.input_scale"] == max(scales)  # fused parts: the largest
        weight_scales = [written[f"{part}.weight_scale"].reshape(()) for part in hf_parts(linear)]
        assert torch.equal(weights[f"{linear}.weight_scale"].unique(), torch.stack(weight_scales).unique())


def test_llm_compressor_kv_cache_scales(write: Callable[[str, str], Path]) -> None:
    directory = write("llm-compressor", "FP8+KV")
    checkpoint = read_checkpoint(directory)
    if checkpoint.hf_config["quantization_config"].get("kv_cache_scheme") is None:
        pytest.skip("llm-compressor wrote no KV-cache scales: compressed-tensors finds the attention's cache argument "
                    "by the name past_key_values, which this transformers calls `cache`")
    scheme, weights, _ = read(directory)
    assert scheme.kv_cache_scales
    written = load_file(directory / "model.safetensors")
    for layer in range(2):
        for kind in "kv":
            assert torch.equal(weights[f"layers.{layer}.attention.{kind}_scale"],
                               written[f"model.layers.{layer}.self_attn.{kind}_scale"].float().reshape(()))


def test_modelopt_fp8_with_kv_cache(write: Callable[[str, str], Path], tiny_llama_dir: Path) -> None:
    scheme, weights, reference = read(write("modelopt", "FP8_DEFAULT_CFG+KV"))
    assert scheme == FP8CheckpointScheme(source="modelopt", scheme="FP8", weights="tensor", activations="static",
                                         kv_cache_scales=True, ignored=("lm_head", "model.embed_tokens"))
    check_weights(weights, reference, rtol=FP8_RTOL)
    check_close_to_original(weights, tiny_llama_dir)
    for linear in linears(weights):  # ModelOpt's scale is amax / 448 (the largest FP8 e4m3 value)
        amax = max(reference[f"{part}.input_amax"].item() for part in hf_parts(linear))
        torch.testing.assert_close(weights[f"{linear}.input_scale"], torch.tensor(amax / 448), rtol=FP8_RTOL, atol=0)
    for layer in range(2):
        for kind in "kv":
            amax = reference[f"model.layers.{layer}.self_attn.{kind}_amax"].reshape(())
            scale = weights[f"layers.{layer}.attention.{kind}_scale"]
            assert scale.dtype == torch.float32 and scale.shape == ()
            torch.testing.assert_close(scale, amax / 448, rtol=FP8_RTOL, atol=0)


def test_modelopt_fp8_per_channel_per_token(write: Callable[[str, str], Path], tiny_llama_dir: Path) -> None:
    scheme, weights, reference = read(write("modelopt", "FP8_PER_CHANNEL_PER_TOKEN_CFG"))
    assert (scheme.scheme, scheme.weights, scheme.activations, scheme.kv_cache_scales) == (
        "FP8_PER_CHANNEL_PER_TOKEN", "channel", "dynamic", False)
    check_weights(weights, reference, rtol=FP8_RTOL)
    check_close_to_original(weights, tiny_llama_dir)
    assert not [name for name in weights if name.endswith("input_scale")]


@pytest.mark.parametrize(("producer", "scheme", "named"), [
    ("llm-compressor", "W8A8", "compressed-tensors weights int8 channel, activations int8 token dynamic"),
    ("llm-compressor", "FP8_BLOCK", "compressed-tensors weights float8 block [128, 128]"),
    ("modelopt", "NVFP4_DEFAULT_CFG", "ModelOpt NVFP4"),
])
def test_an_unsupported_scheme_is_one_line_naming_it(
    write: Callable[[str, str], Path], producer: str, scheme: str, named: str
) -> None:
    checkpoint = read_checkpoint(write(producer, scheme))
    with pytest.raises(CheckpointError) as raised:
        detect_quantization(checkpoint)
    message = str(raised.value)
    assert "\n" not in message and named in message and "is not supported; supported: " in message
    assert "FP8_DYNAMIC" in message and "FP8_PER_CHANNEL_PER_TOKEN" in message


def test_transformers_block_fp8_config_is_refused(tiny_llama_dir: Path) -> None:
    """quant_method "fp8" (DeepSeek-V3 / Qwen3-FP8 layout, block scales as weight_scale_inv): no CPU writer exists."""
    checkpoint = read_checkpoint(tiny_llama_dir)
    checkpoint.hf_config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                   "weight_block_size": [128, 128]}
    with pytest.raises(CheckpointError, match=r"fp8 \(block-wise, weight_block_size \[128, 128\]"):
        detect_quantization(checkpoint)


def test_an_unquantized_checkpoint_has_no_scheme(tiny_llama_dir: Path) -> None:
    assert detect_quantization(read_checkpoint(tiny_llama_dir)) is None


def fake_quantize_inputs(model: torch.nn.Module) -> None:
    """Round every decoder linear's input to FP8 with one scale per token (max |x| / 448), as a dynamic FP8 scheme
    does at run time (transformers' float model itself computes in float32)."""
    def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = inputs[0]
        scale = (x.abs().amax(dim=-1, keepdim=True) / 448.0).clamp(min=1e-12)
        return ((x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale,)

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            module.register_forward_pre_hook(hook)


@pytest.mark.parametrize(("producer", "scheme"), [("modelopt", "FP8_DEFAULT_CFG+KV"),
                                                  ("modelopt", "FP8_PER_CHANNEL_PER_TOKEN_CFG"),
                                                  ("llm-compressor", "FP8_DYNAMIC"), ("llm-compressor", "FP8")])
def test_the_runtime_runs_the_checkpoint_as_its_dequantized_transformers_model(
        write: Callable[[str, str], Path], tiny_llama_dir: Path, producer: str, scheme: str) -> None:
    from transformers import LlamaForCausalLM

    from engine_builder.forward_batch import build_forward_batch
    from engine_builder.loader import load_engine

    directory = write(producer, scheme)
    engine = load_engine(directory, device="cpu", dtype="float32", progress=False)
    prompt = [5, 17, 99, 3, 250, 41, 8, 77, 12, 300, 9, 64]
    batch = build_forward_batch([prompt], [0], [[0]], 16, num_outputs_per_request=[len(prompt)])
    ours = engine.backend.forward(batch, engine.backend.allocate_kv_cache(1, 16))
    reference_weights = load_file(directory.with_name(directory.name + ".reference.safetensors"))
    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    state = model.state_dict()
    state.update({name: tensor for name, tensor in reference_weights.items() if name in state})
    model.load_state_dict(state)
    with torch.no_grad():
        theirs = model(torch.tensor([prompt])).logits[0].float()
    # the library's dequantized weights; ours also rounds each linear's input to FP8, which on this random tiny model
    # moves the logits by about a tenth of their size
    assert (ours - theirs).norm() / theirs.norm() < 0.15
    if detect_quantization(read_checkpoint(directory)).activations == "dynamic":  # type: ignore[union-attr]
        fake_quantize_inputs(model)  # the reference rounds the inputs the same way: then they agree closely
        with torch.no_grad():
            theirs = model(torch.tensor([prompt])).logits[0].float()
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)
