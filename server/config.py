"""The server's settings: one frozen object merged from CLI options, INFLIGHT_* variables and a config file.

Precedence, highest first::

    command line  >  INFLIGHT_* environment  >  --config FILE (YAML or TOML)  >  defaults

Every source speaks in field names of `ServerSettings` (the file may also write them with dashes,
the environment upper-cases them behind `INFLIGHT_`: INFLIGHT_PORT, INFLIGHT_API_KEY, ...).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.engine.engine_config import LOGPROBS_MODES
from server.engine.parallel_config import ParallelConfig

ENV_PREFIX = "INFLIGHT_"
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "inflight-tiny"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOAD_FORMATS = ("auto", "dummy")
QUANTIZATIONS = ("fp8",)  # --quantization for a checkpoint (an engine directory runs as it was built); none: off
KV_CACHE_DTYPES = ("auto", "fp8")  # --kv-cache-dtype (engine_builder/runtime/kv_cache_dtype.py); auto: the model dtype
GENERATION_CONFIGS = ("auto", "none")  # auto: the checkpoint's generation_config.json sampling defaults; none: ours
TOOL_CALL_PARSERS = ("llama3_json", "hermes")  # --tool-call-parser names (vLLM's); "none" or unset: no parser
KV_SIZING = ("num_kv_blocks", "kv_cache_memory_fraction")  # two ways to size the KV cache; one wins


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Everything `inflight-serve` needs to know, validated."""

    model: Path = BUNDLED_MODEL  # engine directory or Hugging Face checkpoint directory
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # one of DEVICES
    dtype: str = "auto"  # one of DTYPES; "auto" keeps the engine's (or checkpoint's) dtype
    served_model_name: str | None = None  # None: the model directory's name
    load_format: str = "auto"  # one of LOAD_FORMATS; "dummy": random weights from config.json (benchmarks)
    quantization: str | None = None  # one of QUANTIZATIONS: "fp8" quantizes a checkpoint's linears while loading
    max_model_len: int | None = None  # prompt + output tokens per request; None: the engine's limit
    enforce_eager: bool = False  # no CUDA graphs
    async_scheduling: bool = True  # plan and launch step N+1 before step N's tokens reach the host
    engine_process: bool = True  # run the engine core in its own process (False: a thread of the API process)
    tensor_parallel_size: int = 1  # ranks (GPUs) the model is split over; 1: this process alone
    nnodes: int = 1  # hosts the ranks are spread over (node 0 serves HTTP, the others run --headless)
    node_rank: int = 0  # this host's index among them
    master_addr: str = "127.0.0.1"  # node 0's address, where the ranks meet
    master_port: int | None = None  # node 0's rendezvous port (and the next one); None: free ports (one node)
    headless: bool = False  # run only this node's tensor-parallel workers, no HTTP server (nodes 1..nnodes-1)
    max_num_seqs: int = 256  # requests running in one engine step
    max_num_batched_tokens: int = 2048  # tokens (prompt chunks + decodes) in one engine step
    kv_cache_memory_fraction: float = 0.9  # share of free device memory for the KV cache
    num_kv_blocks: int | None = None  # exact number of KV blocks; overrides the fraction
    block_size: int = 16  # tokens per KV block
    prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes across requests
    kv_offload_gib: float = 0.0  # host memory (GiB per rank) keeping evicted prefix-cache blocks; 0: off (GPUs only)
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES; "fp8": K/V in float8_e4m3fn, twice bfloat16's tokens
    max_queued_requests: int = 1024  # waiting requests before new ones get 429
    max_queue_time: float | None = None  # seconds a request may wait for its first step before a 503; None: no limit
    max_request_body_bytes: int = 4 << 20  # larger request bodies get 413
    api_key: str | None = None  # comma-separated keys; when set, /v1 routes need "Authorization: Bearer <key>"
    protect_metrics: bool = False  # /metrics needs a key too (when api_key is set)
    drain_timeout: float = 30.0  # seconds running requests may take to finish after SIGTERM/SIGINT
    engine_stall_timeout: float = 120.0  # seconds without a finished step while work is pending: the engine is dead
    header_read_timeout: float = 15.0  # seconds a client may take to send a request's headers; then it is closed
    max_connections: int = 2048  # open HTTP connections; more are closed at once
    enable_docs: bool = False  # serve /docs and /redoc (assets from this server, nothing from outside)
    special_tokens_in_input: bool = False  # tokenize user text with special tokens as control tokens (unsafe)
    cpu_threads: int | None = None  # torch intra-op threads of the engine on this node; None: derived (cpu_threads.py)
    generation_config: str = "auto"  # one of GENERATION_CONFIGS: whose sampling defaults requests that omit them get
    logprobs_mode: str = "raw_logprobs"  # one of LOGPROBS_MODES: what returned logprobs are taken of
    tool_call_parser: str | None = None  # one of TOOL_CALL_PARSERS: how chat replies are parsed into tool calls
    log_level: str = "info"  # one of LOG_LEVELS

    @property
    def model_name(self) -> str:
        """The name clients put in "model": --served-model-name, else the model directory's name."""
        return self.served_model_name or self.model.resolve().name

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted API keys (--api-key holds them comma-separated); empty when auth is off."""
        if self.api_key is None:
            return ()
        return tuple(key.strip() for key in self.api_key.split(","))


FIELDS: dict[str, dataclasses.Field] = {field.name: field for field in dataclasses.fields(ServerSettings)}


def option_name(name: str) -> str:
    """The command-line spelling of a settings field: max_num_seqs -> --max-num-seqs."""
    return "--" + name.replace("_", "-")


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a raw value from one source into the field's type.

    Args:
        name: settings field name.
        value: what the source gave (a string from the CLI or environment; any YAML/TOML scalar from a file).
        source: where it came from, for the error message.

    Returns:
        The typed value. Raises ValueError naming the option, the value and its source.
    """
    field_type = str(FIELDS[name].type)
    if value is None:
        return None
    if name == "api_key" and isinstance(value, list | tuple):  # a config file may list several keys
        value = ",".join(str(key) for key in value)
    try:
        if field_type == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if field_type.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if field_type.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if field_type == "Path":
            return Path(str(value)).expanduser()
        if name in ("tool_call_parser", "quantization") and str(value).lower() in ("", "none"):
            return None  # said explicitly: no parser (overrides a lower source's)
        return str(value).lower() if name in LOWERCASE else str(value)
    except ValueError:
        kind = {"bool": "true or false"}.get(field_type, "an integer" if field_type.startswith("int") else "a number")
        raise ValueError(f"{option_name(name)} must be {kind}, got {value!r} (from {source})") from None


