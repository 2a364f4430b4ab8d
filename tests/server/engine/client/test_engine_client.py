"""The engine client with its core in a thread, end to end on a random tiny Llama: outputs equal transformers' greedy
generate under chunked prefill and preemption; aborted, abandoned and failed requests give their blocks back."""

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
import torch

from engine_builder.loader import load_engine
from server.engine.client.core_client import EngineCoreClient
from server.engine.engine_config import EngineConfig
from server.engine.errors import EngineDeadError, RequestFailedError
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams

MAX_SEQ_LEN = 128
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return load_engine(tiny_llama_dir, device="cpu", max_seq_len=MAX_SEQ_LEN, progress=False)


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


async def collect(stream: AsyncIterator[RequestOutput]) -> tuple[list[int], str, RequestOutput]:
    tokens, text, last = [], "", None
    async for output in stream:
        tokens += output.new_token_ids
        text += output.new_text
        last = output
    assert last is not None, "the stream ended without an output"
    return tokens, text, last


async def wait_idle(client, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while (
        client.core.has_unfinished_requests
        or client.core.kv_cache_manager.num_free_blocks != client.num_kv_blocks
    ):
        assert asyncio.get_running_loop().time() < deadline, "the engine did not become idle"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_concurrent_greedy_requests_match_transformers_with_chunked_prefill_and_preemption(
    device, engine, hf_model, hf_greedy_fn, tiny_llama_dir
):
    if device != "cpu":
        engine = load_engine(tiny_llama_dir, device=device, dtype="float32", max_seq_len=MAX_SEQ_LEN, progress=False)
        hf_model = hf_model.to(device)
    rng = random.Random(0)
    prompts = [[rng.randrange(7, engine.config.vocab_size) for _ in range(rng.randint(3, 40))] for _ in range(8)]
    max_tokens = [rng.randint(8, 24) for _ in prompts]
    eos = engine.eos_token_ids
    expected = [hf_greedy_fn(hf_model, p, n, eos) for p, n in zip(prompts, max_tokens)]
    # 24 blocks of 4 tokens = 96 tokens for 8 requests needing up to ~60 each: they must preempt each other.
    config = EngineConfig(block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=8)
    assert max(len(p) for p in prompts) > config.max_num_batched_tokens, "the test must exercise chunked prefill"

    async def main():
        client = EngineCoreClient.in_thread(engine, config)
        await client.start()
        results = await asyncio.gather(*[
            collect(client.generate(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0)))
            for i, (p, n) in enumerate(zip(prompts, max_tokens))
        ])
        await wait_idle(client)
        client.core.kv_cache_manager.check_invariants()
        preemptions = client.core.scheduler.num_preemptions_total
        await client.shutdown()
        return results, preemptions

    results, preemptions = asyncio.run(main())
    hf_model.to("cpu")
    assert preemptions > 0, "the test must exercise preemption"
    for (tokens, text, last), want, n in zip(results, expected, max_tokens):
        assert tokens == want
        assert last.finished and last.finish_reason == ("stop" if len(want) < n or want[-1] in eos else "length")
        assert last.num_generated_tokens == len(tokens)
        # Random weights emit stray UTF-8 bytes; where they are replaced depends on the prompt's last bytes.
        assert engine.tokenizer is not None
        assert text.replace("\ufffd", "") == engine.tokenizer.decode(tokens, skip_special_tokens=True).replace(
            "\ufffd", ""
        )


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)

    async def main(num_companions):
        client = EngineCoreClient.in_thread(engine, EngineConfig(block_size=4, num_kv_blocks=64))
        await client.start()
        companions = [
            collect(client.generate(f"c{i}", [20 + i] * (3 + i), SamplingParams(max_tokens=12, temperature=1.0)))
            for i in range(num_companions)
        ]
        results = await asyncio.gather(collect(client.generate("seeded", [11, 12, 13], params)), *companions)
        await client.shutdown()
        return results[0][0]

    alone = asyncio.run(main(0))
    assert alone == asyncio.run(main(3)) == asyncio.run(main(1))


def test_abandoned_and_aborted_requests_free_their_blocks(engine):
    async def main():
        client = EngineCoreClient.in_thread(engine, EngineConfig(block_size=4, num_kv_blocks=64))
        await client.start()
        params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        # 1. the consumer closes the stream (client disconnected)
        stream = client.generate("closed", [5, 6, 7], params)
        await stream.__anext__()
        await stream.__anext__()
        assert client.core.kv_cache_manager.num_free_blocks < client.num_kv_blocks
        await stream.aclose()
        await wait_idle(client)
        # 2. the consuming task is cancelled
        started = asyncio.Event()

        async def consume():
            async for _ in client.generate("cancelled", [5, 6, 7], params):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_idle(client)
        # 3. abort_all() (a drain that timed out) ends the stream with finish_reason "abort"
        stream = client.generate("aborted", [5, 6, 7], params)
        first = await stream.__anext__()
        assert client.abort_all() == 1
        rest = [output async for output in stream]
        await wait_idle(client)
        client.core.kv_cache_manager.check_invariants()
        await client.shutdown()
        return first, rest

    first, rest = asyncio.run(main())
    assert not first.finished
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert len(rest) < 99


