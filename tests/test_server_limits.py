"""Server limits and engine-thread behaviour on a small random model, in-process (fast)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from tiny_models import build_tiny

from qwen_engine import LLM
from qwen_engine.server.app import ServerConfig, create_app


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    folder = tmp_path_factory.mktemp("server-tiny")
    build_tiny("qwen3", folder, tokenizer_dir=qwen3_tokenizer_dir)
    return LLM(folder, max_model_len=512)


def chat(client: TestClient, **extra):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    return client.post("/v1/chat/completions", json=body)


def test_queue_full_is_429_with_retry_after(tiny):
    with TestClient(create_app(tiny, ServerConfig("tiny", max_waiting=0))) as client:
        r = chat(client)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_image_to_text_model_is_400(tiny):
    with TestClient(create_app(tiny, ServerConfig("tiny"))) as client:
        parts = [{"type": "text", "text": "what is this?"},
                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
        r = chat(client, messages=[{"role": "user", "content": parts}])
        assert r.status_code == 400 and "text only" in r.json()["error"]["message"]
        # text parts alone are fine
        r = chat(client, messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
                 temperature=0, ignore_eos=True)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_text_parts_join_like_a_string(tiny):
    with TestClient(create_app(tiny, ServerConfig("tiny"))) as client:
        parts = chat(client, messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]}],
                     temperature=0, ignore_eos=True).json()
        plain = chat(client, messages=[{"role": "user", "content": "a\nb"}], temperature=0, ignore_eos=True).json()
    assert parts["choices"][0]["message"] == plain["choices"][0]["message"]


def test_engine_failure_is_500_and_server_survives(tiny, monkeypatch):
    with TestClient(create_app(tiny, ServerConfig("tiny"))) as client:
        engine = client.app.state.engine.engine
        real_step = engine.step
        calls = {"n": 0}

        def broken_step():
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            return real_step()

        monkeypatch.setattr(engine, "step", broken_step)
        r = chat(client)
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        assert chat(client).status_code == 200  # the next request is served
        assert engine.blocks.num_used == 0


def test_served_with_a_float16_kv_cache(tmp_path, qwen3_tokenizer_dir):
    # `serve --kv-cache-dtype float16` answers as LLM(kv_cache_dtype="float16") does, and its cache holds twice the
    # tokens: 96 KiB is 4 blocks of 16 tokens of this model in float32 (1536 bytes a token), 8 in float16, so this
    # ~90-token prompt fits only in float16.
    from openai import BadRequestError, OpenAI
    from server_process import ServerProcess

    from qwen_engine import SamplingParams

    build_tiny("qwen3", tmp_path, tokenizer_dir=qwen3_tokenizer_dir, seed=5)
    llm = LLM(tmp_path, kv_cache_dtype="float16", kv_cache_memory=96 << 10)
    messages = [{"role": "user", "content": "Tell me about the sea " + "and the waves " * 20}]
    prompt_tokens = len(llm.encode_chat(messages).token_ids)
    assert 64 < prompt_tokens < 128 - 12, prompt_tokens
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    servers = {dtype: ServerProcess("-m", str(tmp_path), "--kv-cache-dtype", dtype, "--kv-cache-memory", "96KiB",
                                    "--served-model-name", "tiny") for dtype in ("float16", "float32")}
    try:
        def ask(dtype: str):
            client = OpenAI(base_url=servers[dtype].base_url + "/v1", api_key="none", max_retries=0)
            return client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12,
                                                  extra_body={"ignore_eos": True})

        reply = ask("float16")
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.completion_tokens == 12
        with pytest.raises(BadRequestError, match="KV cache holds 64"):
            ask("float32")
    finally:
        assert all(server.stop() == 0 for server in servers.values())
