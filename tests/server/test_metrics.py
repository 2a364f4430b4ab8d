"""Prometheus metrics move as requests run through the real engine, and follow naming conventions."""

import asyncio

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine_builder.loader import load_engine
from server.api.metrics import Metrics
from server.engine.client.core_client import EngineCoreClient
from server.engine.engine_config import EngineConfig
from server.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return load_engine(tiny_llama_dir, device="cpu", max_seq_len=128, progress=False)


def value(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def test_metrics_follow_requests_through_the_engine(engine):
    metrics = Metrics()
    prompts = [[5 + i] * (10 + 7 * i) for i in range(4)]
    observed_while_running = {}

    async def main():
        client = EngineCoreClient.in_thread(
            engine, EngineConfig(block_size=4, num_kv_blocks=20, max_num_batched_tokens=16), metrics
        )
        await client.start()

        async def run(i, prompt):
            count = 0
            async for output in client.generate(f"r{i}", prompt, SamplingParams(max_tokens=12, ignore_eos=True)):
                count += len(output.new_token_ids)
                if i == 0 and count == 2:
                    observed_while_running["running"] = value(metrics, "inflight_requests_running")
                    observed_while_running["used"] = value(metrics, "inflight_kv_cache_blocks_used")
                    observed_while_running["usage"] = value(metrics, "inflight_kv_cache_usage_ratio")
            return count

        stream = client.generate("gone", [9, 9, 9], SamplingParams(max_tokens=50))
        await stream.__anext__()
        await stream.aclose()
        counts = await asyncio.gather(*[run(i, p) for i, p in enumerate(prompts)])
        preemptions = client.core.scheduler.num_preemptions_total
        await client.shutdown()
        return counts, preemptions, client.num_kv_blocks

    counts, preemptions, num_blocks = asyncio.run(main())
    assert counts == [12] * 4
    assert observed_while_running["running"] >= 1 and observed_while_running["used"] > 0
    assert 0 < observed_while_running["usage"] <= 1
    gone_tokens = value(metrics, "inflight_generation_tokens_total") - 48  # the abandoned request's
    assert gone_tokens >= 1
    assert value(metrics, "inflight_prompt_tokens_total") == sum(len(p) for p in prompts) + 3
    assert value(metrics, "inflight_request_success_total", finished_reason="length") == 4
    assert value(metrics, "inflight_request_success_total", finished_reason="abort") == 1
    assert value(metrics, "inflight_preemptions_total") == preemptions > 0
    assert value(metrics, "inflight_time_to_first_token_seconds_count") == 5
    assert value(metrics, "inflight_inter_token_latency_seconds_count") == 4 * 11 + gone_tokens - 1
    assert value(metrics, "inflight_e2e_request_latency_seconds_count") == 5
    assert value(metrics, "inflight_request_queue_time_seconds_count") == 5
    assert value(metrics, "inflight_request_generation_tokens_sum") == value(
        metrics, "inflight_generation_tokens_total"
    )
    assert value(metrics, "inflight_request_prompt_tokens_sum") == value(metrics, "inflight_prompt_tokens_total")
    assert value(metrics, "inflight_step_latency_seconds_count") > 10
    assert value(metrics, "inflight_tokens_per_step_sum") >= sum(len(p) for p in prompts) + 48
    assert value(metrics, "inflight_requests_running") == value(metrics, "inflight_requests_waiting") == 0
    assert value(metrics, "inflight_kv_cache_blocks_used") == 0
    assert value(metrics, "inflight_kv_cache_blocks_free") == num_blocks


def test_exposition_uses_prometheus_conventions():
    metrics = Metrics()
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    assert families and all(name.startswith("inflight_") for name in families)
    for name, family in families.items():
        if family.type == "counter":
            assert any(s.name.endswith("_total") for s in family.samples) or not family.samples
        if family.type == "histogram" and ("latency" in name or "time" in name):
            assert name.endswith("_seconds")
    assert {
        "inflight_preemptions",
        "inflight_request_success",
        "inflight_time_to_first_token_seconds",
        "inflight_step_latency_seconds",
        "inflight_tokens_per_step",
        "inflight_kv_cache_usage_ratio",
    } <= set(families)
    assert Metrics().registry is not metrics.registry  # each server has its own registry
