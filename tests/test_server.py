"""A real `qwen-engine serve` with the demo model, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import json
import random
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from server_process import ServerProcess

KEY = "test-key"
MODEL = "qwen2.5-coder-0.5b-instruct"
GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}


@pytest.fixture(scope="module")
def server(demo_gguf):
    proc = ServerProcess("--max-model-len", "4096", "--max-body-bytes", "200000", "--kv-cache-memory", "512MiB",
                         api_key=KEY)
    yield proc
    assert proc.stop(signal.SIGTERM) == 0  # graceful shutdown exits 0


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=300)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, flags=re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_pool_whole(server) -> None:
    import time

    for _ in range(100):
        if metric(server, "qwen_engine_kv_blocks_used") == 0 and metric(server, "qwen_engine_requests_running") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("KV blocks still in use")


def test_health_models_openapi(server, client):
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]
    schema = httpx.get(f"{server.base_url}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
    props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "tools", "tool_choice", "response_format", "top_logprobs", "stream_options"} <= set(props)


def test_chat_matches_python_api(client, demo_llm):
    from qwen_engine import SamplingParams

    r = client.chat.completions.create(model=MODEL, messages=ask("What is the capital of France?"), max_tokens=16,
                                       **GREEDY)
    expected = demo_llm.chat(ask("What is the capital of France?"),
                             SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.0))
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == expected.usage.prompt_tokens
    assert r.usage.completion_tokens == expected.usage.completion_tokens


def test_stream_equals_non_stream(client):
    messages = ask("Write a haiku about the sea.")
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_stream_ends_with_done(server):
    body = {"model": MODEL, "messages": ask("Hi"), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_tool_call_round_trip(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = ask("What's the weather in Paris?")
    # "auto": the demo model writes a ```json block rather than a <tool_call>; still a call, streamed or not.
    auto = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=64, **GREEDY)
    assert auto.choices[0].finish_reason == "tool_calls" and auto.choices[0].message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in auto.choices[0].message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=64,
                                                 stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [("get_weather", {"city": "Paris"})]
    # "required": constrained decoding writes the template's own <tool_call> format.
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                       max_tokens=64, **GREEDY)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # Streamed, the same call arrives as tool-call deltas.
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=64,
                                                 tool_choice="required", stream=True, **GREEDY))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # The answer goes back in; the model continues from the tool's result.
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "clear"}'}]
    follow = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=40, **GREEDY)
    assert "18" in follow.choices[0].message.content


def test_json_schema_output_validates(client):
    import jsonschema

    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
        "required": ["name", "age", "languages"], "additionalProperties": False}
    for seed in (1, 2):
        r = client.chat.completions.create(
            model=MODEL, messages=ask("Describe a programmer."), max_tokens=120, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=60,
                                       response_format={"type": "json_object"}, **GREEDY)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_structured_outputs(client, demo_llm):
    from qwen_engine import SamplingParams

    question = ask("What is the capital of France? Answer with one word.")
    for extra in ({"structured_outputs": {"choice": ["Lyon", "Nice"]}}, {"guided_choice": ["Lyon", "Nice"]}):
        r = client.chat.completions.create(model=MODEL, messages=question, max_tokens=8, extra_body={**extra},
                                           **{"temperature": 0})
        expected = demo_llm.chat(question, SamplingParams(max_tokens=8, temperature=0),
                                 structured_output={"choice": ["Lyon", "Nice"]})
        assert r.choices[0].message.content == expected.text and expected.text in ("Lyon", "Nice")
    r = client.completions.create(model=MODEL, prompt="The answer to 6 * 7 is ", max_tokens=8, temperature=0,
                                  extra_body={"guided_regex": r"[0-9]+\.", "repetition_penalty": 1.0})
    assert r.choices[0].text == "42."
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = client.chat.completions.create(model=MODEL, messages=question, max_tokens=20, temperature=0,
                                       extra_body={"guided_json": json.dumps(schema)})
    assert set(json.loads(r.choices[0].message.content)) == {"city"}


def test_n_and_seed(client):
    kw = dict(model=MODEL, messages=ask("Name a fruit."), max_tokens=8, temperature=1.0, seed=42, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_logprobs(client, demo_llm):
    import torch

    messages = ask("Say yes.")
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, logprobs=True, top_logprobs=3,
                                       **GREEDY)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    prompt = demo_llm.tokenizer.encode(demo_llm.apply_chat_template(messages))
    first = torch.log_softmax(demo_llm.logits(prompt)[-1], -1)
    assert entries[0].logprob == pytest.approx(first.max().item(), abs=1e-3)
    assert [t.logprob for t in entries[0].top_logprobs] == pytest.approx(first.topk(3).values.tolist(), abs=1e-3)


def test_logit_bias(client, demo_llm):
    from qwen_engine import SamplingParams

    messages = ask("What is the capital of France?")
    free = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, logprobs=True, **GREEDY)
    first = demo_llm.tokenizer.encode(free.choices[0].logprobs.content[0].token)
    assert len(first) == 1
    # Banning the greedy answer's first token changes the answer, exactly as the Python API does it.
    banned = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, logprobs=True,
                                            logit_bias={str(first[0]): -100}, **GREEDY)
    expected = demo_llm.chat(messages, SamplingParams(max_tokens=4, temperature=0, repetition_penalty=1.0,
                                                      logit_bias={first[0]: -100}))
    assert banned.choices[0].message.content == expected.text != free.choices[0].message.content
    assert demo_llm.tokenizer.encode(banned.choices[0].logprobs.content[0].token) != first
    # +100 forces a token at every step.
    forced = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                            logit_bias={"9707": 100}, **GREEDY)
    assert forced.choices[0].message.content == demo_llm.tokenizer.decode([9707] * 3)


def test_dry_penalty_reaches_the_engine(client, demo_llm):
    from qwen_engine import SamplingParams

    messages = ask("Repeat the sentence 'I like cats.' ten times.")
    dry = {"dry_multiplier": 0.8, "dry_allowed_length": 2, "dry_sequence_breakers": ["\n"]}
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                       extra_body={"repetition_penalty": 1.0, **dry})
    expected = demo_llm.chat(messages, SamplingParams(max_tokens=40, temperature=0, repetition_penalty=1.0, **dry))
    plain = demo_llm.chat(messages, SamplingParams(max_tokens=40, temperature=0, repetition_penalty=1.0))
    assert r.choices[0].message.content == expected.text != plain.text


def test_min_tokens(client, demo_llm):
    from qwen_engine import SamplingParams

    r = client.chat.completions.create(model=MODEL, messages=ask("Say hi."), max_tokens=40,
                                       extra_body={"min_tokens": 20}, **{"temperature": 0})
    expected = demo_llm.chat(ask("Say hi."), SamplingParams(max_tokens=40, min_tokens=20, temperature=0))
    assert r.choices[0].message.content == expected.text and r.usage.completion_tokens >= 20


def test_stop_strings(client):
    kw = dict(model=MODEL, messages=ask("Count from 1 to 10, separated by commas."), max_tokens=60, **GREEDY)
    free = client.chat.completions.create(**kw).choices[0].message.content
    assert "5" in free
    cut = client.chat.completions.create(stop=["5"], **kw).choices[0]
    assert cut.message.content == free[: free.index("5")] and cut.finish_reason == "stop"


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="def add(a, b):\n", max_tokens=12, **GREEDY)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens <= 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="def add(a, b):\n", max_tokens=12, stream=True, **GREEDY) if c.choices)
    assert streamed == r.choices[0].text


def test_completions_from_token_ids_and_with_a_suffix(client, demo_llm):
    from qwen_engine import SamplingParams

    text = "def add(a, b):\n"
    ids = demo_llm.tokenizer.encode(text)
    by_text = client.completions.create(model=MODEL, prompt=text, max_tokens=8, **GREEDY).choices[0].text
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, **GREEDY).choices[0].text
    assert by_ids == by_text
    two = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=8, echo=True, **GREEDY)
    assert two.choices[0].text == text + by_text
    assert two.choices[1].text.startswith(demo_llm.tokenizer.decode(ids[:2]))
    # Fill in the middle: Qwen2.5-Coder's FIM tokens around prompt and suffix.
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    middle = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=16, **GREEDY)
    fim = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    expected = demo_llm.generate(fim, SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.0))[0]
    assert middle.choices[0].text == expected.text and "return a + b" in expected.text


def test_completion_logprobs_offsets_index_the_text(client):
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=5, echo=True, logprobs=2,
                                      stream=stream, **GREEDY)
        chunks = list(r) if stream else [r]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
        assert len(tokens) == 4 + 5 and offsets[0] == 0 and offsets[4] == len("def fib(n):")  # 4 prompt tokens
        assert [text[o : o + len(t)] for o, t in zip(offsets, tokens, strict=True)] == tokens


def test_echo_logprobs_score_the_prompt(client, demo_llm):
    import torch

    # What evaluation harnesses send: echo, logprobs, max_tokens 0; the prompt's own log-probs come back.
    text = "def fib(n):\n    return n"
    ids = demo_llm.tokenizer.encode(text)
    reference = torch.log_softmax(demo_llm.logits(ids), dim=-1)
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=2, stream=stream)
        (choice,) = [c.choices[0] for c in r] if stream else r.choices
        lp = choice.logprobs
        assert choice.text == text and choice.finish_reason == "length"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
        expected = [reference[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
        best = reference[len(ids) - 2].topk(2)
        assert sorted(lp.top_logprobs[-1].values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)
        assert "".join(lp.tokens) == text and lp.text_offset[-1] == len(text) - len(lp.tokens[-1])
    # With generation the answer's entries follow the prompt's.
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=2, echo=True, logprobs=0, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 2 and lp.text_offset[len(ids)] == len(text)
    assert lp.token_logprobs[len(ids)] == pytest.approx(reference[-1].max().item(), abs=1e-3)


def test_tokenize_and_detokenize(server, demo_llm):
    headers = {"Authorization": f"Bearer {KEY}"}
    messages = ask("Hello, 世界")
    text = "def add(a, b):\n"
    r = httpx.post(f"{server.base_url}/tokenize", json={"model": MODEL, "prompt": text}, headers=headers).json()
    assert r["tokens"] == demo_llm.tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 4096
    r = httpx.post(f"{server.base_url}/tokenize", json={"messages": messages}, headers=headers).json()
    assert r["tokens"] == demo_llm.tokenizer.encode(demo_llm.apply_chat_template(messages))
    back = httpx.post(f"{server.base_url}/detokenize", json={"tokens": r["tokens"]}, headers=headers).json()
    assert back["prompt"] == demo_llm.apply_chat_template(messages)
    assert httpx.post(f"{server.base_url}/tokenize", json={"prompt": "x"}).status_code == 401
    bad = httpx.post(f"{server.base_url}/detokenize", json={"tokens": [10**9]}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "x", "messages": messages}, headers=headers)
    assert both.status_code == 400


def test_metrics(server, client):
    client.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=2)
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("qwen_engine_requests_total", "qwen_engine_prompt_tokens_total", "qwen_engine_generation_tokens_total",
                 "qwen_engine_time_to_first_token_seconds_bucket", "qwen_engine_inter_token_latency_seconds_bucket",
                 "qwen_engine_requests_running", "qwen_engine_requests_waiting", "qwen_engine_kv_blocks_used",
                 "qwen_engine_prefix_cache_hit_rate"):
        assert name in text
    assert 'qwen_engine_requests_total{endpoint="chat",status="200"}' in text


# -- errors ------------------------------------------------------------------------------------------------------

def post(server, body, key: str | None = KEY, raw: bytes | None = None, path: str = "/v1/chat/completions"
         ) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{server.base_url}{path}", content=content, headers=headers, timeout=120)


def assert_error(r: httpx.Response, status: int, fragment: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param


def test_error_shapes(server):
    ok = {"model": MODEL, "messages": ask("hi"), "max_tokens": 2}
    assert_error(post(server, None, raw=b"{not json"), 400, "not valid JSON")
    assert_error(post(server, {**ok, "temperature": -1}), 400, "temperature", param="temperature")
    assert_error(post(server, {**ok, "messages": []}), 400, "messages", param="messages")
    assert_error(post(server, {**ok, "messages": [{"role": "wizard", "content": "x"}]}), 400, "unknown role")
    assert_error(post(server, ok, key=None), 401, "API key")
    assert_error(post(server, ok, key="wrong"), 401, "API key")
    assert_error(post(server, {**ok, "model": "gpt-4"}), 404, "does not exist", param="model")
    assert_error(post(server, {**ok, "messages": ask("x" * 300_000)}), 413, "exceeds")
    assert_error(post(server, {**ok, "messages": ask("word " * 5000)}), 400, "context holds 4096")
    assert_error(post(server, {**ok, "tool_choice": "required"}), 400, "needs tools", param="tool_choice")
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}}
    assert_error(post(server, {**ok, "response_format": bad_schema}), 400, "", param="response_format")
    assert_error(post(server, {**ok, "n": 0}), 400, "n", param="n")
    assert_error(post(server, {**ok, "logit_bias": {"151936": 5}}), 400, "outside the vocabulary",
                 param="logit_bias")
    assert_error(post(server, {**ok, "logit_bias": {"12": 500}}), 400, "[-100, 100]", param="logit_bias")
    assert_error(post(server, {**ok, "seed": 2**70}), 400, "seed", param="seed")
    assert_error(post(server, {**ok, "stop": [""]}), 400, "stop", param="stop")
    assert_error(post(server, {**ok, "dry_base": 0.5}), 400, "dry_base", param="dry_base")
    assert_error(post(server, {**ok, "min_tokens": 5}), 400, "min_tokens", param="min_tokens")
    assert_error(post(server, {**ok, "guided_regex": "(x"}), 400, "regex", param="structured_outputs")
    assert_error(post(server, {**ok, "guided_choice": ["a"], "response_format": {"type": "json_object"}}), 400,
                 "cannot be combined", param="structured_outputs")
    assert_error(post(server, {**ok, "tools": [{"type": "function"}]}), 400, "tools[0]", param="tools")
    assert_error(post(server, {**ok, "messages": [{"role": "user", "content": None}]}), 400, "no content")
    done = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    assert_error(post(server, {**done, "prompt": ["a", [1]]}, path="/v1/completions"), 400, "token ids",
                 param="prompt")
    assert_error(post(server, {**done, "prompt": [151936]}, path="/v1/completions"), 400, "outside the vocabulary")
    assert_error(post(server, {**done, "best_of": 3}, path="/v1/completions"), 400, "best_of", param="best_of")
    assert_error(post(server, {**done, "suffix": "y", "echo": True}, path="/v1/completions"), 400, "suffix")
    assert_error(post(server, {**done, "max_tokens": 0}, path="/v1/completions"), 400, "echo", param="max_tokens")
    assert post(server, ok).status_code == 200  # none of these hurt the engine
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0).models.list()


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": MODEL, "messages": ask("Tell me a long story about a dragon."), "max_tokens": 400,
            "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # hang up mid-stream
    wait_pool_whole(server)


# -- load --------------------------------------------------------------------------------------------------------

PROMPTS = ["What is 2+2?", "Name a color.", "Say hello in French.", "What is Python?", "Give me a prime number.",
           "Translate 'cat' to Spanish.", "What is the opposite of hot?", "Spell 'dog' backwards."]


def test_32_concurrent_streams_match_alone(server, client):
    alone = {p: client.chat.completions.create(model=MODEL, messages=ask(p), max_tokens=16, **GREEDY)
             .choices[0].message.content for p in PROMPTS}

    def stream(prompt: str) -> str:
        chunks = client.chat.completions.create(model=MODEL, messages=ask(prompt), max_tokens=16, stream=True,
                                                **GREEDY)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    jobs = PROMPTS * 4
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream, jobs))
    assert results == [alone[p] for p in jobs]
    wait_pool_whole(server)


def test_soak_with_random_cancellations(server):
    rng = random.Random(0)
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        body = {"model": MODEL, "messages": ask(f"Number {i}: say something."), "max_tokens": rng.randint(1, 6),
                "stream": True, "temperature": 0.8}
        try:
            with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
                if r.status_code != 200:
                    raise AssertionError(r.status_code)
                for j, _ in enumerate(r.iter_lines()):
                    if i % 5 == 0 and j == 1:
                        break  # cancel every fifth request
        except Exception as e:  # collected and asserted below
            with lock:
                errors.append(repr(e))

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(one, range(200)))
    assert errors == []
    wait_pool_whole(server)


# ---------------------------------------------------------------- the Responses API


WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_responses_text_equals_chat(client):
    r = client.responses.create(model=MODEL, instructions="Answer briefly.", input="What is the capital of France?",
                                max_output_tokens=24, temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}])
    assert r.status == "completed" and r.output_text == chat.choices[0].message.content
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    events = list(client.responses.create(model=MODEL, instructions="Answer briefly.", stream=True, temperature=0,
                                          input="What is the capital of France?", max_output_tokens=24))
    assert [e.type for e in events][:2] == ["response.created", "response.in_progress"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].type == "response.completed" and events[-1].response.output_text == r.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    short = client.responses.create(model=MODEL, input="Write a long poem.", max_output_tokens=3, temperature=0)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"


def test_responses_function_calls_round_trip(client):
    r = client.responses.create(model=MODEL, input="What's the weather in Paris?", tools=[WEATHER_TOOL],
                                temperature=0)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    events = list(client.responses.create(model=MODEL, input="What's the weather in Paris?", tools=[WEATHER_TOOL],
                                          temperature=0, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments
    assert [o.type for o in events[-1].response.output] == [o.type for o in r.output]
    # The call and its output go back in; the answer is the chat API's for the same conversation.
    follow = client.responses.create(model=MODEL, tools=[WEATHER_TOOL], temperature=0, max_output_tokens=40, input=[
        {"role": "user", "content": "What's the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature_c": 18}'}])
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}
    chat = client.chat.completions.create(model=MODEL, tools=[chat_tool], temperature=0, max_tokens=40, messages=[
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function",
                                                               "function": {"name": call.name,
                                                                            "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temperature_c": 18}'}])
    assert follow.output_text == (chat.choices[0].message.content or "") and "18" in follow.output_text


def test_responses_are_stored_and_continued(client):
    """previous_response_id continues a stored conversation: the answer is the chat API's for the whole
    conversation (the earlier instructions are not carried over, as OpenAI does); GET and DELETE work on
    stored responses, and store=false keeps nothing."""
    first = client.responses.create(model=MODEL, instructions="Answer briefly.", temperature=0, max_output_tokens=20,
                                    input="My name is Ada and I like tea. Say hello.")
    second = client.responses.create(model=MODEL, previous_response_id=first.id, temperature=0, max_output_tokens=20,
                                     input="What is my name?")
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=20, messages=[
        {"role": "user", "content": "My name is Ada and I like tea. Say hello."},
        {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "What is my name?"}])
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.previous_response_id == first.id and second.store is True
    events = list(client.responses.create(model=MODEL, previous_response_id=second.id, temperature=0, stream=True,
                                          max_output_tokens=12, input="And what do I like?"))
    streamed = events[-1].response
    assert streamed.previous_response_id == second.id
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    assert client.responses.retrieve(first.id).output_text == first.output_text
    (item,) = client.responses.input_items.list(second.id).data
    assert (item.type, item.role, item.content[0].text) == ("message", "user", "What is my name?")
    several = client.responses.create(model=MODEL, max_output_tokens=2, input=[
        {"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"}])
    page = client.responses.input_items.list(several.id, order="asc", limit=2)
    assert [i.content[0].text for i in page.data] == ["One", "Two"] and page.has_more
    rest = client.responses.input_items.list(several.id, order="asc", after=page.last_id)
    assert [i.content[0].text for i in rest.data] == ["Three"] and not rest.has_more
    newest = client.responses.input_items.list(several.id, limit=1)  # newest first by default, as OpenAI
    assert newest.data[0].content[0].text == "Three"

    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, previous_response_id=first.id, input="Hi", max_output_tokens=2)
    unstored = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=2)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_responses_errors(server):
    def post_responses(body):
        return post(server, {"model": MODEL, "input": "hi", **body}, path="/v1/responses")

    assert_error(post_responses({"previous_response_id": "resp_1"}), 404, "no stored response 'resp_1'",
                 param="previous_response_id")
    assert_error(post_responses({"tools": [{"type": "web_search"}]}), 400, "function tool", param="tools")
    assert_error(post_responses({"input": [{"type": "file_search_call"}]}), 400, "file_search_call", param="input")
    assert_error(post_responses({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}), 400,
                 "input_file", param="input")


# ---------------------------------------------------------------- Anthropic's Messages API


@pytest.fixture(scope="module")
def anthropic_client(server):
    import anthropic

    return anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=300)


ANTHROPIC_TOOL = {"name": "get_weather", "description": "Current weather in a city",
                  "input_schema": WEATHER_TOOL["parameters"]}


def test_messages_text_and_stream_equal_chat(anthropic_client, client):
    kw = dict(model=MODEL, max_tokens=24, system="Answer briefly.", extra_body={"temperature": 0},
              messages=[{"role": "user", "content": "What is the capital of France?"}])
    r = anthropic_client.messages.create(**kw)
    chat = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}])
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == chat.choices[0].message.content
    assert r.stop_reason == "end_turn" and r.usage.input_tokens == chat.usage.prompt_tokens
    with anthropic_client.messages.stream(**kw) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == r.content[0].text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == r.usage.output_tokens
    cut = anthropic_client.messages.create(model=MODEL, max_tokens=40, stop_sequences=["5"],
                                           extra_body={"temperature": 0}, messages=[
                                               {"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", "5") and "5" not in cut.content[0].text
    short = anthropic_client.messages.create(model=MODEL, max_tokens=3, extra_body={"temperature": 0},
                                             messages=[{"role": "user", "content": "Write a long poem."}])
    assert short.stop_reason == "max_tokens"


def test_messages_tool_use_round_trip(anthropic_client, client):
    ask_weather = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = anthropic_client.messages.create(model=MODEL, max_tokens=64, tools=[ANTHROPIC_TOOL],
                                         extra_body={"temperature": 0}, messages=ask_weather)
    assert r.stop_reason == "tool_use"
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert (use.name, use.input) == ("get_weather", {"city": "Paris"})
    with anthropic_client.messages.stream(model=MODEL, max_tokens=64, tools=[ANTHROPIC_TOOL],
                                          extra_body={"temperature": 0}, messages=ask_weather) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and [(b.name, b.input) for b in final.content if b.type == "tool_use"] \
        == [("get_weather", {"city": "Paris"})]
    follow = anthropic_client.messages.create(model=MODEL, max_tokens=40, tools=[ANTHROPIC_TOOL],
                                              extra_body={"temperature": 0}, messages=ask_weather + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C, clear"}]}])
    chat_tool = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                  "parameters": WEATHER_TOOL["parameters"]}}
    chat = client.chat.completions.create(model=MODEL, tools=[chat_tool], temperature=0, max_tokens=40, messages=[
        *ask_weather,
        {"role": "assistant", "content": None, "tool_calls": [{"id": use.id, "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "18 C, clear"}])
    text = "".join(b.text for b in follow.content if b.type == "text")
    assert text == (chat.choices[0].message.content or "")


def test_messages_errors_have_anthropics_shape(server):
    def post_messages(body, key=KEY):
        headers = {"x-api-key": key, "content-type": "application/json"}
        return httpx.post(f"{server.base_url}/v1/messages", headers=headers, timeout=60,
                          json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                                **body})

    for body, key, status, kind in [
        ({"messages": [{"role": "system", "content": "x"}]}, KEY, 400, "invalid_request_error"),
        ({"model": "nope"}, KEY, 404, "not_found_error"),
        ({}, "wrong", 401, "authentication_error"),
        ({"max_tokens": 0}, KEY, 400, "invalid_request_error"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, KEY, 400, "invalid_request_error"),
    ]:
        r = post_messages(body, key)
        assert r.status_code == status, r.text
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind and r.json()["error"]["message"]
    assert post_messages({}).status_code == 200
