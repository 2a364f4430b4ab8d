"""inflight-build: compile a Hugging Face checkpoint directory into an engine directory.

The arguments are parsed before torch and the builder are imported (seconds), so `--help` and a bad option answer
at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine_builder import __version__

QUANTIZATIONS = ("none", "fp8")  # engine_builder.quantize.QUANTIZATION_SCHEMES and none (no torch import for --help)

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # engine_dir.DTYPES without importing torch


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="inflight-build", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("--output", "-o", type=Path, required=True, help="engine directory to create (must not exist)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                        help="weight dtype (auto: the checkpoint's)")
    parser.add_argument("--max-seq-len", type=_positive, help="longest prompt + output (default: the model's context)")
    parser.add_argument("--max-batch-size", type=_positive, help="most requests in one step (default 256)")
    parser.add_argument("--max-num-tokens", type=_positive, help="most new tokens in one step (default 8192)")
    parser.add_argument(
        "--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights from config.json"
    )
    parser.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                        help="fp8: decoder linears' weights in float8_e4m3fn with per-output-channel scales, "
                        "activations quantized per token at run time (default none)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--version", action="version", version=f"inflight-build {__version__}")
    return parser


def build(args: argparse.Namespace) -> Path:
    """Run the build described by parsed arguments; returns the engine directory."""
    from engine_builder.checkpoint import read_checkpoint
    from engine_builder.checkpoint_weights import checkpoint_weights
    from engine_builder.convert import dummy_weights
    from engine_builder.engine_dir import DTYPES, EngineDirError, default_limits, resolve_dtype
    from engine_builder.engine_writer import write_engine_dir
    from engine_builder.models.registry import expected_shapes, instantiate_model
    from engine_builder.quantize import Quantization, quantize_weights, quantized_weight_names

    progress = not args.quiet
    started = time.perf_counter()
    log = (lambda message: print(message, file=sys.stderr)) if progress else (lambda message: None)
    if args.output.exists():
        raise EngineDirError(f"{args.output}: output path exists; remove it or choose another --output")
    checkpoint = read_checkpoint(args.checkpoint, with_weights=args.load_format != "dummy")
    dtype = resolve_dtype(args.dtype, checkpoint.hf_config)
    config = checkpoint.model_config
    limits = default_limits(config, args.max_seq_len, args.max_batch_size, args.max_num_tokens)
    log(
        f"{config.architecture}: {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads ({config.num_kv_heads} kv), vocab {config.vocab_size}, dtype {dtype}"
    )
    model = instantiate_model(config, DTYPES[dtype])
    shapes = expected_shapes(model)
    scheme = None if args.quantization == "none" else args.quantization
    if args.load_format == "dummy":
        converted, quantization = dummy_weights(shapes, DTYPES[dtype]), None
        if scheme is not None:
            converted, quantization = quantize_weights(converted, quantized_weight_names(model)), Quantization()
    else:
        converted, quantization = checkpoint_weights(checkpoint, shapes, DTYPES[dtype], scheme, progress=progress)
    if quantization is not None:
        log(f"FP8 weights ({quantization.source}: {quantization.weights}; activations {quantization.activations}); "
            f"embeddings, norms and lm_head stay {dtype}")
    weights = dict(converted)
    log(f"writing {args.output}")
    write_engine_dir(args.output, checkpoint, weights, dtype, limits, args.load_format, quantization)
    log(f"built {args.output} in {time.perf_counter() - started:.1f}s")
    return args.output


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        build(args)
    except (ValueError, OSError) as error:
        print(f"inflight-build: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("inflight-build: interrupted; no engine written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
