"""inflight-serve's command line: bad options fail in one line with exit code 2; sources merge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import UsageError, parse_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("INFLIGHT_")}
    environ.update(env or {})
    environ["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, env=environ,
                          cwd=REPO_ROOT, timeout=60)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--port", "eighty"], {}, "--port must be an integer, got 'eighty'"),
        (["--device", "tpu"], {}, "argument --device: invalid choice: 'tpu'"),
        (["--no-such-option"], {}, "unrecognized arguments: --no-such-option"),
        (["--num-kv-blocks", "8", "--kv-cache-memory-fraction", "0.5"], {}, "not allowed with argument"),
        (["/definitely/not/a/model"], {}, "model directory '/definitely/not/a/model' does not exist"),
        ([], {"INFLIGHT_PORT": "-1"}, "--port must be between 1 and 65535"),
        (["--config", "/nope.yaml"], {}, "--config file '/nope.yaml' does not exist"),
    ],
)
def test_bad_option_is_one_line_exit_2(args: list[str], env: dict[str, str], expected: str) -> None:
    result = run_cli(*args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("inflight-serve: error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_model_that_cannot_load_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    result = run_cli(str(tmp_path), "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("inflight-serve: error: ")


def test_help_exits_0() -> None:
    result = run_cli("--help")
    assert result.returncode == 0 and "--kv-cache-memory-fraction" in result.stdout


def test_parse_precedence(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f'model = "{model}"\nport = 9001\nlog_level = "debug"\napi_key = "file-key"\n')
    environ = {"INFLIGHT_PORT": "9002", "INFLIGHT_API_KEY": "env-key"}
    settings = parse_settings(["--config", str(config), "--api-key", "cli-key"], environ)
    assert (settings.port, settings.api_key, settings.log_level, settings.model) == (9002, "cli-key", "debug", model)
    settings = parse_settings([str(model), "--config", str(config), "--port", "9003", "--log-level", "WARNING"],
                              environ)
    assert (settings.port, settings.api_key, settings.log_level) == (9003, "env-key", "warning")


def test_parse_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="invalid choice"):
        parse_settings(["--dtype", "int4"], {})
