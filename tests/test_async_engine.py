"""The server's engine thread survives a request whose set-up fails in an unforeseen way."""

from __future__ import annotations

import asyncio

import pytest

from qwen_engine import SamplingParams
from qwen_engine.server.async_engine import AsyncEngine, EngineDeadError


def test_a_request_that_breaks_in_set_up_fails_alone(demo_llm, monkeypatch):
    engine = demo_llm.engine
    real_add = engine.add_request
    calls = []

    def add_request(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("boom")  # not an InputError: a bug, as an out-of-range seed once was
        return real_add(*args, **kwargs)

    monkeypatch.setattr(engine, "add_request", add_request)
    params = demo_llm._resolve(SamplingParams(max_tokens=3, temperature=0))
    ids = demo_llm.tokenizer.encode("def add(a, b):")

    async def drain(stream) -> list[int]:
        out: list[int] = []
        async for update in stream:
            out += update.token_ids
        return out

    async def scenario() -> list[int]:
        runner = AsyncEngine(engine)
        runner.start()
        try:
            with pytest.raises(EngineDeadError, match="RuntimeError: boom"):
                await asyncio.wait_for(drain(runner.submit(ids, params)), timeout=60)  # a hang fails here
            assert runner.alive
            out = await asyncio.wait_for(drain(runner.submit(ids, params)), timeout=60)
        finally:
            runner.shutdown()
        assert not runner.alive
        return out

    tokens = asyncio.run(scenario())
    expected = demo_llm.generate("def add(a, b):", SamplingParams(max_tokens=3, temperature=0))[0]
    assert tokens == expected.token_ids and len(calls) == 3
