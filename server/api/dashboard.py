"""The live dashboard: a page at /dashboard that shows the server's metrics, refreshed every second.

    browser ─▶ GET /dashboard                       the page (server/api/static/dashboard.html), open: it holds no data
            ─▶ GET /dashboard/dashboard.{js,css}    its script and style, open; nothing is loaded from elsewhere
            └▶ GET /dashboard/stats  (every second) JSON read from the Prometheus registry that /metrics exports;
                                                     it needs the key when /metrics does (--api-key --protect-metrics)

The stats are the registry's current values, so they are /metrics' numbers: counters and gauges as they are,
histograms as their count, mean and p50/p90/p99 over the whole run, interpolated within the buckets as Prometheus'
histogram_quantile does. Tokens/s is made by the page: the rise of the generated-token counter over the last 5 s of the
server's clock ("time" in the stats). The recent errors are the API layer's own (recent_errors.py).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample

from server.api.protocol import ErrorResponse
from server.api.recent_errors import RecentErrors

PAGE_PATH = "/dashboard"
STATS_PATH = "/dashboard/stats"
FILES = {  # path served -> (file of server/api/static, media type)
    PAGE_PATH: ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
# The browser itself refuses anything from another origin, inline scripts included (data: is the empty favicon).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
LATENCIES = {  # key in the stats -> histogram
    "time_to_first_token": "inflight_time_to_first_token_seconds",
    "inter_token_latency": "inflight_inter_token_latency_seconds",
    "e2e_request_latency": "inflight_e2e_request_latency_seconds",
    "request_queue_time": "inflight_request_queue_time_seconds",
}


def static_dir() -> Path:
    """The dashboard's files, shipped in the package (pyproject.toml [tool.setuptools.package-data])."""
    return Path(str(resources.files("server.api") / "static"))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a Prometheus histogram, as PromQL's histogram_quantile computes it.

    The bucket holding the rank q * count is found, and the value interpolated linearly inside it (from 0 for the
    first bucket); a rank in the +Inf bucket gives the highest finite bound.

    Args:
        q: the quantile, 0 < q < 1.
        buckets: (upper bound, cumulative count) in increasing bounds, the last one +Inf.

    Returns:
        The estimate in the histogram's unit, or None when it has no observations.
    """
    assert 0 < q < 1 and buckets and math.isinf(buckets[-1][0]), (q, buckets)
    total = buckets[-1][1]
    if total == 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    raise AssertionError(f"cumulative counts decrease: {buckets}")


class RegistryView:
    """The samples of a registry at one moment, by sample name."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.samples: dict[str, list[Sample]] = defaultdict(list)
        for family in registry.collect():
            for sample in family.samples:
                self.samples[sample.name].append(sample)

    def value(self, name: str) -> float:
        """The value of an unlabelled sample (0 if it is missing)."""
        return sum(sample.value for sample in self.samples.get(name, ()))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """A labelled counter's values by that label's value."""
        return {sample.labels[label]: sample.value for sample in self.samples.get(name, ())}

    def histogram(self, name: str) -> dict[str, float | None]:
        """count, mean and the QUANTILES of a histogram (None while it has no observations)."""
        buckets = sorted((float(sample.labels["le"]), sample.value) for sample in self.samples[name + "_bucket"])
        count = self.value(name + "_count")
        summary: dict[str, float | None] = {"count": count,
                                            "mean": self.value(name + "_sum") / count if count else None}
        summary.update({key: histogram_quantile(q, buckets) for key, q in QUANTILES.items()})
        return summary


def dashboard_stats(registry: CollectorRegistry, errors: RecentErrors, *, model: str,
                    with_error_messages: bool) -> dict[str, Any]:
    """What /dashboard/stats answers: the registry's values now and the recent errors.

    Args:
        registry: the registry /metrics exports.
        errors: the API's recent error responses.
        model: the served model's name.
        with_error_messages: include the errors' messages (only where the stats need the key: they may quote a value
            of someone's request).

    Returns:
        {"time": server clock (s since the epoch), "model", "engine_healthy",
         "requests": {running, waiting, finished: {reason: n}, num_finished, preemptions},
         "tokens": {generated, prompt}, "kv_cache": {usage_ratio, blocks_used, blocks_free},
         "latency": {time_to_first_token | inter_token_latency | e2e_request_latency | request_queue_time:
                     {count, mean, p50, p90, p99} in seconds},
         "errors": {failed, rejected: {reason: n}, cancelled, step_failures, num_recent, recent: [newest first]}}
    """
    view = RegistryView(registry)
    finished = view.by_label("inflight_request_success_total", "finished_reason")
    return {
        "time": time.time(),
        "model": model,
        "engine_healthy": view.value("inflight_engine_healthy") == 1,
        "requests": {
            "running": view.value("inflight_requests_running"),
            "waiting": view.value("inflight_requests_waiting"),
            "finished": finished,
            "num_finished": sum(finished.values()),
            "preemptions": view.value("inflight_preemptions_total"),
        },
        "tokens": {
            "generated": view.value("inflight_generation_tokens_total"),
            "prompt": view.value("inflight_prompt_tokens_total"),
        },
        "kv_cache": {
            "usage_ratio": view.value("inflight_kv_cache_usage_ratio"),
            "blocks_used": view.value("inflight_kv_cache_blocks_used"),
            "blocks_free": view.value("inflight_kv_cache_blocks_free"),
        },
        "latency": {key: view.histogram(name) for key, name in LATENCIES.items()},
        "errors": {
            "failed": finished.get("error", 0.0),
            "rejected": view.by_label("inflight_requests_rejected_total", "reason"),
            "cancelled": view.value("inflight_requests_cancelled_total"),
            "step_failures": view.value("inflight_engine_step_failures_total"),
            "num_recent": errors.num_recorded,
            "recent": errors.newest_first(with_messages=with_error_messages),
        },
    }


def install_dashboard(app: FastAPI, *, model: str, with_error_messages: bool) -> tuple[str, ...]:
    """Serve /dashboard, its files and /dashboard/stats from app.state.metrics and app.state.recent_errors.

    Args:
        app: the application.
        model: the served model's name, shown on the page.
        with_error_messages: whether the stats show error messages (True where they need the key or nothing does).

    Returns:
        The page's paths (open without a key: a browser opening a page cannot send one; the page holds no data).
    """
    directory = static_dir()
    for path, (name, media_type) in FILES.items():
        app.add_api_route(path, _file_route(directory / name, media_type), methods=["GET"], include_in_schema=False)

    @app.get(STATS_PATH, responses={401: {"model": ErrorResponse}}, response_class=JSONResponse)
    async def stats(raw_request: Request) -> JSONResponse:
        """The live dashboard's numbers (/metrics' values; latency percentiles over the whole run); with --api-key
        and --protect-metrics a key is needed."""
        state = raw_request.app.state
        body = dashboard_stats(state.metrics.registry, state.recent_errors, model=model,
                               with_error_messages=with_error_messages)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return tuple(FILES)


def _file_route(file: Path, media_type: str) -> Callable[[], Awaitable[FileResponse]]:
    async def serve_file() -> FileResponse:
        return FileResponse(file, media_type=media_type, headers=PAGE_HEADERS)

    return serve_file
