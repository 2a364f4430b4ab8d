"""Build a Triton model repository for Inflight, and find the pieces to run it with the Triton server shipped in
the `nvidia-pytriton` wheel.

    MODEL_REPOSITORY/inflight/config.pbtxt     backend "python", decoupled, TensorRT-LLM-style inputs, engine params
    MODEL_REPOSITORY/inflight/1/model.py       deploy/triton/model.py (the code: server/triton/backend.py)
    BACKENDS/python/                           libtriton_python.so, triton_python_backend_utils.py, the stub for
                                               this Python (only with pytriton's server; NGC images have their own)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site as site_module
import sys
import sysconfig
import venv
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_FILE = REPO_ROOT / "deploy" / "triton" / "model.py"
MODEL_NAME = "inflight"

# (name, Triton type, dims): the inputs TensorRT-LLM's Triton models take, where Inflight has them; all optional
# but text_input.
INPUTS = [
    ("text_input", "TYPE_STRING", "[ 1 ]"),
    ("max_tokens", "TYPE_INT32", "[ 1 ]"),
    ("stream", "TYPE_BOOL", "[ 1 ]"),
    ("temperature", "TYPE_FP32", "[ 1 ]"),
    ("top_k", "TYPE_INT32", "[ 1 ]"),
    ("top_p", "TYPE_FP32", "[ 1 ]"),
    ("seed", "TYPE_UINT64", "[ 1 ]"),
    ("stop_words", "TYPE_STRING", "[ -1 ]"),
    ("end_id", "TYPE_INT32", "[ 1 ]"),
    ("beam_width", "TYPE_INT32", "[ 1 ]"),
    ("min_tokens", "TYPE_INT32", "[ 1 ]"),
    ("presence_penalty", "TYPE_FP32", "[ 1 ]"),
    ("frequency_penalty", "TYPE_FP32", "[ 1 ]"),
    ("repetition_penalty", "TYPE_FP32", "[ 1 ]"),
]
OUTPUTS = [("text_output", "TYPE_STRING", "[ 1 ]"), ("output_ids", "TYPE_INT32", "[ -1 ]")]


def model_config(parameters: dict[str, str]) -> str:
    """config.pbtxt of the `inflight` model, with the engine settings as parameters."""
    def tensor(name: str, kind: str, dims: str, optional: bool) -> str:
        return (f"  {{ name: \"{name}\" data_type: {kind} dims: {dims}"
                f"{' optional: true' if optional else ''} }}")

    inputs = ",\n".join(tensor(name, kind, dims, name != "text_input") for name, kind, dims in INPUTS)
    outputs = ",\n".join(tensor(name, kind, dims, False) for name, kind, dims in OUTPUTS)
    params = "\n".join(f"parameters {{ key: \"{key}\" value: {{ string_value: \"{value}\" }} }}"
                       for key, value in parameters.items())
    return (f"name: \"{MODEL_NAME}\"\nbackend: \"python\"\nmax_batch_size: 0\n"
            "model_transaction_policy { decoupled: true }\n"
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
            f"{params}\n")


def build_repository(engine_path: Path, output: Path, parameters: dict[str, str] | None = None) -> Path:
    """Write the model repository for `engine_path` (an engine or checkpoint directory) to `output`.

    Raises ValueError when the engine directory is missing or the output exists.
    """
    if not engine_path.is_dir():
        raise ValueError(f"engine directory {str(engine_path)!r} does not exist")
    if output.exists():
        raise ValueError(f"output {str(output)!r} exists; choose a new directory")
    model = output / MODEL_NAME
    (model / "1").mkdir(parents=True)
    shutil.copy(MODEL_FILE, model / "1" / "model.py")
    (model / "config.pbtxt").write_text(model_config({"engine_path": str(engine_path.resolve()),
                                                      **(parameters or {})}))
    return output


def pytriton_dir(site: Path | None = None) -> Path | None:
    """Where the `nvidia-pytriton` wheel put its Triton server: under `site` (a `pip install --target` folder) when
    given, else where this Python finds it (None when it is in neither)."""
    if site is not None:
        server = site / "pytriton" / "tritonserver"
        return server if server.is_dir() else None
    spec = importlib.util.find_spec("pytriton")  # found without importing it (its own dependencies are not needed)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def _server(site: Path | None) -> Path:
    server = pytriton_dir(site)
    if server is None:
        raise ValueError("the nvidia-pytriton package is not installed (pip install --no-deps --target SITE "
                         "nvidia-pytriton==0.7.0 'numpy<2')")
    return server


def assemble_python_backend(backends: Path, site: Path | None = None) -> Path:
    """BACKENDS/python for pytriton's tritonserver: its Python backend and the stub of this Python version."""
    server = _server(site)
    target = backends / "python"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy(server / "backends" / "python" / name, target / name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ValueError(f"pytriton has no Python backend stub for Python {version}")
    shutil.copy(stub, target / "triton_python_backend_stub")
    os.chmod(target / "triton_python_backend_stub", 0o755)
    return backends


def make_triton_python(target: Path, site: Path | None = None) -> Path:
    """A Python environment for Triton's model process: a venv (no packages of its own) whose path is `site` first,
    then the Inflight checkout, then this Python's packages.

    pytriton's backend stubs are built against NumPy 1.x: with NumPy 2 in the model process every input tensor reads
    wrong (each element a copy of the first), so `site` holds numpy<2 (pip install --no-deps --target SITE
    nvidia-pytriton==0.7.0 'numpy<2'). The stub ignores PYTHONPATH and takes the `python3` it finds on PATH, so this
    venv goes first on PATH (tritonserver_environment).
    """
    venv.EnvBuilder(with_pip=False, clear=True).create(target)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    packages = [path for path in (*site_module.getsitepackages(), site_module.getusersitepackages())
                if Path(path).is_dir()]
    (target / "lib" / version / "site-packages" / "inflight.pth").write_text(
        "\n".join([*([str(site)] if site else []), str(REPO_ROOT), *packages]) + "\n")
    return target


def tritonserver_environment(triton_python: Path, site: Path | None = None) -> dict[str, str]:
    """What pytriton's tritonserver needs on top of this environment: its bundled libraries and this Python's
    libpython on the library path, and `triton_python` (make_triton_python) first on PATH."""
    server = _server(site)
    libs = [str(server.parent.parent / "nvidia_pytriton.libs"), str(sysconfig.get_config_var("LIBDIR"))]
    library_path = ":".join([*libs, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
    return {"LD_LIBRARY_PATH": library_path, "PATH": f"{triton_python / 'bin'}:{os.environ.get('PATH', '')}"}


def tritonserver_binary(site: Path | None = None) -> Path:
    return _server(site) / "bin" / "tritonserver"
