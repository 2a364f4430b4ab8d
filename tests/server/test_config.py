"""Settings merge: command line > INFLIGHT_* environment > config file > defaults, and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import BUNDLED_MODEL, ServerSettings, merge_settings


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "my-model"
    directory.mkdir()
    return directory


def test_defaults(model_dir: Path) -> None:
    settings = merge_settings({"model": str(model_dir)}, {})
    assert settings == ServerSettings(model=model_dir)
    assert settings.model_name == "my-model"
    assert settings.url == "http://127.0.0.1:8000"
    assert ServerSettings().model == BUNDLED_MODEL


def test_precedence_cli_over_env_over_file_over_defaults(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {model_dir}\nport: 7001\nmax-num-seqs: 8\nblock_size: 32\nhost: 0.0.0.0\n")
    environ = {"INFLIGHT_PORT": "7002", "INFLIGHT_MAX_NUM_SEQS": "4", "INFLIGHT_API_KEY": "secret"}
    settings = merge_settings({"port": "7003"}, environ, config)
    assert settings.port == 7003  # CLI beats env and file
    assert settings.max_num_seqs == 4  # env beats file
    assert settings.block_size == 32 and settings.host == "0.0.0.0"  # file beats defaults
    assert settings.api_key == "secret"
    assert merge_settings({}, {"INFLIGHT_LOG_LEVEL": "WARNING"}, config).log_level == "warning"
    assert settings.max_num_batched_tokens == 2048  # default


def test_toml_config_from_environment(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(f'model = "{model_dir}"\nserved_model_name = "from-toml"\nkv-cache-memory-fraction = 0.5\n')
    settings = merge_settings({}, {"INFLIGHT_CONFIG": str(config)})
    assert settings.served_model_name == "from-toml" and settings.model_name == "from-toml"
    assert settings.kv_cache_memory_fraction == 0.5


def test_kv_sizing_from_a_higher_source_replaces_the_other(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("num_kv_blocks: 100\n")
    settings = merge_settings({"model": str(model_dir), "kv_cache_memory_fraction": "0.3"}, {}, config)
    assert settings.num_kv_blocks is None and settings.kv_cache_memory_fraction == 0.3
    settings = merge_settings({"model": str(model_dir)}, {"INFLIGHT_NUM_KV_BLOCKS": "64"}, config)
    assert settings.num_kv_blocks == 64
    with pytest.raises(ValueError, match="both given"):
        merge_settings({"model": str(model_dir)}, {"INFLIGHT_NUM_KV_BLOCKS": "64",
                                                   "INFLIGHT_KV_CACHE_MEMORY_FRACTION": "0.5"})


@pytest.mark.parametrize(
    ("cli", "environ", "message"),
    [
        ({"port": "http"}, {}, r"--port must be an integer, got 'http' \(from command line\)"),
        ({}, {"INFLIGHT_MAX_NUM_SEQS": "lots"}, r"--max-num-seqs must be an integer.*INFLIGHT_MAX_NUM_SEQS"),
        ({"port": "70000"}, {}, "--port must be between 1 and 65535"),
        ({"device": "tpu"}, {}, "--device must be one of auto, cpu, cuda"),
        ({"dtype": "int8"}, {}, "--dtype must be one of"),
        ({"kv_cache_memory_fraction": "1.5"}, {}, r"--kv-cache-memory-fraction must be in \(0, 1\]"),
        ({"num_kv_blocks": "0"}, {}, "--num-kv-blocks must be at least 1"),
        ({"max_num_seqs": "64", "max_num_batched_tokens": "32"}, {}, "--max-num-batched-tokens .* at least"),
        ({"api_key": ""}, {}, "--api-key must not be empty"),
    ],
)
def test_bad_values_name_the_option(model_dir: Path, cli: dict, environ: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        merge_settings({"model": str(model_dir), **cli}, environ)


def test_missing_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        merge_settings({"model": str(tmp_path / "nope")}, {})


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.yaml", "port: [1, 2\n", "not valid YAML"),
        ("a.toml", "port = \n", "not valid TOML"),
        ("a.yaml", "- 1\n- 2\n", "must hold a mapping"),
        ("a.yaml", "prot: 1\n", "unknown option 'prot'"),
        ("a.ini", "port=1\n", r"must end in \.yaml, \.yml, \.toml or \.json"),
    ],
)
def test_bad_config_files(model_dir: Path, tmp_path: Path, name: str, text: str, message: str) -> None:
    config = tmp_path / name
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        merge_settings({"model": str(model_dir)}, {}, config)
    with pytest.raises(ValueError, match="does not exist"):
        merge_settings({"model": str(model_dir)}, {}, tmp_path / "missing.yaml")


def test_benchmark_options_from_every_source(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("load-format: dummy\nmax-model-len: 256\n")
    settings = merge_settings({"enforce_eager": True}, {"INFLIGHT_MAX_MODEL_LEN": "128"}, config)
    assert (settings.load_format, settings.max_model_len, settings.enforce_eager) == ("dummy", 128, True)
    assert merge_settings({"model": str(model_dir)}, {"INFLIGHT_ENFORCE_EAGER": "false"}).enforce_eager is False
    with pytest.raises(ValueError, match="--enforce-eager must be true or false"):
        merge_settings({"model": str(model_dir)}, {"INFLIGHT_ENFORCE_EAGER": "maybe"})
    with pytest.raises(ValueError, match="--load-format must be one of auto, dummy"):
        merge_settings({"model": str(model_dir), "load_format": "random"}, {})


def test_engine_process_and_async_scheduling_from_every_source(model_dir: Path, tmp_path: Path) -> None:
    from server.cli import parse_settings

    defaults = parse_settings([str(model_dir)], environ={})
    assert defaults.engine_process is True and defaults.async_scheduling is True
    off = parse_settings([str(model_dir), "--no-engine-process", "--no-async-scheduling"], environ={})
    assert off.engine_process is False and off.async_scheduling is False
    config = tmp_path / "serve.toml"
    config.write_text("engine-process = false\nasync_scheduling = false\n")
    environ = {"INFLIGHT_CONFIG": str(config), "INFLIGHT_ASYNC_SCHEDULING": "on"}
    settings = parse_settings([str(model_dir), "--engine-process"], environ=environ)
    assert settings.engine_process is True and settings.async_scheduling is True  # CLI > environment > file
    assert parse_settings([str(model_dir)], environ={"INFLIGHT_CONFIG": str(config)}).engine_process is False
    with pytest.raises(ValueError, match="--engine-process must be true or false"):
        merge_settings({"model": str(model_dir)}, {"INFLIGHT_ENGINE_PROCESS": "sometimes"})


def test_operating_options_from_every_source(model_dir: Path, tmp_path: Path) -> None:
    from server.cli import parse_settings

    settings = parse_settings([str(model_dir), "--api-key", "a", "--api-key", "b,c", "--protect-metrics",
                               "--max-queue-time", "2.5", "--max-request-body-bytes", "65536", "--drain-timeout", "0"],
                              environ={})
    assert settings.api_keys == ("a", "b", "c") and settings.protect_metrics
    assert (settings.max_queue_time, settings.max_request_body_bytes, settings.drain_timeout) == (2.5, 65536, 0.0)
    from_env = merge_settings({"model": model_dir}, {"INFLIGHT_API_KEY": "x,y", "INFLIGHT_PROTECT_METRICS": "true"})
    assert from_env.api_keys == ("x", "y") and from_env.protect_metrics
    config = tmp_path / "serve.yaml"
    config.write_text("api-key: [k1, k2]\ndrain-timeout: 5\n")
    from_file = merge_settings({"model": model_dir}, {}, config)
    assert from_file.api_keys == ("k1", "k2") and from_file.drain_timeout == 5.0
    defaults = merge_settings({"model": model_dir}, {})
    assert defaults.api_keys == () and defaults.max_queue_time is None and defaults.max_queued_requests == 1024


def test_hardening_options_from_every_source(model_dir: Path, tmp_path: Path) -> None:
    from server.cli import parse_settings

    settings = parse_settings([str(model_dir), "--engine-stall-timeout", "7.5", "--header-read-timeout", "3",
                               "--max-connections", "64", "--enable-docs", "--special-tokens-in-input"], environ={})
    assert (settings.engine_stall_timeout, settings.header_read_timeout, settings.max_connections) == (7.5, 3.0, 64)
    assert settings.enable_docs and settings.special_tokens_in_input
    from_env = merge_settings({"model": model_dir}, {"INFLIGHT_ENGINE_STALL_TIMEOUT": "9"})
    assert from_env.engine_stall_timeout == 9.0
    config = tmp_path / "serve.toml"
    config.write_text("engine-stall-timeout = 11\nmax-connections = 5\n")
    from_file = merge_settings({"model": model_dir}, {}, config)
    assert (from_file.engine_stall_timeout, from_file.max_connections) == (11.0, 5)
    defaults = merge_settings({"model": model_dir}, {})
    assert (defaults.engine_stall_timeout, defaults.enable_docs, defaults.special_tokens_in_input) == (
        120.0,
        False,
        False,
    )


@pytest.mark.parametrize(("cli", "message"), [
    ({"api_key": "a,,b"}, "--api-key must not be empty"),
    ({"max_queue_time": "0"}, "--max-queue-time must be > 0"),
    ({"drain_timeout": "-1"}, "--drain-timeout must be >= 0"),
    ({"max_request_body_bytes": "10"}, "--max-request-body-bytes must be at least 1024"),
    ({"max_queued_requests": "0"}, "--max-queued-requests must be at least 1"),
    ({"engine_stall_timeout": "0"}, "--engine-stall-timeout must be a finite number of seconds > 0"),
    ({"engine_stall_timeout": "nan"}, "--engine-stall-timeout must be a finite number of seconds > 0"),
    ({"header_read_timeout": "inf"}, "--header-read-timeout must be a finite number of seconds > 0"),
    ({"max_connections": "0"}, "--max-connections must be at least 1"),
])
def test_bad_operating_options_name_the_option(model_dir: Path, cli: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        merge_settings({"model": model_dir, **cli}, {})


def test_torchrun_variables_place_the_node_and_explicit_options_win(model_dir: Path) -> None:
    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}
    settings = merge_settings({"model": str(model_dir), "tensor_parallel_size": "4"}, torchrun)
    assert (settings.nnodes, settings.node_rank, settings.master_addr, settings.master_port, settings.headless) == (
        2, 1, "10.0.0.5", 29501, True)
    node0 = merge_settings({"model": str(model_dir), "tensor_parallel_size": "4"}, {**torchrun, "RANK": "0"})
    assert (node0.node_rank, node0.headless) == (0, False)
    explicit = merge_settings({"model": str(model_dir), "tensor_parallel_size": "4", "master_port": "4000"}, torchrun)
    assert explicit.master_port == 4000
    with pytest.raises(ValueError, match="one inflight-serve per node"):
        merge_settings({"model": str(model_dir)}, {**torchrun, "LOCAL_RANK": "1"})
    with pytest.raises(ValueError, match="--nnodes 3 must be at least 1 and divide --tensor-parallel-size 4"):
        merge_settings({"model": str(model_dir), "tensor_parallel_size": "4", "nnodes": "3", "master_port": "4000"},
                       {})
