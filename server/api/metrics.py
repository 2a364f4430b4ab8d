"""The Prometheus exporter of the engine's stats, in its own registry (served at /metrics).

Names follow Prometheus conventions: prefix `inflight_`, units in the name, `_total` for counters,
`_seconds` for latency histograms. `Metrics` is a ClientStatsSink (server/engine/stats.py): the engine core's
records arrive here directly (engine in a thread) or replayed from the engine core process's messages.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.engine.stats import FinishedRequestStats, StepStats

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class Metrics:
    """The engine's Prometheus metrics; `registry` holds them all."""

    def __init__(self, registry: CollectorRegistry | None = None):
        """Create the metrics.

        Args:
            registry: where to register them; None makes a fresh CollectorRegistry.
        """
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_running = Gauge("inflight_requests_running", "Requests in the running batch.", registry=r)
        self.requests_waiting = Gauge("inflight_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.kv_cache_blocks_used = Gauge("inflight_kv_cache_blocks_used", "KV cache blocks in use.", registry=r)
        self.kv_cache_blocks_free = Gauge("inflight_kv_cache_blocks_free", "KV cache blocks free.", registry=r)
        self.kv_cache_usage_ratio = Gauge(
            "inflight_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0-1).", registry=r
        )
        self.kv_cache_blocks_cached = Gauge(
            "inflight_kv_cache_blocks_cached",
            "KV cache blocks held only by the prefix cache (reusable on a hit; also counted as free).", registry=r)
        self.prefix_cache_queries = Counter(
            "inflight_prefix_cache_queries_total", "Tokens of admitted requests looked up in the prefix cache.",
            registry=r)
        self.prefix_cache_hits = Counter(
            "inflight_prefix_cache_hits_total", "Tokens found in the prefix cache (their KV was not computed).",
            registry=r)
        self.kv_offload_bytes = Gauge(
            "inflight_kv_offload_bytes_used", "Host memory used by the KV offload tier.", registry=r)
        self.kv_offload_blocks = Counter(
            "inflight_kv_offload_blocks_total", "KV blocks moved by the offload tier: offload (device to host), "
            "restore (host to device).", ["direction"], registry=r)
        self.preemptions = Counter(
            "inflight_preemptions_total", "Requests preempted for lack of KV blocks.", registry=r
        )
        self.prompt_tokens = Counter(
            "inflight_prompt_tokens_total", "Prompt tokens of requests that started generating.", registry=r
        )
        self.generation_tokens = Counter("inflight_generation_tokens_total", "Generated tokens.", registry=r)
        self.request_success = Counter(
            "inflight_request_success_total",
            "Finished requests by finish reason (stop, length, abort, error).",
            ["finished_reason"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "inflight_time_to_first_token_seconds", "Arrival to first token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "inflight_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            "inflight_e2e_request_latency_seconds", "Arrival to finish.", buckets=_REQUEST_BUCKETS, registry=r
        )
        self.request_queue_time = Histogram(
            "inflight_request_queue_time_seconds", "Arrival to first scheduled.", buckets=_REQUEST_BUCKETS, registry=r
        )
        self.request_prompt_tokens = Histogram(
            "inflight_request_prompt_tokens", "Prompt length of finished requests.", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.request_generation_tokens = Histogram(
            "inflight_request_generation_tokens",
            "Generated tokens of finished requests.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.step_latency = Histogram(
            "inflight_step_latency_seconds",
            "Wall time of one engine step (iteration).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_step = Histogram(
            "inflight_tokens_per_step", "New tokens processed in one step.", buckets=_TOKEN_BUCKETS, registry=r
        )
        # operating: what the server refused, what clients abandoned, what failed
        self.requests_rejected = Counter(
            "inflight_requests_rejected_total",
            "API requests refused before generating: queue_full (429), queue_timeout, draining, "
            "engine_unavailable (503).",
            ["reason"],
            registry=r,
        )
        self.requests_cancelled = Counter(
            "inflight_requests_cancelled_total",
            "Engine requests aborted because nobody read them any more: the client disconnected (or, with n > 1, "
            "a sibling choice failed).", registry=r,
        )
        self.step_failures = Counter(
            "inflight_engine_step_failures_total", "Engine steps that raised (their requests failed).", registry=r
        )
        self.engine_healthy = Gauge(
            "inflight_engine_healthy", "1 while the engine loop runs and accepts work, 0 otherwise.", registry=r
        )

    def record_state(self, num_running: int, num_waiting: int, num_used_blocks: int, num_free_blocks: int) -> None:
        """Set the gauges (also used outside steps, e.g. after an abort)."""
        self.requests_running.set(num_running)
        self.requests_waiting.set(num_waiting)
        self.kv_cache_blocks_used.set(num_used_blocks)
        self.kv_cache_blocks_free.set(num_free_blocks)
        total = num_used_blocks + num_free_blocks
        self.kv_cache_usage_ratio.set(num_used_blocks / total if total else 0.0)

    def record_cancelled(self) -> None:
        """Count one request aborted because its client left."""
        self.requests_cancelled.inc()

    def record_engine_healthy(self, healthy: bool) -> None:
        self.engine_healthy.set(1 if healthy else 0)

    def record_engine_dead(self) -> None:
        """The engine is gone: unhealthy, and nothing runs, waits or holds KV blocks any more."""
        self.engine_healthy.set(0)
        self.record_state(0, 0, 0, 0)

    def record_rejected(self, reason: str) -> None:
        """Count one API request refused before it generated anything.

        Args:
            reason: "queue_full", "queue_timeout", "draining" or "engine_unavailable".
        """
        self.requests_rejected.labels(reason=reason).inc()

    def record_step_failure(self) -> None:
        """Count one engine step that raised."""
        self.step_failures.inc()

    def record_step(self, stats: StepStats) -> None:
        """Record one step."""
        self.record_state(stats.num_running, stats.num_waiting, stats.num_used_blocks, stats.num_free_blocks)
        self.step_latency.observe(stats.step_seconds)
        self.tokens_per_step.observe(stats.num_batched_tokens)
        self.preemptions.inc(stats.num_preemptions)
        self.kv_cache_blocks_cached.set(stats.num_cached_blocks)
        self.prefix_cache_queries.inc(stats.num_prefix_queries)
        self.prefix_cache_hits.inc(stats.num_prefix_hits)
        self.kv_offload_bytes.set(stats.num_offload_bytes)
        self.kv_offload_blocks.labels(direction="offload").inc(stats.num_blocks_offloaded)
        self.kv_offload_blocks.labels(direction="restore").inc(stats.num_blocks_restored)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        for seconds in stats.time_to_first_token_seconds:
            self.time_to_first_token.observe(seconds)
        for seconds in stats.inter_token_latency_seconds:
            self.inter_token_latency.observe(seconds)

    def record_finished(self, stats: FinishedRequestStats) -> None:
        """Record one finished request."""
        self.request_success.labels(finished_reason=stats.finish_reason).inc()
        self.e2e_request_latency.observe(stats.e2e_latency_seconds)
        if stats.queue_time_seconds is not None:
            self.request_queue_time.observe(stats.queue_time_seconds)
        self.request_prompt_tokens.observe(stats.num_prompt_tokens)
        self.request_generation_tokens.observe(stats.num_generation_tokens)
