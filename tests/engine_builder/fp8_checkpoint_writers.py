"""Write pre-quantized FP8 checkpoints with the real libraries (run as a script, one checkpoint per process).

    python fp8_checkpoint_writers.py PRODUCER SCHEME SOURCE OUT

PRODUCER "llm-compressor": `oneshot` with QuantizationModifier(targets="Linear", scheme=SCHEME, ignore=["lm_head"])
(SCHEME "FP8_DYNAMIC", "FP8", "FP8+KV" = FP8 with an FP8 kv_cache_scheme, "W8A8", ...); the reference is the checkpoint
as transformers + compressed-tensors load it decompressed to float32.
PRODUCER "modelopt": mtq.quantize(model, mtq.<SCHEME>, forward_loop) ("FP8_DEFAULT_CFG", "FP8_DEFAULT_CFG+KV" = with
mtq.FP8_KV_CFG, "FP8_PER_CHANNEL_PER_TOKEN_CFG", "NVFP4_DEFAULT_CFG", ...), then export_hf_checkpoint; the reference
is ModelOpt's own fake-quantized weights (weight_quantizer(weight)) and its quantizers' amax.

Beside the checkpoint, OUT.reference.safetensors (not inside OUT: it would be read as a weight file) holds the
library's float32 view, by HF module name:
`<module>.weight` dequantized weights and, for ModelOpt, `<module>.input_amax` / `<attention>.k_amax` / `.v_amax`.
A separate process keeps the libraries' global patches (ModelOpt's, llm-compressor's session) out of the test run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

CALIBRATION = [torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def reference_file(out: Path) -> Path:
    """Where the library's float32 view of checkpoint OUT is written."""
    return out.with_name(out.name + ".reference.safetensors")


def llm_compressor(scheme: str, source: Path, out: Path) -> None:
    # The ignores: neither library is in every environment (pyproject's test extra says why).
    from compressed_tensors.quantization import QuantizationArgs  # pyright: ignore[reportMissingImports]
    from datasets import Dataset
    from llmcompressor.entrypoints.oneshot import oneshot  # pyright: ignore[reportMissingImports]
    from llmcompressor.modifiers.quantization import QuantizationModifier  # pyright: ignore[reportMissingImports]
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    name, _, kv = scheme.partition("+")
    kv_args = dict(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    kv_scheme = QuantizationArgs.model_validate(kv_args) if kv else None
    recipe = QuantizationModifier(targets="Linear", scheme=name, ignore=["lm_head"], kv_cache_scheme=kv_scheme)
    dataset = Dataset.from_dict({"input_ids": [ids[0].tolist() for ids in CALIBRATION]})
    oneshot(model=model, recipe=recipe, dataset=dataset, num_calibration_samples=len(CALIBRATION),
            max_seq_length=16, output_dir=str(out))
    if name in ("FP8", "FP8_DYNAMIC"):
        config = CompressedTensorsConfig(run_compressed=False)
        decompressed = AutoModelForCausalLM.from_pretrained(out, quantization_config=config, dtype=torch.float32)
        # cloned: a model with tied embeddings shares one tensor between two names, which safetensors refuses
        state = {key: value.clone().contiguous() for key, value in decompressed.state_dict().items()}
        save_file(state, str(reference_file(out)))


def modelopt(scheme: str, source: Path, out: Path) -> None:
    import modelopt.torch.quantization as mtq  # pyright: ignore[reportMissingImports]
    from modelopt.torch.export import export_hf_checkpoint  # pyright: ignore[reportMissingImports]

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    name, _, kv = scheme.partition("+")
    config = getattr(mtq, name)
    if kv:
        config = {**config, "quant_cfg": [*config["quant_cfg"], *mtq.FP8_KV_CFG["quant_cfg"]]}

    def forward_loop(module: torch.nn.Module) -> None:
        for ids in CALIBRATION:
            module(input_ids=ids)

    model = mtq.quantize(model, config, forward_loop)
    reference: dict[str, torch.Tensor] = {}
    with torch.no_grad():  # FP8 only: ModelOpt's NVFP4 fake quantization needs CUDA
        for module_name, module in model.named_modules() if name.startswith("FP8") else ():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is not None and quantizer.is_enabled:
                reference[f"{module_name}.weight"] = quantizer(module.weight).float().contiguous()
    export_hf_checkpoint(model, export_dir=str(out))
    for module_name, module in model.named_modules():  # after export: it unifies the amax of q/k/v and gate/up inputs
        for attribute, key in (("input_quantizer", "input_amax"), ("k_bmm_quantizer", "k_amax"),
                               ("v_bmm_quantizer", "v_amax")):
            quantizer = getattr(module, attribute, None)
            if quantizer is not None and quantizer.is_enabled and quantizer.amax is not None:
                reference[f"{module_name}.{key}"] = quantizer.amax.float().reshape(-1).contiguous()
    save_file(reference, str(reference_file(out)))


if __name__ == "__main__":
    producer, scheme_name, source_dir, out_dir = sys.argv[1:]
    writer = {"llm-compressor": llm_compressor, "modelopt": modelopt}[producer]
    writer(scheme_name, Path(source_dir), Path(out_dir))
