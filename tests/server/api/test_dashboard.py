"""The live dashboard (/dashboard): its numbers are /metrics' numbers, it loads nothing from elsewhere, it needs the key
when /metrics does; and, in a real browser (Debian's chromium driven by Playwright) while a load runs, the numbers on
the page move and match a scrape of /metrics.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api.dashboard import histogram_quantile

KEY = "dashboard-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHORT: dict[str, Any] = dict(model="tiny-llama", prompt="Hello there", max_tokens=6, temperature=0)
EXTERNAL_URL = re.compile(r"https?:|//[\w.-]+\.[a-z]{2,}|url\(|@import", re.IGNORECASE)
CHROMIUM = next((path for path in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if os.path.exists(path)), None)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("INFLIGHT_TEST_ARTIFACTS") or Path(__file__).resolve().parents[2] / "artifacts")


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client's parser: (sample name, sorted labels) -> value."""
    response = httpx.get(url + "/metrics", headers=headers)
    response.raise_for_status()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def labelled(samples: dict, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: number for (sample, labels), number in samples.items() if sample == name}


def bucket_bounds(samples: dict, histogram: str, q: float) -> tuple[float, float]:
    """The bounds of the bucket of a scraped histogram that holds its q-quantile (where any estimate must lie)."""
    buckets = sorted((float(dict(labels)["le"]), number) for (sample, labels), number in samples.items()
                     if sample == histogram + "_bucket")
    rank = q * buckets[-1][1]
    lower = 0.0
    for bound, count in buckets:
        if count >= rank:
            return lower, bound if not math.isinf(bound) else lower
        lower = bound
    raise AssertionError(buckets)


COUNTERS = {  # stat shown (a field of /dashboard/stats) -> the sample it must equal
    "tokens.generated": "inflight_generation_tokens_total",
    "tokens.prompt": "inflight_prompt_tokens_total",
    "requests.preemptions": "inflight_preemptions_total",
    "latency.time_to_first_token.count": "inflight_time_to_first_token_seconds_count",
    "latency.inter_token_latency.count": "inflight_inter_token_latency_seconds_count",
    "errors.cancelled": "inflight_requests_cancelled_total",
    "errors.step_failures": "inflight_engine_step_failures_total",
}
GAUGES = {
    "requests.running": "inflight_requests_running",
    "requests.waiting": "inflight_requests_waiting",
    "kv_cache.usage_ratio": "inflight_kv_cache_usage_ratio",
    "kv_cache.blocks_used": "inflight_kv_cache_blocks_used",
    "kv_cache.blocks_free": "inflight_kv_cache_blocks_free",
}
PERCENTILES = {"latency.time_to_first_token": "inflight_time_to_first_token_seconds",
               "latency.inter_token_latency": "inflight_inter_token_latency_seconds",
               "latency.e2e_request_latency": "inflight_e2e_request_latency_seconds"}


def field(stats: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        stats = stats[key]
    return stats


def assert_matches_idle_scrape(shown: dict[str, Any], samples: dict) -> None:
    """Every number shown equals the scrape of an idle server; every percentile lies in the scrape's bucket."""
    for stat, name in {**COUNTERS, **GAUGES}.items():
        assert field(shown, stat) == value(samples, name), stat
    assert field(shown, "requests.num_finished") == sum(labelled(samples, "inflight_request_success_total",
                                                                 "finished_reason").values())
    assert field(shown, "errors.failed") == value(samples, "inflight_request_success_total", finished_reason="error")
    rejected = labelled(samples, "inflight_requests_rejected_total", "reason")
    assert field(shown, "errors.rejected") == (rejected if isinstance(field(shown, "errors.rejected"), dict)
                                               else sum(rejected.values()))
    for stat, histogram in PERCENTILES.items():
        estimates = [field(shown, f"{stat}.{key}") for key in ("p50", "p90", "p99")]
        assert estimates == sorted(estimates), stat
        for q, estimate in zip((0.5, 0.9, 0.99), estimates):
            lower, upper = bucket_bounds(samples, histogram, q)
            assert lower <= estimate <= upper, (stat, q, estimate, lower, upper)


# --- the stats and the page over HTTP (the real server, its engine in a thread) ---

def test_histogram_quantile_interpolates_inside_the_bucket_as_promql() -> None:
    inf = math.inf
    buckets = [(0.1, 0.0), (0.25, 10.0), (0.5, 20.0), (1.0, 20.0), (inf, 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.25)  # rank 10: the top of the second bucket
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.375)  # rank 15: halfway through (0.25, 0.5]
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.115)  # rank 1: a tenth into (0.1, 0.25]
    assert histogram_quantile(0.5, [(1.0, 2.0), (inf, 4.0)]) == pytest.approx(1.0)
    assert histogram_quantile(0.9, [(1.0, 2.0), (inf, 4.0)]) == 1.0  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(1.0, 0.0), (inf, 0.0)]) is None