def test_a_failed_step_fails_its_requests_and_the_engine_keeps_serving(engine):
    async def main():
        client = EngineCoreClient.in_thread(engine, EngineConfig(block_size=4, num_kv_blocks=64))
        await client.start()
        executor = client.core.executor
        real_launch = executor.launch
        calls = {"n": 0}

        def flaky_launch(plan):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated device error")
            real_launch(plan)

        executor.launch = flaky_launch
        with pytest.raises(RequestFailedError, match="simulated device error"):
            await collect(client.generate("victim", [5, 6, 7], SamplingParams(max_tokens=10, ignore_eos=True)))
        await wait_idle(client)
        assert client.is_running
        tokens, _, last = await collect(
            client.generate("after", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
        )
        await client.shutdown()
        return tokens, last

    tokens, last = asyncio.run(main())
    assert len(tokens) == 4 and last.finish_reason == "length"


def test_bad_requests_are_refused_at_call_time_and_shutdown_aborts_the_rest(engine):
    async def main():
        client = EngineCoreClient.in_thread(engine, EngineConfig(block_size=4, num_kv_blocks=64))
        with pytest.raises(EngineDeadError):
            client.generate("early", [5], SamplingParams())
        await client.start()
        assert client.is_running and client.max_model_len == MAX_SEQ_LEN
        with pytest.raises(ValueError, match="max_tokens"):
            client.generate("long", [5] * 100, SamplingParams(max_tokens=29))
        small = EngineCoreClient.in_thread(engine, EngineConfig(block_size=4, num_kv_blocks=2))
        await small.start()
        with pytest.raises(ValueError, match="KV blocks"):
            small.generate("too-big", [5] * 5, SamplingParams(max_tokens=5))
        await small.shutdown()
        with pytest.raises(ValueError, match="temperature"):
            client.generate("t", [5], SamplingParams(temperature=-1))
        with pytest.raises(ValueError, match="vocabulary"):
            client.generate("v", [engine.config.vocab_size], SamplingParams())
        stream = client.generate("pending", [5, 6], SamplingParams(max_tokens=100, ignore_eos=True))
        await stream.__anext__()
        await client.shutdown()
        rest = [output async for output in stream]
        assert not client.is_running
        return rest, client

    rest, client = asyncio.run(main())
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert client.core.kv_cache_manager.num_free_blocks == client.num_kv_blocks


def test_too_many_queued_requests_are_refused_as_overload(engine):
    from server.engine.errors import EngineOverloadedError

    async def main():
        config = EngineConfig(block_size=4, num_kv_blocks=64, max_num_seqs=1, max_queued_requests=2)
        client = EngineCoreClient.in_thread(engine, config)
        await client.start()
        params = SamplingParams(max_tokens=30, ignore_eos=True)
        streams = [client.generate(f"r{i}", [5, 6], params) for i in range(3)]
        tasks = [asyncio.create_task(collect(s)) for s in streams]
        while client.core.scheduler.num_running + client.core.scheduler.num_waiting < 3:
            await asyncio.sleep(0.001)
        with pytest.raises(EngineOverloadedError, match="max_queued_requests"):
            client.generate("one-too-many", [5, 6], params)
        results = await asyncio.gather(*tasks)
        later = await collect(client.generate("later", [5, 6], SamplingParams(max_tokens=2)))
        await client.shutdown()
        return results, later

    results, later = asyncio.run(main())
    assert [len(tokens) for tokens, _, _ in results] == [30, 30, 30]
    assert later[2].finished


def test_logprobs_and_stop_strings_through_the_engine(engine, hf_model):
    prompt = [31, 41, 59, 26, 53, 58]

    async def run(params):
        client = EngineCoreClient.in_thread(engine, EngineConfig(block_size=4, num_kv_blocks=64))
        await client.start()
        outputs = [o async for o in client.generate("r", prompt, params)]
        await client.shutdown()
        return outputs

    outputs = asyncio.run(run(SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=2)))
    tokens = [t for o in outputs for t in o.new_token_ids]
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([prompt + tokens])).logits[0].float(), -1)
    logprobs = [logprob for output in outputs for logprob in output.new_logprobs or []]  # one per token
    assert len(logprobs) == len(tokens)
    for i, logprob in enumerate(logprobs):
        want = reference[len(prompt) - 1 + i]
        assert logprob.token_id == tokens[i]
        assert logprob.logprob == pytest.approx(want[tokens[i]].item(), abs=1e-4)
        assert list(logprob.top) == want.topk(2).indices.tolist()
    # A stop string taken from the middle of the greedy text ends the same generation right before it.
    text = "".join(o.new_text for o in outputs)
    visible = [i for i in range(4, len(text) - 3) if text[i : i + 3].isascii() and text[i : i + 3].isprintable()]
    assert visible, f"need some printable text to pick a stop string from: {text!r}"
    stop = text[visible[len(visible) // 2] : visible[len(visible) // 2] + 3]
    stopped = asyncio.run(run(SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop])))
    assert stopped[-1].finish_reason == "stop"
    assert "".join(o.new_text for o in stopped) == text[: text.index(stop)]