# case-insensitive choices
LOWERCASE = ("log_level", "generation_config", "logprobs_mode", "tool_call_parser", "quantization", "kv_cache_dtype")


def _validate(settings: ServerSettings) -> None:
    """Raise ValueError naming the first option whose value cannot work."""
    choices = {"device": DEVICES, "dtype": DTYPES, "log_level": LOG_LEVELS, "load_format": LOAD_FORMATS,
               "generation_config": GENERATION_CONFIGS, "logprobs_mode": LOGPROBS_MODES,
               "kv_cache_dtype": KV_CACHE_DTYPES}
    if settings.tool_call_parser is not None:
        choices["tool_call_parser"] = TOOL_CALL_PARSERS
    if settings.quantization is not None:
        choices["quantization"] = QUANTIZATIONS
    for name, allowed in choices.items():
        value = getattr(settings, name)
        if value not in allowed:
            raise ValueError(f"{option_name(name)} must be one of {', '.join(allowed)}; got {value!r}")
    if not 0 < settings.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535; got {settings.port}")
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_queued_requests"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{option_name(name)} must be at least 1; got {getattr(settings, name)}")
    if settings.max_num_batched_tokens < settings.max_num_seqs:
        raise ValueError(
            f"--max-num-batched-tokens ({settings.max_num_batched_tokens}) must be at least "
            f"--max-num-seqs ({settings.max_num_seqs}): every running request needs a token per step"
        )
    if settings.max_model_len is not None and settings.max_model_len < 1:
        raise ValueError(f"--max-model-len must be at least 1; got {settings.max_model_len}")
    if settings.num_kv_blocks is not None and settings.num_kv_blocks < 1:
        raise ValueError(f"--num-kv-blocks must be at least 1; got {settings.num_kv_blocks}")
    if not 0.0 < settings.kv_cache_memory_fraction <= 1.0:
        raise ValueError(f"--kv-cache-memory-fraction must be in (0, 1]; got {settings.kv_cache_memory_fraction}")
    if settings.served_model_name is not None and not settings.served_model_name.strip():
        raise ValueError("--served-model-name must not be empty")
    if settings.api_key is not None and not all(settings.api_keys):
        raise ValueError("--api-key must not be empty, nor hold an empty key between commas "
                         "(leave it unset to turn authentication off)")
    if settings.max_queue_time is not None and not settings.max_queue_time > 0:
        raise ValueError(f"--max-queue-time must be > 0 seconds; got {settings.max_queue_time}")
    if settings.max_request_body_bytes < 1024:
        raise ValueError(f"--max-request-body-bytes must be at least 1024; got {settings.max_request_body_bytes}")
    if not settings.drain_timeout >= 0:
        raise ValueError(f"--drain-timeout must be >= 0 seconds; got {settings.drain_timeout}")
    for name in ("engine_stall_timeout", "header_read_timeout"):
        if not 0 < getattr(settings, name) < float("inf"):
            raise ValueError(
                f"{option_name(name)} must be a finite number of seconds > 0; got {getattr(settings, name)}"
            )
    if not 0 <= settings.kv_offload_gib < float("inf"):
        raise ValueError(f"--kv-offload-gib must be a finite number of GiB >= 0; got {settings.kv_offload_gib}")
    if settings.kv_offload_gib and not settings.prefix_caching:
        raise ValueError("--kv-offload-gib keeps evicted prefix-cache blocks, so it needs prefix caching; drop "
                         "--no-prefix-caching or --kv-offload-gib")
    if settings.max_connections < 1:
        raise ValueError(f"--max-connections must be at least 1; got {settings.max_connections}")
    if settings.cpu_threads is not None and settings.cpu_threads < 1:
        raise ValueError(f"--cpu-threads must be at least 1; got {settings.cpu_threads} (leave it unset to derive it "
                         "from the cores this process may use and $OMP_NUM_THREADS)")
    try:
        parallel_config(settings).validate()
    except ValueError as error:  # name the options as the command line spells them
        message = str(error)
        for name in ("tensor_parallel_size", "nnodes", "node_rank", "master_port"):
            message = message.replace(name, option_name(name))
        raise ValueError(message) from None
    if settings.headless and settings.node_rank == 0:
        raise ValueError("--headless runs the workers of a node other than 0; give its --node-rank")
    if settings.tensor_parallel_size > 1 and not settings.engine_process:
        raise ValueError("--tensor-parallel-size above 1 needs the engine core process (drop --no-engine-process)")
    if not settings.model.is_dir():
        hint = " (the bundled model is missing: train it with tools/train_bundled_model.py)" if (
            settings.model == BUNDLED_MODEL) else ""
        raise ValueError(f"model directory {str(settings.model)!r} does not exist{hint}")


