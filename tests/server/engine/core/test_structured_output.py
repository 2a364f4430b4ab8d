"""Structured output: every response_format output of the bundled model parses and validates (jsonschema).

Schemas with nested objects, arrays and enums, greedy and sampled, next to unconstrained requests
whose tokens must not change; a schema xgrammar cannot compile is a ValueError naming the problem.
Uses models/inflight-tiny when it is there, else the random tiny Llama (with the same kind of tokenizer).
"""

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from engine_builder.loader import load_engine
from server.engine.core.engine_core import EngineCore
from server.engine.engine_config import EngineConfig
from server.engine.sampling_params import SamplingParams, StructuredOutputParams

BUNDLED = Path(__file__).resolve().parents[4] / "models" / "inflight-tiny"

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "address": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "zip": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 999}},
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "minItems": 1, "maxItems": 4}},
        "required": ["tags"],
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                       "size": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["color", "ok", "size"],
    },
}


@pytest.fixture(scope="module")
def engine(request):
    if (BUNDLED / "config.json").exists() and any(BUNDLED.glob("*.safetensors")):
        directory = BUNDLED
    else:
        directory = request.getfixturevalue("tiny_llama_dir")
    return load_engine(directory, device="cpu", dtype="float32", max_seq_len=256, progress=False)


def run(core: EngineCore) -> dict:
    outputs: dict = {}
    while core.has_unfinished_requests:
        for output in core.step():
            outputs.setdefault(output.request_id, []).append(output)
    assert core.kv_cache_manager.num_free_blocks == core.num_kv_blocks
    return outputs


def test_outputs_validate_against_their_schemas_and_free_requests_are_untouched(engine):
    prompt = engine.tokenizer.encode("Return a JSON description of the object:")
    plain = SamplingParams(max_tokens=20, temperature=0.0)
    alone = EngineCore(engine, EngineConfig(block_size=16, num_kv_blocks=64, enforce_eager=True))
    alone.add_request("plain", prompt, plain)
    expected_plain = [t for o in run(alone)["plain"] for t in o.new_token_ids]

    core = EngineCore(engine, EngineConfig(block_size=16, num_kv_blocks=256, enforce_eager=True))
    core.add_request("plain", prompt, plain)
    requests = {}
    for name, schema in SCHEMAS.items():
        variants: list[tuple[str, dict[str, Any]]] = [("greedy", {"temperature": 0.0}),
                                                      ("sampled", {"temperature": 1.0, "seed": 3})]
        for variant, params in variants:
            request_id = f"{name}-{variant}"
            requests[request_id] = schema
            core.add_request(request_id, prompt, SamplingParams(
                max_tokens=120, structured_output=StructuredOutputParams("json_schema", schema), **params))
    core.add_request("object", prompt, SamplingParams(max_tokens=120, temperature=0.0,
                                                      structured_output=StructuredOutputParams("json_object")))
    requests["object"] = {"type": "object"}
    outputs = run(core)

    assert [t for o in outputs["plain"] for t in o.new_token_ids] == expected_plain
    for request_id, schema in requests.items():
        text = "".join(o.new_text for o in outputs[request_id])
        assert outputs[request_id][-1].finish_reason == "stop", (request_id, text)
        jsonschema.validate(json.loads(text), schema)


def test_a_schema_that_cannot_compile_is_a_value_error_naming_it(engine):
    core = EngineCore(engine, EngineConfig(block_size=16, num_kv_blocks=16, enforce_eager=True))
    bad = StructuredOutputParams("json_schema", {"type": "object", "properties": {"a": {"type": "flurb"}}})
    with pytest.raises(ValueError, match="flurb"):
        core.add_request("bad", [5, 6], SamplingParams(structured_output=bad))
    assert not core.has_unfinished_requests


def test_max_tokens_before_the_json_is_complete_is_length(engine):
    core = EngineCore(engine, EngineConfig(block_size=16, num_kv_blocks=16, enforce_eager=True))
    core.add_request("short", [5, 6, 7], SamplingParams(
        max_tokens=3, temperature=0.0, structured_output=StructuredOutputParams("json_schema", SCHEMAS["nested"])))
    outputs = run(core)["short"]
    assert outputs[-1].finish_reason == "length" and len(outputs) == 3


class _BrokenMatcher:
    """A grammar matcher whose next-token mask cannot be computed (a grammar library failure)."""

    def fill_next_token_bitmask(self, mask, row):
        raise RuntimeError("the grammar matcher failed")


def test_a_grammar_that_fails_ends_its_request_alone(engine):
    prompt = engine.tokenizer.encode("Return a JSON description of the object:")
    json_object = StructuredOutputParams("json_object")
    core = EngineCore(engine, EngineConfig(block_size=16, num_kv_blocks=256, enforce_eager=True))
    for request_id in ("broken", "fine"):
        core.add_request(request_id, prompt, SamplingParams(max_tokens=120, temperature=0.0,
                                                            structured_output=json_object))
    core.add_request("plain", prompt, SamplingParams(max_tokens=20, temperature=0.0))
    core.step()  # both grammars work for the first token
    core.structured_output._matchers["broken"] = _BrokenMatcher()
    outputs = run(core)  # also checks that every block came back
    assert outputs["broken"][-1].finished and outputs["broken"][-1].finish_reason == "error"
    text = "".join(o.new_text for o in outputs["fine"])
    assert outputs["fine"][-1].finish_reason == "stop" and isinstance(
        json.loads("{" + text if not text.startswith("{") else text), dict
    )
    assert outputs["plain"][-1].finish_reason == "length"
