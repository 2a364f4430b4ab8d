"""Which pre-quantized FP8 format a Hugging Face checkpoint is in, from its config files (no tensor is read).

Two producers are understood, both as they write FP8 today:

    llm-compressor / compressed-tensors    config.json quantization_config:
        quant_method "compressed-tensors", format "float-quantized", quantization_status "compressed",
        config_groups.*.weights           {num_bits 8, type float, strategy channel | tensor, symmetric}
        config_groups.*.input_activations {dynamic true, strategy token} (FP8_DYNAMIC) | {dynamic false, strategy
                                          tensor} (FP8), ignore ["lm_head", ...], kv_cache_scheme null | {8-bit float,
                                          strategy tensor, static}
    NVIDIA ModelOpt (unified HF export)    hf_quant_config.json {"quantization": {quant_algo, kv_cache_quant_algo,
        exclude_modules}}; recent versions also put quantization_config {quant_method "modelopt", quant_algo, ignore,
        kv_cache_scheme} into config.json. quant_algo "FP8" (per-tensor weight and input scales) or
        "FP8_PER_CHANNEL_PER_TOKEN" (per-channel weight scales, activations per token at run time)

Anything else that declares a quantization (INT8/INT4 schemes, NVFP4, MXFP*, FP8 block-wise such as quant_method
"fp8" with weight_block_size, GPTQ, AWQ, bitsandbytes, ...) is a CheckpointError of one line naming the scheme and what
is supported. The tensors are read by fp8_checkpoint_weights.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_builder.checkpoint import Checkpoint, CheckpointError

MODELOPT_CONFIG = "hf_quant_config.json"
SUPPORTED = (
    "supported: compressed-tensors float-quantized FP8 (llm-compressor FP8 / FP8_DYNAMIC: 8-bit float weights per "
    "channel or per tensor, activations static per tensor or dynamic per token) and ModelOpt quant_algo FP8 or "
    "FP8_PER_CHANNEL_PER_TOKEN"
)
# ModelOpt quant_algo -> (weight scales, activations)
MODELOPT_FP8 = {"FP8": ("tensor", "static"), "FP8_PER_CHANNEL_PER_TOKEN": ("channel", "dynamic")}
# compressed-tensors preset names for the combinations its presets produce
COMPRESSED_TENSORS_PRESETS = {("tensor", "static"): "FP8", ("channel", "dynamic"): "FP8_DYNAMIC"}


@dataclass(frozen=True, slots=True)
class FP8CheckpointScheme:
    """A checkpoint's FP8 quantization as its producer declared it."""

    source: str  # who wrote it: "compressed-tensors" (llm-compressor) or "modelopt"
    scheme: str  # the producer's name: "FP8" / "FP8_DYNAMIC" (compressed-tensors presets), ModelOpt's quant_algo
    weights: str  # how weight scales are laid out in the files: "channel" (one per output row) or "tensor" (one)
    activations: str  # "static": one calibrated input_scale per linear; "dynamic": per-token scales at run time
    kv_cache_scales: bool  # the checkpoint has a k_scale and v_scale (float32 scalars) per attention layer
    ignored: tuple[str, ...]  # modules left unquantized, as the producer names them (e.g. "lm_head"; "re:" regexes)

    @property
    def description(self) -> str:
        """One line for logs, e.g. 'compressed-tensors FP8_DYNAMIC (weights per channel, activations dynamic)'."""
        kv = ", FP8 KV-cache scales" if self.kv_cache_scales else ""
        return f"{self.source} {self.scheme} (weights per {self.weights}, activations {self.activations}{kv})"


