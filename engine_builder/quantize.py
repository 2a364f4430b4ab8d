"""FP8 quantization: the scheme an engine records, the model transform that runs it, and build-time quantization.

    inflight-build --quantization fp8          weights of the model dtype -> quantize_weights -> engine dir:
                                               P.weight (float8_e4m3fn) + P.weight_scale (float32, per output row)
                                               for every linear of the decoder layers (qkv, o, gate_up, down);
                                               embed_tokens, the norms and lm_head stay in the model dtype
    loading (engine dir or checkpoint)         instantiate the model, quantize_model(model, scheme): its linears
                                               take FP8 weights, then the weights are attached by name

Activations are quantized to FP8 per token at run time ("dynamic"), or with one calibrated input_scale per linear
("static", from pre-quantized checkpoints that have them). kernels/fp8.py does the arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from engine_builder.kernels.fp8 import FP8, quantize_per_channel
from engine_builder.layers.linear import QuantizableLinear
from engine_builder.layers.norm import RMSNorm

QUANTIZATION_SCHEMES = ("fp8",)  # what --quantization and a manifest's `quantization` may name (besides none)
UNQUANTIZED = ("embed_tokens", "norms", "lm_head")  # kept in the model dtype
SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".k_scale", ".v_scale")  # float32 tensors, never cast
# the decoder linears' weights (QuantizableLinear), by their engine names
LINEAR_WEIGHTS = ("attention.qkv_proj.weight", "attention.o_proj.weight", "mlp.gate_up_proj.weight",
                  "mlp.down_proj.weight")
NORMS_BEFORE_LINEARS = ("input_norm", "post_attention_norm")  # read only by qkv_proj / gate_up_proj


@dataclass(frozen=True, slots=True)
class Quantization:
    """How an engine's weights are quantized (the manifest's `quantization_config`)."""

    scheme: str = "fp8"  # one of QUANTIZATION_SCHEMES
    weights: str = "float8_e4m3fn, one float32 scale per output channel"
    activations: str = "dynamic"  # "dynamic": per-token scales at run time; "static": one input_scale per linear
    unquantized: tuple[str, ...] = UNQUANTIZED
    source: str = "inflight-build"  # who quantized: inflight-build, compressed-tensors, modelopt

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "unquantized": list(self.unquantized)}

    @classmethod
    def from_dict(cls, data: dict[str, object] | None, scheme: str) -> Quantization:
        """The manifest's record (defaults for fields it lacks)."""
        values = {key: value for key, value in (data or {}).items() if key in cls.__dataclass_fields__}
        if "unquantized" in values:
            values["unquantized"] = tuple(values["unquantized"])  # type: ignore[arg-type]
        return cls(**{**values, "scheme": scheme})  # type: ignore[arg-type]


def check_scheme(name: str | None) -> str | None:
    """The scheme, None for none; ValueError naming the supported ones otherwise."""
    if name in (None, "none"):
        return None
    if name not in QUANTIZATION_SCHEMES:
        raise ValueError(f"quantization {name!r} is not supported (choose none or {', '.join(QUANTIZATION_SCHEMES)})")
    return name


def quantize_model(model: nn.Module, quantization: Quantization | None) -> nn.Module:
    """Make every decoder linear take FP8 weights (in place, before the weights are attached); returns the model.

    With per-token activation scales the norms before qkv and gate_up write FP8 themselves (GatedMLP's activation
    does the same for down, seeing its FP8 projection), so no separate pass quantizes those activations.
    """
    if quantization is not None:
        static = quantization.activations == "static"
        for name, module in model.named_modules():
            if isinstance(module, QuantizableLinear):
                module.quantize(static_input_scale=static)
            elif isinstance(module, RMSNorm) and name.endswith(NORMS_BEFORE_LINEARS):
                module.fp8_output = not static
    return model


def quantized_weight_names(model: nn.Module) -> set[str]:
    """The engine names of the weights that are FP8 once quantized (the decoder linears')."""
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, QuantizableLinear)}


def quantize_weights(weights: Iterable[tuple[str, torch.Tensor]],
                     names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Quantize the weights named in `names` per output channel; pass the others through.

    Args:
        weights: (engine name, tensor) in the model dtype.
        names: quantized_weight_names of the model.

    Returns:
        (name, tensor) pairs: P.weight as FP8 followed by P.weight_scale, for each quantized weight.
    """
    for name, tensor in weights:
        if name in names:
            quantized, scale = quantize_per_channel(tensor)
            yield name, quantized
            yield name.removesuffix(".weight") + ".weight_scale", scale.to(tensor.device)
        else:
            yield name, tensor


def keeps_its_dtype(name: str, tensor: torch.Tensor) -> bool:
    """FP8 weights and float32 scales are never cast to the model dtype."""
    return tensor.dtype == FP8 or name.endswith(SCALE_SUFFIXES)
