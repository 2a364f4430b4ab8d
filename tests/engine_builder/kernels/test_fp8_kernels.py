"""The FP8 Triton kernels (issue 16) against the torch reference on the GPU: the fused quantizing norm and
activation, the one-pass row quantization, and every batch-1 FP8 GEMV candidate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_builder.kernels.fp8 import FP8, FP8_MAX, Fp8Activations, fp8_linear_reference, quantize_per_channel
from engine_builder.kernels.rms_norm import rms_norm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
triton_fp8 = pytest.importorskip("engine_builder.kernels.triton_fp8")


def reference_rows(x: torch.Tensor, input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token (or static) FP8 rounding rule of kernels/fp8.py, in float32 torch ops on the host."""
    x32 = x.float().cpu()
    if input_scale is None:
        scale = (x32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    else:
        scale = input_scale.float().cpu().reshape(1, 1).expand(x.shape[0], 1)
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def assert_same_quantization(data: torch.Tensor, scale: torch.Tensor, x_model_dtype: torch.Tensor,
                             exact_input: bool = True) -> None:
    """data/scale as the reference rounds x (in the model dtype). exact_input: the kernel saw the same x, so the
    scales agree to float32 rounding (the kernel may divide by 448 as a multiplication) and the FP8 codes differ only
    on rounding boundaries (at most 1 in 1,000). Otherwise the kernel computed x itself (its rsqrt / exp round
    differently, one bfloat16 step now and then): the scales agree to that step and most codes exactly. Either way
    every dequantized value is within one e4m3 step (2^-3 relative) of the reference's."""
    expected_data, expected_scale = reference_rows(x_model_dtype)
    assert data.dtype == FP8 and scale.shape == (x_model_dtype.shape[0], 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale.cpu(), expected_scale, rtol=1e-6 if exact_input else 2**-7, atol=0)
    codes_differ = data.cpu().float() != expected_data.float()
    assert codes_differ.float().mean() <= (1e-3 if exact_input else 0.05)
    actual, expected = data.cpu().float() * scale.cpu(), expected_data.float() * expected_scale
    assert ((actual - expected).abs() <= expected.abs() * 2**-3 * 1.01 + expected_scale * 2**-9).all()


@pytest.mark.parametrize("rows,size", [(1, 4096), (7, 4096), (256, 14336), (3, 1000)])
def test_quantize_rows_matches_the_reference(rows, size):
    torch.manual_seed(rows + size)
    magnitudes = torch.logspace(-2, 2, rows, device="cuda")[:, None]
    x = torch.randn(rows, size, device="cuda", dtype=torch.bfloat16) * magnitudes
    data, scale = triton_fp8.quantize_rows_triton(x, None)
    assert_same_quantization(data, scale, x)
    static = torch.tensor(x.abs().max().item() / FP8_MAX * 0.5, device="cuda")  # half the range: some saturate
    data, scale = triton_fp8.quantize_rows_triton(x, static)
    expected_data, expected_scale = reference_rows(x, static)
    assert torch.equal(scale.cpu(), expected_scale) and data.float().abs().max().item() == FP8_MAX
    assert (data.cpu().float() != expected_data.float()).float().mean() <= 1e-3


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows,size", [(1, 4096), (130, 4096), (5, 2048)])
def test_rms_norm_fp8_is_the_norm_then_the_quantization(rows, size, with_residual):
    torch.manual_seed(size + rows)
    x = torch.randn(rows, size, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.rand(size, device="cuda", dtype=torch.bfloat16) + 0.5
    data, scale, summed = triton_fp8.rms_norm_fp8_triton(x, weight, 1e-5, residual)
    expected_input = x + residual if residual is not None else x
    normed = rms_norm(expected_input.cpu(), weight.cpu(), 1e-5)  # the torch reference, in bfloat16
    assert_same_quantization(data, scale, normed, exact_input=False)
    if residual is None:
        assert summed is None
    else:
        assert summed is not None and torch.equal(summed, expected_input)


@pytest.mark.parametrize("rows,size", [(1, 14336), (64, 14336), (9, 1000)])
def test_silu_and_mul_fp8_is_the_activation_then_the_quantization(rows, size):
    torch.manual_seed(rows)
    gate_up = torch.randn(rows, 2 * size, device="cuda", dtype=torch.bfloat16) * 3
    data, scale = triton_fp8.silu_and_mul_fp8_triton(gate_up)
    gate, up = gate_up.cpu().chunk(2, dim=-1)
    assert_same_quantization(data, scale, F.silu(gate) * up, exact_input=False)


@pytest.mark.parametrize("n,k,bias", [(4096, 4096, False), (6144, 4096, True), (28672, 4096, False),
                                      (4096, 14336, False), (1000, 304, True)])
def test_every_fp8_gemv_candidate_matches_the_dequantized_product(n, k, bias):
    from engine_builder.kernels.fp8 import quantize_activations
    from engine_builder.kernels.fp8_gemv import CANDIDATES, fp8_gemv

    torch.manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    weight, weight_scale = quantize_per_channel(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    expected = fp8_linear_reference(x.float(), weight, weight_scale, None if b is None else b.float())
    quantized = quantize_activations(x)
    assert isinstance(quantized, Fp8Activations)
    for config in CANDIDATES:
        out = fp8_gemv(quantized, weight, weight_scale, b, config)
        assert out.shape == (1, n) and out.dtype == torch.bfloat16
        # the same FP8 operands, float32 accumulation in another order, a bfloat16 output
        torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=2**-8 * expected.abs().max().item(),
                                   msg=str(config))


def test_tuning_chooses_an_fp8_kernel_that_gives_the_same_result():
    from engine_builder.kernels import fp8_gemv, gemv
    from engine_builder.kernels.fp8 import fp8_linear

    torch.manual_seed(3)
    pairs = [quantize_per_channel(torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
    saved = dict(fp8_gemv._choices)
    try:
        summary = gemv.tune_gemv([weight for weight, _ in pairs])
        assert set(summary) == {(6144, 4096)} and summary[(6144, 4096)] in {str(c) for c in fp8_gemv.CANDIDATES}
        x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
        weight, scale = pairs[0]
        expected = fp8_linear_reference(x.float(), weight, scale)
        torch.testing.assert_close(fp8_linear(x, weight, scale).float(), expected.float(), rtol=2**-7,
                                   atol=2**-8 * expected.abs().max().item())
    finally:
        fp8_gemv._choices.clear()
        fp8_gemv._choices.update(saved)
