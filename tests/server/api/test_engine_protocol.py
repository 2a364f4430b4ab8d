"""The engine client and the tests' fake engine both are what the API layer is typed against (EngineClient)."""

from __future__ import annotations

import asyncio
import inspect

from fake_engine import FakeEngine

from server.engine.client.core_client import EngineCoreClient
from server.engine.protocol import EngineClient

MEMBERS = [name for name in dir(EngineClient) if not name.startswith("_")] + ["tokenizer"]


def test_the_engine_client_and_the_fake_are_engine_clients(tiny_llama_dir) -> None:
    from engine_builder.loader import load_engine
    from server.engine.engine_config import EngineConfig

    engine = load_engine(tiny_llama_dir, device="cpu", dtype="float32", progress=False)

    async def check(client) -> None:
        await client.start()  # the client's limits come from its engine core once it runs
        assert isinstance(client, EngineClient), type(client)
        await client.shutdown()

    for client in (
        EngineCoreClient.in_thread(engine, EngineConfig(num_kv_blocks=16)),
        FakeEngine(engine.tokenizer),
    ):
        asyncio.run(check(client))


def test_their_methods_take_what_the_protocol_says() -> None:
    for cls in (EngineCoreClient, FakeEngine):
        for name in MEMBERS:
            declared = inspect.getattr_static(EngineClient, name, None)
            if callable(declared):
                got = inspect.signature(getattr(cls, name)).parameters
                want = inspect.signature(declared).parameters
                assert list(got) == list(want), (cls.__name__, name, list(got), list(want))


def test_something_that_is_not_a_client_is_refused() -> None:  # the check above must be able to fail
    class Partial:
        tokenizer = None

        async def start(self) -> None: ...

    assert not isinstance(Partial(), EngineClient)
