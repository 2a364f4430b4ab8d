"""The CPU image from the Dockerfile, built and run with Docker: /health and the HEALTHCHECK, a greedy completion equal
to the native server's, structured output, a non-root server, no build tools or caches in the image, a clean stop.

    tools/docker_base.sh ──▶ local/debian:bookworm (debootstrap; no image registry is needed)
    repo copy + torch's CPU wheel + pip's CA bundle ──docker build --network host──▶ inflight:cpu-test
    docker run --network none ──▶ queried from inside (docker exec), compared with `inflight-serve` run natively

Marked slow: needs a Docker daemon (skipped without one, as in CI) and root for debootstrap. The first build takes
about 10 minutes (torch and the other packages are downloaded into the image), a rebuild with its layers cached
about a minute. Run it, with the image size shown in the summary, as

    dockerd --iptables=false --bridge=none --storage-driver=vfs &     # once, as root
    pytest -m slow tests/deploy/test_docker.py -rP
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE = "inflight:cpu-test"
BASE = "local/debian:bookworm"
BASE_PYTHON = "cp311"  # Debian bookworm's python3
BUILD_TIMEOUT = 45 * 60
# torch's CPU build is about 0.75 GB of it; the CUDA build or triton (1 GB, removed from CPU images) would pass this.
MAX_IMAGE_BYTES = 1_600_000_000
STOP_TIMEOUT = 40  # docker stop -t: more than the server's default --drain-timeout (30 s)
# Not copied into the build context (.dockerignore leaves out the rest of what is not needed).
NOT_IN_CONTEXT = (".git", ".venv", ".whl", ".oldtree", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")
COMPLETION = {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "color"], "additionalProperties": False}

# Run inside the container: one HTTP request to the server there; prints {"status": ..., "body": ...}.
CLIENT = """
import json, sys, urllib.error, urllib.request
path, body = sys.argv[1], sys.argv[2]
request = urllib.request.Request("http://127.0.0.1:8000" + path, data=body.encode() if body else None,
                                 headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=60) as response:
        print(json.dumps({"status": response.status, "body": response.read().decode()}))
except urllib.error.HTTPError as error:
    print(json.dumps({"status": error.code, "body": error.read().decode()}))
"""

# Run inside the image as root (nothing hidden by permissions): what a final image must not contain.
IMAGE_FACTS = """
import importlib.util, json, os, shutil, torch
leftovers = []
for top in ("/opt", "/tmp", "/root", "/home", "/usr/local", "/var/cache"):
    for directory, subdirectories, files in os.walk(top):
        if os.path.basename(directory) == "pip" and os.path.basename(os.path.dirname(directory)) == ".cache":
            leftovers.append(directory)
        leftovers += [os.path.join(directory, name) for name in files if name.endswith((".whl", ".crt", ".deb"))]