def test_stats_are_the_numbers_of_metrics(tiny_server_fn) -> None:
    running = tiny_server_fn()
    try:
        client = openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0)
        completions = [client.completions.create(**SHORT) for _ in range(3)]
        for _ in range(23):
            assert httpx.post(running.api_url + "/completions", json={**SHORT, "temperature": 9}).status_code == 400
        assert httpx.post(running.api_url + "/completions", json={**SHORT, "model": "other"}).status_code == 404
        stats = httpx.get(running.url + "/dashboard/stats").json()
        samples = scrape(running.url)
    finally:
        running.stop()
    assert_matches_idle_scrape(stats, samples)
    assert stats["tokens"]["generated"] == sum(c.usage.completion_tokens for c in completions if c.usage) > 0
    assert stats["requests"]["num_finished"] == 3 and stats["model"] == "tiny-llama" and stats["engine_healthy"]
    errors = stats["errors"]
    assert errors["num_recent"] == 24 and len(errors["recent"]) == 20  # the ring keeps the last 20, newest first
    assert [error["status"] for error in errors["recent"][:2]] == [404, 400]
    newest = errors["recent"][0]
    assert (newest["method"], newest["path"], newest["code"]) == ("POST", "/v1/completions", "model_not_found")
    assert "'other'" in newest["message"] and newest["request_id"].startswith("req_")
    assert "temperature" in errors["recent"][1]["message"]


def test_page_and_its_files_come_from_this_server_only(tiny_server_fn) -> None:
    running = tiny_server_fn(api_key=KEY, protect_metrics=True)
    try:
        page = httpx.get(running.url + "/dashboard")  # open: it holds no numbers
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        references = re.findall(r'(?:src|href)="([^"]*)"', page.text)
        assert set(references) == {"data:,", "/dashboard/dashboard.css", "/dashboard/dashboard.js"}
        bodies = {"page": page.text}
        for path in ("/dashboard/dashboard.css", "/dashboard/dashboard.js"):
            response = httpx.get(running.url + path)
            assert response.status_code == 200, path
            bodies[path] = response.text
        assert "fetch(STATS_URL" in bodies["/dashboard/dashboard.js"]
    finally:
        running.stop()
    for name, body in bodies.items():
        assert not EXTERNAL_URL.search(body), (name, EXTERNAL_URL.search(body))