def test_the_event_loop_stays_responsive_during_a_slow_step(engine):
    import time

    async def main():
        client = EngineCoreClient.in_thread(engine, EngineConfig(block_size=4, num_kv_blocks=64))
        await client.start()
        real_launch = client.core.executor.launch

        def slow_launch(plan):
            time.sleep(0.3)  # a long forward pass
            real_launch(plan)

        client.core.executor.launch = slow_launch
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await collect(client.generate("slow", [5, 6], SamplingParams(max_tokens=2, ignore_eos=True)))
        task.cancel()
        await client.shutdown()
        return ticks

    assert asyncio.run(main()) >= 10  # 0.6 s of steps; a blocking step would allow ~2 ticks


def test_a_consumer_that_falls_behind_gets_merged_outputs_with_nothing_lost(engine):
    """A slow reader takes the tokens queued meanwhile as one output: fewer outputs, same tokens, text, logprobs."""
    prompt = [11, 12, 13, 14]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)

    async def main():
        client = EngineCoreClient.in_thread(engine, EngineConfig(num_kv_blocks=64))
        await client.start()
        fast = await collect(client.generate("fast", prompt, params))
        outputs = []
        async for output in client.generate("slow", prompt, params):
            outputs.append(output)
            await asyncio.sleep(0.05)  # the engine keeps stepping meanwhile
        await client.shutdown()
        return fast, outputs

    (tokens, text, _), outputs = asyncio.run(main())
    assert len(outputs) < 24
    assert [t for o in outputs for t in o.new_token_ids] == tokens
    assert "".join(o.new_text for o in outputs) == text
    assert sum(len(o.new_logprobs) for o in outputs) == 24
    assert outputs[-1].finished and outputs[-1].num_generated_tokens == 24


def test_queue_limit_counts_a_running_beam_search_request_once(engine):
    import time

    from server.engine.errors import EngineOverloadedError
    from server.engine.sampling_params import BeamSearchParams

    async def drain(stream):
        async for _ in stream:
            pass

    async def main():
        client = EngineCoreClient.in_thread(
            engine, EngineConfig(num_kv_blocks=200, max_num_seqs=4, max_queued_requests=1)
        )
        await client.start()
        launch = client.core.executor.launch
        client.core.executor.launch = lambda plan: (time.sleep(0.02), launch(plan))[1]
        beam_params = SamplingParams(max_tokens=30, beam_search=BeamSearchParams(num_beams=4))
        beams = asyncio.ensure_future(drain(client.generate("beam", [5, 6, 7], beam_params)))
        while client.core.scheduler.num_running < 4:  # its 4 beams fill max_num_seqs
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(drain(client.generate("q0", [5, 6], SamplingParams(max_tokens=5))))
        await asyncio.sleep(0.01)  # q0 is now waiting: the one queue place is taken
        with pytest.raises(EngineOverloadedError):
            client.generate("q1", [5, 6], SamplingParams(max_tokens=5))
        await asyncio.gather(beams, queued)
        await client.shutdown()

    asyncio.run(main())


def test_a_step_that_hangs_makes_the_engine_dead_after_the_stall_timeout(engine):
    import threading
    import time

    from server.api.metrics import Metrics

    async def main():
        metrics = Metrics()
        client = EngineCoreClient.in_thread(
            engine, EngineConfig(num_kv_blocks=64), metrics, engine_stall_timeout=0.5
        )
        await client.start()
        release = threading.Event()
        step = client.core.step
        steps = {"count": 0}

        def hanging_step():  # the third step never returns (a wedged device, a deadlock)
            steps["count"] += 1
            if steps["count"] == 3:
                release.wait(30)
            return step()

        client.core.step = hanging_step
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="finished no step for"):
            await collect(client.generate("r", [5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True)))
        waited = time.monotonic() - started
        assert not client.is_running
        assert metrics.engine_healthy._value.get() == 0
        assert [metrics.requests_running._value.get(), metrics.kv_cache_blocks_used._value.get()] == [0, 0]
        await asyncio.wait_for(client.shutdown(), 5)  # does not wait for the hanging step
        release.set()
        return waited

    assert 0.5 <= asyncio.run(main()) < 5


def test_a_reader_that_falls_behind_is_not_a_stall(engine):
    """The watchdog watches the engine, not the consumers: outputs waiting to be read are no pending work."""

    async def main():
        client = EngineCoreClient.in_thread(engine, EngineConfig(num_kv_blocks=64), engine_stall_timeout=0.3)
        await client.start()
        stream = client.generate("r", [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
        first = await stream.__anext__()
        await asyncio.sleep(1.0)  # the engine has finished the request; nobody has read it
        rest = [output async for output in stream]
        assert client.is_running
        await client.shutdown()
        return [first, *rest]

    outputs = asyncio.run(main())
    assert outputs[-1].finish_reason == "length" and outputs[-1].num_generated_tokens == 8