print(json.dumps({
    "compilers": [name for name in ("gcc", "cc", "c++", "g++", "clang", "make", "ld") if shutil.which(name)],
    "apt_lists": os.listdir("/var/lib/apt/lists") if os.path.isdir("/var/lib/apt/lists") else [],
    "leftovers": leftovers,
    "triton": importlib.util.find_spec("triton") is not None,
    "torch_cuda": torch.version.cuda,
}))
"""


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """`docker ARGS`, its output as text; a failure (with check) fails the test with docker's own message."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:3])} ... exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def pip_config() -> dict[str, str]:
    """pip's configuration here (`pip config list`: global.find-links, global.cert, ...), the PIP_* variables on top."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    config = {key.split(".", 1)[-1]: value for key, value in re.findall(r"^([\w.:-]+)='(.*)'$", listing, re.M)}
    for name in ("find-links", "cert"):
        config[name] = os.environ.get("PIP_" + name.upper().replace("-", "_"), config.get(name, ""))
    return config


def torch_pin() -> str:
    """The torch version the Dockerfile installs (its TORCH build argument's default)."""
    match = re.search(r'^ARG TORCH="torch==([^"]+)"', (REPO_ROOT / "Dockerfile").read_text(), re.M)
    assert match, "the Dockerfile has no ARG TORCH=\"torch==<version>\""
    return match.group(1)


def build_context(directory: Path) -> list[str]:
    """Copy the repository into `directory` with, where pip here has them, torch's CPU wheel and pip's CA bundle.

    Returns:
        The extra `docker build` arguments: TORCH_INDEX= when the wheel is there (else PyTorch's CPU index is used).
    """
    shutil.copytree(REPO_ROOT, directory, ignore=shutil.ignore_patterns(*NOT_IN_CONTEXT))
    config = pip_config()
    if config["cert"] and Path(config["cert"]).is_file():  # a TLS-intercepting proxy's CA, which pip here trusts
        shutil.copy(config["cert"], directory / "deploy" / "docker" / "certs" / "pip-here.crt")
    pattern = f"torch-{torch_pin()}+cpu-{BASE_PYTHON}-{BASE_PYTHON}-*linux*x86_64.whl"
    wheels = [wheel for links in config["find-links"].split() for wheel in Path(links).glob(pattern)]
    if not wheels:
        return []
    target = directory / "deploy" / "docker" / "wheels" / wheels[0].name
    try:
        os.link(wheels[0], target)  # 190 MB: a hard link where it can
    except OSError:
        shutil.copy(wheels[0], target)
    return ["--build-arg", "TORCH_INDEX="]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CPU image, built from a copy of the repository on the debootstrap base (made if missing)."""
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker daemon (`docker info` fails): start dockerd to build and run the image")
    base = subprocess.run(["bash", str(REPO_ROOT / "tools" / "docker_base.sh"), BASE], capture_output=True,
                          text=True, timeout=30 * 60)
    assert base.returncode == 0, f"tools/docker_base.sh failed:\n{base.stdout}{base.stderr}"
    context = tmp_path_factory.mktemp("docker") / "context"
    extra = build_context(context)
    previous = docker("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    log = context.parent / "build.log"
    with log.open("w") as output:
        build = subprocess.run(["docker", "build", "--network", "host", "--build-arg", "DEVICE=cpu",
                                "--build-arg", f"BASE={BASE}", *extra, "-t", IMAGE, str(context)],
                               stdout=output, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT)
    shutil.rmtree(context)
    assert build.returncode == 0, "docker build failed:\n" + "\n".join(log.read_text().splitlines()[-60:])
    current = docker("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    if previous and previous != current:  # the image this tag named before: untagged now, 1.3 GB on disk
        docker("rmi", previous, check=False)
    return IMAGE


def in_container(container: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    """One request to the server inside `container` (it has no network to reach from here); (status, body)."""
    result = docker("exec", container, "python", "-c", CLIENT, path, json.dumps(body) if body else "")
    answer = json.loads(result.stdout)
    return answer["status"], answer["body"]


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[str]:
    """The image run with no network and no arguments (the bundled model), once /health answers 200 inside it."""
    name = f"inflight-test-{uuid.uuid4().hex[:8]}"
    docker("run", "--detach", "--network", "none", "--name", name, image)
    try:
        deadline = time.monotonic() + 180
        while docker("exec", name, "python", "-c", CLIENT, "/health", "", check=False).returncode != 0:
            running = docker("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            assert running == "true" and time.monotonic() < deadline, docker("logs", name).stdout[-3000:]
            time.sleep(0.5)
        yield name
    finally:
        docker("rm", "--force", name, check=False)


def test_image_size_is_reported_and_bounded(image: str) -> None:
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    print(f"\n{image} (CPU, {BASE}): {size / 1e9:.2f} GB ({size:,} bytes)")
    assert size < MAX_IMAGE_BYTES, f"{image} is {size:,} bytes, more than {MAX_IMAGE_BYTES:,}"


def test_health_is_200_and_the_healthcheck_turns_healthy(container: str) -> None:
    status, body = in_container(container, "/health")
    assert status == 200, body
    deadline = time.monotonic() + 60  # the HEALTHCHECK runs every 10 s
    while (health := docker("inspect", "--format", "{{.State.Health.Status}}", container).stdout.strip()) != "healthy":
        assert health == "starting" and time.monotonic() < deadline, docker("inspect", container).stdout[-3000:]
        time.sleep(1)


def test_greedy_completion_equals_the_native_servers(container: str, serve_cli_fn, port: int,
                                                     bundled_model_dir: Path, tmp_path: Path) -> None:
    status, body = in_container(container, "/v1/completions", COMPLETION)
    assert status == 200, body
    in_image = json.loads(body)
    native_server = serve_cli_fn([str(bundled_model_dir), "--device", "cpu"], tmp_path / "native.log", port)
    try:
        native = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=COMPLETION, timeout=60).json()
    finally:
        native_server.terminate()
        native_server.wait(timeout=60)
    assert in_image["model"] == native["model"] == "inflight-tiny"
    assert in_image["choices"][0]["text"] == native["choices"][0]["text"]
    assert in_image["choices"][0]["text"].strip()
    assert in_image["choices"][0]["finish_reason"] == native["choices"][0]["finish_reason"]
    assert in_image["usage"] == native["usage"]


def test_structured_output_works_without_triton(container: str) -> None:
    body = {**COMPLETION, "max_tokens": 100,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}}
    status, text = in_container(container, "/v1/completions", body)
    assert status == 200, text
    jsonschema.validate(json.loads(json.loads(text)["choices"][0]["text"]), SCHEMA)


def test_every_process_runs_as_a_non_root_user(container: str) -> None:
    script = ("import json, os; print(json.dumps({pid: [line.split()[1:] for line in open(f'/proc/{pid}/status')"
              " if line.startswith(('Uid:', 'Gid:'))] for pid in os.listdir('/proc') if pid.isdigit()}))")
    ids = json.loads(docker("exec", container, "python", "-c", script).stdout)
    assert "1" in ids and len(ids) >= 3, ids  # the server (PID 1), its engine core process, this script
    # real, effective, saved and file-system user and group ids of every process
    assert all(user == group == ["10001"] * 4 for user, group in ids.values()), ids


def test_the_image_has_no_build_tools_caches_or_build_inputs(image: str) -> None:
    result = docker("run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "python", image, "-c",
                    IMAGE_FACTS)
    facts = json.loads(result.stdout)
    assert facts["compilers"] == []
    assert facts["apt_lists"] == []
    assert facts["leftovers"] == []  # pip caches, wheels, the build's CA certificates, .deb files
    assert facts["triton"] is False
    assert facts["torch_cuda"] is None


def test_docker_stop_drains_and_exits_0(container: str) -> None:
    started = time.monotonic()
    docker("stop", "--time", str(STOP_TIMEOUT), container, timeout=STOP_TIMEOUT + 30)
    elapsed = time.monotonic() - started
    state = json.loads(docker("inspect", "--format", "{{json .State}}", container).stdout)
    logs = docker("logs", container)
    output = logs.stdout + logs.stderr
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, output[-3000:])
    assert elapsed < STOP_TIMEOUT, f"docker stop took {elapsed:.1f} s: the server did not stop on SIGTERM"
    assert "SIGTERM: draining" in output and "drained; shutting down" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
