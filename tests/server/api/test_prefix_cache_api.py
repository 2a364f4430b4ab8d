"""Prefix caching through the HTTP server: a second request with a shared prefix is served from the cache (the
Prometheus counters say how many tokens), gives the same greedy output, `cache_salt` isolates, and
--no-prefix-caching turns it off; --kv-offload-gib says on the CPU that it has no effect, and needs the cache."""

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.cli import parse_settings

SHARED = list(range(100, 180))  # 80 tokens: 20 blocks of 4


def metrics(server: Any) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


def complete(server: Any, prompt: list[int], **fields: Any) -> dict:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True, **fields}
    response = httpx.post(server.api_url + "/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def server(tiny_server_fn) -> Any:
    running = tiny_server_fn(block_size=4, num_kv_blocks=256)
    yield running
    running.stop()


def test_a_shared_prefix_is_served_from_the_cache(server) -> None:
    before = metrics(server)
    first = complete(server, SHARED + [7, 8, 9])
    after_first = metrics(server)
    second = complete(server, SHARED + [10, 11, 12, 13])
    after_second = metrics(server)
    hits = after_second["inflight_prefix_cache_hits_total"] - after_first["inflight_prefix_cache_hits_total"]
    assert hits == len(SHARED)  # the 20 shared blocks, not the request's own tokens
    queried = after_second["inflight_prefix_cache_queries_total"] - after_first["inflight_prefix_cache_queries_total"]
    assert queried == len(SHARED) + 4
    assert after_first["inflight_prefix_cache_hits_total"] == before["inflight_prefix_cache_hits_total"]
    again = complete(server, SHARED + [7, 8, 9])  # all but its last token cached: the same greedy tokens
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert second["choices"][0]["text"]
    assert metrics(server)["inflight_kv_cache_blocks_cached"] > 0  # idle: the blocks stay, held only by the cache


def test_cache_salt_isolates_requests(server) -> None:
    prompt = list(range(300, 340)) + [5]
    complete(server, prompt, cache_salt="tenant-a")
    start = metrics(server)["inflight_prefix_cache_hits_total"]
    complete(server, prompt, cache_salt="tenant-b")
    complete(server, prompt)
    assert metrics(server)["inflight_prefix_cache_hits_total"] == start  # another salt, or none: nothing shared
    complete(server, prompt, cache_salt="tenant-a")
    assert metrics(server)["inflight_prefix_cache_hits_total"] == start + 40
    response = httpx.post(server.api_url + "/completions", json={"model": "tiny-llama", "prompt": "x",
                                                                 "cache_salt": ""}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt"


def test_no_prefix_caching_computes_every_prompt(tiny_server_fn) -> None:
    running = tiny_server_fn(block_size=4, prefix_caching=False)
    try:
        complete(running, SHARED + [1])
        complete(running, SHARED + [2])
        values = metrics(running)
        assert values["inflight_prefix_cache_hits_total"] == 0 and values["inflight_kv_cache_blocks_cached"] == 0
    finally:
        running.stop()


def test_kv_offload_settings(caplog: pytest.LogCaptureFixture) -> None:
    from server.launch import kv_offload_bytes

    assert parse_settings(["--no-prefix-caching"], {}).prefix_caching is False
    assert parse_settings([], {"INFLIGHT_PREFIX_CACHING": "false"}).prefix_caching is False
    with pytest.raises(ValueError, match="needs prefix caching"):
        parse_settings(["--kv-offload-gib", "2", "--no-prefix-caching"], {})
    with pytest.raises(ValueError, match="--kv-offload-gib"):
        parse_settings(["--kv-offload-gib", "-1"], {})
    settings = parse_settings(["--kv-offload-gib", "1.5", "--device", "cpu"], {})
    with caplog.at_level("WARNING", logger="server"):
        assert kv_offload_bytes(settings) == 0
    assert "no effect on the CPU" in caplog.text
