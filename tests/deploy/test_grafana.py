"""deploy/grafana's dashboard asks only for series the server exports: every metric name in its PromQL is a sample
of server/api/metrics.py's registry (counters as *_total, histograms as *_bucket), and every label it matches or
groups by is a label of that metric."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from server.api.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "inflight-dashboard.json"
SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}


def exported() -> dict[str, set[str]]:
    """Sample name -> its label names, for every metric the server exports."""
    metrics = Metrics()
    found: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            # prometheus_client shows a metric's type, name and label names only on these attributes
            kind, name, labels = (getattr(value, key) for key in ("_type", "_name", "_labelnames"))
            for suffix in SUFFIXES[kind]:
                found[name + suffix] = set(labels) | ({"le"} if suffix == "_bucket" else set())
    return found


def expressions() -> list[str]:
    return [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]]


def problems(expr: str, series: dict[str, set[str]]) -> list[str]:
    """What in `expr` the server does not export: unknown series, or labels the series do not have."""
    names = re.findall(r"\binflight_[a-z0-9_]+", expr)
    found = [f"{name} is not exported" for name in names if name not in series]
    used = set(re.findall(r"(\w+)\s*(?:=|!=|=~)\s*\"", expr))
    used |= {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
    allowed = set().union(*(series.get(name, set()) for name in names))
    return found + [f"label {label} is not the metric's" for label in sorted(used - allowed)] + (
        [] if names else ["no inflight series"])


def test_every_expression_names_exported_series_and_labels() -> None:
    series = exported()
    assert len(expressions()) >= 15
    for expr in expressions():
        assert not problems(expr, series), (expr, problems(expr, series))


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    text = " ".join(expressions())
    for needed in ("inflight_generation_tokens_total", "inflight_time_to_first_token_seconds_bucket",
                   "inflight_inter_token_latency_seconds_bucket", "inflight_requests_waiting",
                   "inflight_kv_cache_usage_ratio", "inflight_preemptions_total", "inflight_request_success_total"):
        assert needed in text


def test_a_wrong_name_or_label_would_be_caught() -> None:
    series = exported()
    assert problems("rate(inflight_generation_tokens[1m])", series)  # a counter's series ends in _total
    assert problems('sum by (finish_reason) (rate(inflight_request_success_total[1m]))', series)  # finished_reason
    assert not problems('sum by (finished_reason) (rate(inflight_request_success_total[1m]))', series)