def _unsupported(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: quantization {what} is not supported; {SUPPORTED}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read the quantization config: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the quantization config is not a JSON object")
    return data


def detect_quantization(checkpoint: Checkpoint) -> FP8CheckpointScheme | None:
    """The checkpoint's pre-quantized FP8 scheme, from config.json (and ModelOpt's hf_quant_config.json).

    Args:
        checkpoint: a checkpoint read by read_checkpoint (weights need not be indexed).

    Returns:
        The scheme, or None when the checkpoint declares no quantization.

    Raises:
        CheckpointError: one line naming a declared scheme that is not FP8 as supported here, and what is.
    """
    return detect_quantization_config(checkpoint.path, checkpoint.hf_config)


def detect_quantization_config(path: Path, hf_config: dict[str, Any]) -> FP8CheckpointScheme | None:
    """detect_quantization on a directory and its parsed config.json (see there)."""
    modelopt_file = path / MODELOPT_CONFIG
    config = hf_config.get("quantization_config")
    if modelopt_file.exists():
        return _modelopt(modelopt_file, _read_json(modelopt_file).get("quantization"))
    if config is None:
        return None
    where = path / "config.json"
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: quantization_config is not a JSON object")
    method = config.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(where, config)
    if method == "modelopt":
        return _modelopt(where, config)
    if method == "fp8":  # transformers' own FP8 format (DeepSeek-V3, Qwen3-FP8): block scales as weight_scale_inv
        block = config.get("weight_block_size")
        raise _unsupported(where, f"fp8 (block-wise, weight_block_size {block}, scales in weight_scale_inv)")
    raise _unsupported(where, repr(method))


def _modelopt(where: Path, config: Any) -> FP8CheckpointScheme:
    """hf_quant_config.json's "quantization" object, or config.json's quantization_config from ModelOpt."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: no 'quantization' object")
    algo = config.get("quant_algo")
    if algo not in MODELOPT_FP8:
        extra = f", group_size {config['group_size']}" if "group_size" in config else ""
        raise _unsupported(where, f"ModelOpt {algo}{extra}")
    kv_algo = config.get("kv_cache_quant_algo")
    if "kv_cache_quant_algo" not in config and isinstance(config.get("kv_cache_scheme"), dict):
        kv_scheme = config["kv_cache_scheme"]  # config.json's form: {num_bits 8, type float, dynamic false}
        kv_algo = "FP8" if (kv_scheme.get("num_bits"), kv_scheme.get("type")) == (8, "float") else str(kv_scheme)
    if kv_algo not in (None, "FP8"):
        raise _unsupported(where, f"ModelOpt {algo} with KV cache {kv_algo}")
    weights, activations = MODELOPT_FP8[algo]
    ignored = config.get("exclude_modules", config.get("ignore")) or []
    return FP8CheckpointScheme(source="modelopt", scheme=algo, weights=weights, activations=activations,
                               kv_cache_scales=kv_algo == "FP8", ignored=tuple(ignored))


def _compressed_tensors(where: Path, config: dict[str, Any]) -> FP8CheckpointScheme:
    """config.json's quantization_config as compressed-tensors writes it."""
    fmt = config.get("format")
    status = config.get("quantization_status")
    if config.get("sparsity_config"):
        raise _unsupported(where, f"compressed-tensors with sparsity ({config['sparsity_config'].get('format')})")
    if config.get("transform_config"):
        raise _unsupported(where, "compressed-tensors with transforms (rotations such as SpinQuant/QuIP)")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}: compressed-tensors quantization_config has no config_groups")
    layouts = {_compressed_tensors_group(where, name, group) for name, group in groups.items()}
    if len(layouts) > 1:
        raise _unsupported(where, f"compressed-tensors with mixed FP8 layouts {sorted(layouts)}")
    group_formats = {str(group["format"]) for group in groups.values() if group.get("format")}  # groups: dicts
    if fmt not in (None, "float-quantized", "mixed-precision") or group_formats - {"float-quantized"}:
        raise _unsupported(where, f"compressed-tensors format {fmt or sorted(group_formats)} (FP8 needs "
                                  "float-quantized: saved with save_compressed=True)")
    if status != "compressed":
        raise _unsupported(where, f"compressed-tensors quantization_status {status!r} (weights not compressed to "
                                  "FP8: save with save_compressed=True)")
    weights, activations = layouts.pop()
    kv_scheme = config.get("kv_cache_scheme")
    if kv_scheme is not None:
        kv = _args_text(kv_scheme)
        if not isinstance(kv_scheme, dict) or (
            kv_scheme.get("num_bits"), kv_scheme.get("type"), kv_scheme.get("strategy"), kv_scheme.get("dynamic")
        ) != (8, "float", "tensor", False):
            raise _unsupported(where, f"compressed-tensors KV cache {kv}")
    name = COMPRESSED_TENSORS_PRESETS.get((weights, activations), "FP8 (custom config_groups)")
    return FP8CheckpointScheme(source="compressed-tensors", scheme=name, weights=weights, activations=activations,
                               kv_cache_scales=kv_scheme is not None, ignored=tuple(config.get("ignore") or ()))


def _args_text(args: Any) -> str:
    """QuantizationArgs in a few words: 'int4 group 128', 'float8 block [128, 128]'."""
    if not isinstance(args, dict):
        return repr(args)
    text = f"{args.get('type')}{args.get('num_bits')} {args.get('strategy')}"
    for key in ("group_size", "block_structure"):
        if args.get(key):
            text += f" {args[key]}"
    return text + (" dynamic" if args.get("dynamic") is True else "")


def _compressed_tensors_group(where: Path, name: str, group: Any) -> tuple[str, str]:
    """(weight strategy, "static" | "dynamic") of one supported config group; CheckpointError otherwise."""
    if not isinstance(group, dict):
        raise CheckpointError(f"{where}: config_groups.{name} is not a JSON object")
    weights, inputs = group.get("weights"), group.get("input_activations")
    if not isinstance(weights, dict):
        raise _unsupported(where, f"compressed-tensors group {name} without weight quantization")
    what = f"compressed-tensors weights {_args_text(weights)}"
    if inputs is not None:
        what += f", activations {_args_text(inputs)}"
    if group.get("output_activations") is not None:
        raise _unsupported(where, f"{what}, output activations {_args_text(group['output_activations'])}")
    if (weights.get("num_bits"), weights.get("type")) != (8, "float") or weights.get("strategy") not in (
        "channel", "tensor"
    ):
        raise _unsupported(where, what)
    if weights.get("symmetric") is False or weights.get("dynamic"):
        raise _unsupported(where, f"{what} (asymmetric or dynamic weights)")
    if not isinstance(inputs, dict):
        raise _unsupported(where, f"{what}, activations unquantized (FP8 weight-only)")
    if (inputs.get("num_bits"), inputs.get("type")) != (8, "float"):
        raise _unsupported(where, what)
    if inputs.get("dynamic") is True and inputs.get("strategy") == "token":
        return weights["strategy"], "dynamic"
    if inputs.get("dynamic") is False and inputs.get("strategy") == "tensor":
        return weights["strategy"], "static"
    raise _unsupported(where, what)
