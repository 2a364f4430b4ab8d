"""What a newcomer meets first: the package metadata builds without warnings, the README matches the CLI, and its
Python snippet runs."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"


def test_package_metadata_builds_without_deprecation_warnings(tmp_path: Path) -> None:
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX license strings; pip builds with >=77")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    (tmp_path / "metadata").mkdir()
    result = subprocess.run(  # what pip runs to read the metadata, with every warning shown
        [sys.executable, "-W", "always", "-c",
         ("import sys; from setuptools import build_meta\n"
          "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"),
         str(tmp_path / "metadata")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    metadata = (tmp_path / "metadata" / result.stdout.split()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()


def readme_blocks(language: str = "") -> list[str]:
    """The README's fenced code blocks whose fence names `language` ("" for unnamed ones), without indentation."""
    blocks: list[tuple[str, list[str]]] = []
    inside = False
    for line in README.read_text().splitlines():
        fence = line.strip()
        if fence.startswith("```"):
            inside = not inside
            if inside:
                blocks.append((fence.removeprefix("```"), []))
        elif inside:
            blocks[-1][1].append(line)
    return [textwrap.dedent("\n".join(lines)) + "\n" for name, lines in blocks if name == language]


def test_load_engine_snippet_runs_on_the_bundled_model() -> None:
    (snippet,) = [block for block in readme_blocks("python") if "load_engine(" in block]
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Return the number of the current line." in result.stdout  # the greedy continuation the README quotes


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option not in ("--help",)}


@pytest.mark.parametrize("program", ["inflight-serve", "inflight-build"])
def test_readme_synopsis_lists_every_option_of_help(program: str) -> None:
    if program == "inflight-serve":
        from server.cli import build_parser
    else:
        from engine_builder.cli import build_parser
    (synopsis,) = [block for block in readme_blocks() if block.startswith(program + " ")]
    written = set(re.findall(r"--[a-z][a-z-]*", synopsis))
    written |= {f"--{name}" for name in re.findall(r"--\[no-\]([a-z-]+)", synopsis)}
    written |= {f"--no-{name}" for name in re.findall(r"--\[no-\]([a-z-]+)", synopsis)}
    assert long_options(build_parser()) - written == set()


def test_readme_option_defaults_are_the_settings_defaults() -> None:
    from server.config import ServerSettings

    defaults = {field.name: field.default for field in dataclasses.fields(ServerSettings)}
    rows = re.findall(r"^\| `--([a-z-]+)[^`]*` \| ([^|]+) \|", README.read_text(), flags=re.MULTILINE)
    numeric = [(name.replace("-", "_"), cell.strip()) for name, cell in rows if re.fullmatch(r"[0-9.]+", cell.strip())]
    assert {"engine_stall_timeout", "header_read_timeout", "max_connections"} <= {name for name, _ in numeric}
    for name, cell in numeric:
        assert float(cell) == defaults[name], f"README says --{name} defaults to {cell}; it is {defaults[name]}"


def test_torch_pin_and_cpu_index_agree_everywhere() -> None:
    for name in ("README.md", ".ci/run", "Dockerfile"):
        text = (REPO_ROOT / name).read_text()
        assert set(re.findall(r"torch==[0-9.]+", text)) == {"torch==2.13.0"}, name
        assert "https://download.pytorch.org/whl/cpu" in text, name
