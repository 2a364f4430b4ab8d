"""Property-based tests of the real server against its own /openapi.json (schemathesis): whatever a client
sends that the schema describes — valid or not — the answer is never a 5xx and always matches the schema.

The server runs the tiny random Llama with a 48-token context, so every generation is short; each
operation gets at most MAX_EXAMPLES generated requests of each kind (valid and invalid).
"""

from __future__ import annotations

from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (schemathesis brings hypothesis)
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

MAX_EXAMPLES = 25
# Schema-valid requests may still be 400s: rules across fields (min_tokens <= max_tokens, prompt + max_tokens
# within the context, token ids within the vocabulary) are checked by the server, not by the schema.
EXCLUDED_CHECKS = [positive_data_acceptance]
OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
              ("GET", "/health"), ("GET", "/metrics"), ("GET", "/dashboard/stats")]


@pytest.fixture(scope="module")
def running(tiny_server_fn) -> Any:
    server = tiny_server_fn(max_model_len=48, num_kv_blocks=64, max_num_seqs=16)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def openapi_schema(running: Any) -> Any:
    return schemathesis.openapi.from_url(running.url + "/openapi.json")


def test_schema_lists_every_operation(openapi_schema: Any) -> None:
    listed = {(operation.method.upper(), operation.path) for operation in
              (result.ok() for result in openapi_schema.get_all_operations())}
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), [
    *((method, path, "positive") for method, path in OPERATIONS),
    *((method, path, "negative") for method, path in OPERATIONS if method == "POST"),  # GETs take no input
])
def test_no_server_errors_and_responses_match_the_schema(openapi_schema: Any, running: Any, method: str, path: str,
                                                         mode: str) -> None:
    operation = openapi_schema[path][method]
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),  # pyright: ignore[reportArgumentType]  (hypothesis' enum metaclass) database=None,
              derandomize=True)  # the same examples on every CI run; raise MAX_EXAMPLES locally to search wider
    def check(case: Any) -> None:
        case.call_and_validate(timeout=30, excluded_checks=EXCLUDED_CHECKS)

    check()
    engine = running.server.config.app.state.serving.engine
    assert engine.is_running
