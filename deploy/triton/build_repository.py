"""Build a Triton Inference Server model repository that serves an Inflight engine (see README.md here).

    python deploy/triton/build_repository.py ENGINE_DIR OUTPUT [--max-num-seqs 64] [--device auto]
        [--num-kv-blocks N | --kv-cache-memory-fraction F] [--max-model-len N] [--metrics-port P]
        [--backends DIR [--pytriton-site SITE]]

--backends DIR also assembles the Python backend for the Triton server of the nvidia-pytriton wheel (NGC's Triton
images have one already) and, beside it, the Python environment Triton's model process runs in (DIR/python-env:
SITE first, then the Inflight checkout and this Python's packages), and prints the tritonserver command. SITE is a
`pip install --no-deps --target SITE nvidia-pytriton==0.7.0 'numpy<2'` folder (pytriton's stubs need NumPy 1.x);
without it, the pytriton this Python imports is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from server.triton.repository import (
    assemble_python_backend,
    build_repository,
    make_triton_python,
    tritonserver_binary,
    tritonserver_environment,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", type=Path)
    parser.add_argument("output", type=Path)
    for option in ("--max-num-seqs", "--device", "--num-kv-blocks", "--kv-cache-memory-fraction", "--max-model-len",
                   "--metrics-port", "--log-level"):
        parser.add_argument(option)
    parser.add_argument("--backends", type=Path)
    parser.add_argument("--pytriton-site", type=Path)
    args = parser.parse_args()
    names = ("max_num_seqs", "device", "num_kv_blocks", "kv_cache_memory_fraction", "max_model_len", "metrics_port",
             "log_level")
    parameters = {name: str(getattr(args, name)) for name in names if getattr(args, name) is not None}
    try:
        build_repository(args.engine, args.output, parameters)
        if args.backends is not None:
            assemble_python_backend(args.backends, args.pytriton_site)
            python = make_triton_python(args.backends / "python-env", args.pytriton_site)
            env = tritonserver_environment(python, args.pytriton_site)
    except ValueError as error:
        print(f"build_repository: error: {error}", file=sys.stderr)
        return 2
    print(f"model repository: {args.output}")
    if args.backends is not None:
        variables = " ".join(f"{name}={value}" for name, value in env.items())
        print(f"start Triton with:\n  {variables} {tritonserver_binary(args.pytriton_site)} "
              f"--model-repository {args.output} --backend-directory {args.backends}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