def parallel_config(settings: ServerSettings) -> ParallelConfig:
    """The engine's ParallelConfig from the settings."""
    return ParallelConfig(tensor_parallel_size=settings.tensor_parallel_size, nnodes=settings.nnodes,
                          node_rank=settings.node_rank, master_addr=settings.master_addr,
                          master_port=settings.master_port)


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file of settings.

    Args:
        path: the file; its extension picks the format. A JSON file (.json) works too.

    Returns:
        field name -> raw value, with dashes in keys turned into underscores.
        Raises ValueError for a missing file, a bad extension, bad syntax or an unknown key.
    """
    if not path.is_file():
        raise ValueError(f"--config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ValueError(f"--config file {str(path)!r} must end in .yaml, .yml, .toml or .json")
    text = path.read_text()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # pyright: ignore[reportMissingImports]  (a backport, only on 3.10)
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as error:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        language = "YAML" if suffix == ".yml" else suffix[1:].upper()
        raise ValueError(f"--config file {str(path)!r} is not valid {language}: {first_line}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config file {str(path)!r} must hold a mapping of option names to values")
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    for key in values:
        if key not in FIELDS:
            raise ValueError(f"--config file {str(path)!r}: unknown option {key!r}")
    return values


def torchrun_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """INFLIGHT_* defaults from torchrun's variables, for `torchrun --nnodes N --nproc-per-node 1 -m server ...`.

    One inflight-serve per node (it starts that node's ranks itself): WORLD_SIZE is the number of nodes, RANK this
    node's index (nodes other than 0 run headless), MASTER_ADDR node 0. torchrun's own store holds MASTER_PORT, so
    Inflight meets at the next port (and uses the one after it). Explicit options and INFLIGHT_* variables win.
    """
    if not all(key in environ for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")):
        return {}
    if environ.get("LOCAL_RANK", "0") != "0":
        raise ValueError("under torchrun, run one inflight-serve per node (--nproc-per-node 1): it starts the node's "
                         "tensor-parallel ranks itself")
    try:
        port = int(environ["MASTER_PORT"]) + 1
    except ValueError:
        raise ValueError(f"$MASTER_PORT must be an integer, got {environ['MASTER_PORT']!r}") from None
    found = {"NNODES": environ["WORLD_SIZE"], "NODE_RANK": environ["RANK"], "MASTER_ADDR": environ["MASTER_ADDR"],
             "MASTER_PORT": str(port), "HEADLESS": "true" if environ["RANK"] != "0" else "false"}
    return {ENV_PREFIX + key: value for key, value in found.items()}


def read_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings given as INFLIGHT_<FIELD> variables (INFLIGHT_CONFIG is handled by the caller)."""
    values = {}
    for name in FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ and environ[key] != "":
            values[name] = environ[key]
    return values


def merge_settings(
    cli: Mapping[str, Any], environ: Mapping[str, str], config_file: Path | None = None
) -> ServerSettings:
    """Merge the sources into one validated ServerSettings.

    Args:
        cli: options given on the command line (only those given), field name -> string or value.
        environ: the process environment; INFLIGHT_* variables are read from it.
        config_file: a YAML/TOML file; None falls back to $INFLIGHT_CONFIG, then to no file.

    Returns:
        The settings. Raises ValueError naming the first bad option.
    """
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    sources: list[tuple[str, Mapping[str, Any]]] = []  # lowest precedence first
    if config_file is not None:
        sources.append((f"config file {config_file}", read_config_file(config_file)))
    sources.append(("environment", read_environment({**torchrun_environment(environ), **environ})))
    sources.append(("command line", cli))
    values: dict[str, Any] = {}
    for source, given in sources:
        if all(name in given and given[name] is not None for name in KV_SIZING):
            raise ValueError(
                f"--num-kv-blocks and --kv-cache-memory-fraction both given ({source}); give one"
            )
        for name, raw in given.items():
            if name in KV_SIZING and raw is not None:  # the later source's KV sizing replaces the earlier one
                for other in KV_SIZING:
                    values.pop(other, None)
            label = source if source != "environment" else f"${ENV_PREFIX}{name.upper()}"
            values[name] = _coerce(name, raw, label)
    settings = ServerSettings(**{name: value for name, value in values.items() if value is not None})
    _validate(settings)
    return settings