def test_stats_need_the_key_when_metrics_do(tiny_server_fn) -> None:
    protected = tiny_server_fn(api_key=KEY, protect_metrics=True)
    try:
        refused = httpx.get(protected.url + "/dashboard/stats")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(protected.url + "/dashboard/stats", headers={"Authorization": "Bearer wrong"}
                         ).status_code == 401
        stats = httpx.get(protected.url + "/dashboard/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert [error["status"] for error in stats["errors"]["recent"]] == [401, 401]
        assert "API key" in stats["errors"]["recent"][0]["message"]  # behind the key: messages are shown
    finally:
        protected.stop()


def test_open_stats_hide_the_error_messages_of_keyed_requests(tiny_server_fn) -> None:
    running = tiny_server_fn(api_key=KEY)  # /metrics and the stats open, /v1 needs the key
    try:
        response = httpx.post(running.api_url + "/completions", json={**SHORT, "temperature": 9},
                              headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 400
        stats = httpx.get(running.url + "/dashboard/stats").json()
    finally:
        running.stop()
    (error,) = stats["errors"]["recent"]
    assert error["status"] == 400 and error["type"] == "invalid_request_error" and error["message"] is None


# --- a real browser while a load runs ---

class Load:
    """`num_clients` threads sending completions (max_tokens 32) until stopped; what they got back is counted."""

    def __init__(self, api_url: str, model: str, num_clients: int) -> None:
        self.client = openai.OpenAI(base_url=api_url, api_key=KEY, max_retries=0, timeout=120)
        self.model = model
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.num_completed = 0
        self.num_generated_tokens = 0
        self.failures: list[BaseException] = []
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(num_clients)]
        for thread in self.threads:
            thread.start()

    def run(self, i: int) -> None:
        while not self.stopping.is_set():
            try:
                result = self.client.completions.create(model=self.model, prompt=f"Client {i} says", max_tokens=32,
                                                        temperature=1.0, seed=i, extra_body={"ignore_eos": True})
            except Exception as error:
                self.failures.append(error)
                return
            with self.lock:
                self.num_completed += 1
                self.num_generated_tokens += result.usage.completion_tokens if result.usage else 0

    def stop(self) -> None:
        """Let every client finish its request, then return."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=120)


SNAPSHOT = """() => {
  const shown = {};
  for (const element of document.querySelectorAll("[data-stat]")) shown[element.dataset.stat] = element.dataset.value;
  const rate = document.getElementById("tokens-per-second").dataset;
  const updated = document.getElementById("updated").dataset;
  return {shown, rate: {value: rate.value, fromTime: rate.fromTime, fromTokens: rate.fromTokens},
          time: Number(updated.time), refreshes: Number(updated.refreshes || 0),
          errors: [...document.querySelectorAll("#errors-body tr")].map(row => [...row.cells].map(c => c.textContent))};
}"""


def nested(shown: dict[str, str]) -> dict[str, Any]:
    """The page's data-stat values as the nested stats they came from (numbers parsed; "" is None)."""
    stats: dict[str, Any] = {}
    for path, text in shown.items():
        *parents, last = path.split(".")
        node = stats
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = None if text == "" else text if path == "model" else float(text)
    return stats


def snapshot_when(page: Any, ready: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The page's numbers (SNAPSHOT) once `ready(snapshot)` holds. Polled from here: the page's Content-Security-Policy
    forbids the eval that Playwright's wait_for_function needs."""
    deadline = time.monotonic() + timeout
    while not ready(snapshot := page.evaluate(SNAPSHOT)):
        assert time.monotonic() < deadline, f"the page did not get there: {snapshot}"
        time.sleep(0.05)
    return snapshot


def snapshot_after(page: Any, moment: float) -> dict[str, Any]:
    """The page's numbers once it shows stats the server read after `moment` (this machine's clock)."""
    return snapshot_when(page, lambda snapshot: snapshot["time"] > moment)


def save_artifact(page: Any, tmp_path: Path) -> Path:
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "dashboard.png")
    return shot


def wait_until_idle(url: str, num_finished: int) -> None:
    """Until /metrics counts `num_finished` finished requests and none running or waiting."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(url, AUTH)
        finished = sum(labelled(samples, "inflight_request_success_total", "finished_reason").values())
        if finished == num_finished and value(samples, "inflight_requests_running") == 0 \
                and value(samples, "inflight_requests_waiting") == 0:
            return
        assert time.monotonic() < deadline, f"the server did not become idle: {finished} of {num_finished} finished"
        time.sleep(0.1)


def enter_the_key(page: Any, url: str) -> None:
    """Open the dashboard, which asks for the key (its stats answered 401); a wrong key is refused, then ours."""
    page.goto(url + "/dashboard")
    page.wait_for_selector("#key-form", state="visible", timeout=10_000)
    assert page.inner_text("#health") == "API key needed"
    page.fill("#key-input", "wrong-key")
    page.click("#key-form button")
    page.wait_for_selector("#key-reason:has-text('refused')", state="visible", timeout=10_000)
    page.fill("#key-input", KEY)
    page.click("#key-form button")


def check_under_load(page: Any, url: str, tmp_path: Path) -> None:
    """Counters shown lie between a scrape before and one after; between two refreshes they rise; tokens/s is the
    counter's rise over the time the page says; the screenshot is kept."""
    for _ in range(2):
        before = scrape(url, AUTH)
        first = snapshot_after(page, time.time())
        after = scrape(url, AUTH)
        shown = nested(first["shown"])
        for stat, name in COUNTERS.items():
            assert value(before, name) <= field(shown, stat) <= value(after, name), stat
    second = snapshot_when(page, lambda snapshot: snapshot["refreshes"] > first["refreshes"])
    assert float(second["shown"]["tokens.generated"]) > float(first["shown"]["tokens.generated"]) > 0
    assert float(second["shown"]["requests.num_finished"]) >= float(first["shown"]["requests.num_finished"])
    rate = second["rate"]
    assert float(rate["value"]) > 0 and float(rate["value"]) == pytest.approx(
        (float(second["shown"]["tokens.generated"]) - float(rate["fromTokens"])) / (second["time"] - float(
            rate["fromTime"])))
    assert float(second["shown"]["requests.running"]) > 0 and float(second["shown"]["kv_cache.blocks_used"]) > 0
    save_artifact(page, tmp_path)


@pytest.mark.slow
def test_dashboard_in_a_real_browser_follows_metrics_under_load(tmp_path: Path, port: int, serve_cli_fn) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium): /usr/lib/chromium/chromium is missing")
    process = serve_cli_fn(["--device", "cpu", "--num-kv-blocks", "256", "--max-num-seqs", "8",
                            "--max-num-batched-tokens", "256", "--api-key", KEY, "--protect-metrics"],
                           tmp_path / "server.log", port)  # the bundled model, its engine core in a process
    url = f"http://127.0.0.1:{port}"
    requested: list[tuple[str, str | None]] = []  # every request the page made: (url, its Authorization header)
    load: Load | None = None
    try:
        assert httpx.get(url + "/dashboard/stats").status_code == 401
        assert httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "inflight-tiny", "prompt": "x",
                                                                       "temperature": 9}).status_code == 400
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.on("request", lambda request: requested.append((request.url, request.headers.get("authorization"))))
            load = Load(url + "/v1", "inflight-tiny", num_clients=12)
            enter_the_key(page, url)
            check_under_load(page, url, tmp_path)

            load.stop()  # once the server is idle, the page shows /metrics' numbers exactly
            assert not load.failures, load.failures[:3]
            wait_until_idle(url, load.num_completed)
            last = snapshot_after(page, time.time())
            assert_matches_idle_scrape(nested(last["shown"]), scrape(url, AUTH))
            assert float(last["shown"]["requests.num_finished"]) == load.num_completed
            assert float(last["shown"]["tokens.generated"]) == load.num_generated_tokens
            # the errors: the test's 400 and 401, the page's before it had a key and with the wrong one
            assert sorted(row[1] for row in last["errors"]) == ["400", "401", "401", "401"], last["errors"]
            assert any("temperature" in row[4] for row in last["errors"])
            assert float(last["shown"]["errors.num_recent"]) == 4
            browser.close()
    finally:
        if load is not None:
            load.stop()
        process.terminate()
        process.wait(timeout=30)
    assert requested and all(address.startswith(url + "/") for address, _ in requested), requested
    stats_requests = [key for address, key in requested if address.endswith("/dashboard/stats")]
    assert stats_requests[:2] == [None, "Bearer wrong-key"] and set(stats_requests[2:]) == {f"Bearer {KEY}"}
