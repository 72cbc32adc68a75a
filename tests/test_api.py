"""The Python API's contract, on a small random Qwen3 model (fast) and, where behaviour matters, the demo model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny

from qwen_engine import LLM, ContextLengthError, InputError, ModelLoadError, SamplingParams
from qwen_engine.engine.stop_strings import StopStrings

USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    folder = tmp_path_factory.mktemp("api-tiny")
    build_tiny("qwen3", folder, tokenizer_dir=qwen3_tokenizer_dir)
    return LLM(folder, max_model_len=256)


def sampled(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.95, ignore_eos=True, **kw)


def test_stream_concatenation_equals_chat(tiny):
    params = sampled(max_tokens=20, seed=3)
    deltas = list(tiny.chat_stream(USER, params))
    whole = tiny.chat(USER, params)
    assert "".join(d.text for d in deltas) == whole.raw_text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == whole.finish_reason == "length"
    assert deltas[-1].usage.completion_tokens == 20 == len(whole.token_ids)
    assert whole.usage.prompt_tokens == len(tiny.tokenizer.encode(tiny.apply_chat_template(USER)))


def test_seed_repeats_and_differs(tiny):
    a = tiny.chat(USER, sampled(max_tokens=16, seed=11)).token_ids
    b = tiny.chat(USER, sampled(max_tokens=16, seed=11)).token_ids
    c = tiny.chat(USER, sampled(max_tokens=16, seed=12)).token_ids
    assert a == b
    assert a != c


def test_top_k_1_equals_greedy(tiny):
    greedy = tiny.chat(USER, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)).token_ids
    top1 = tiny.chat(USER, SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=5, ignore_eos=True))
    assert top1.token_ids == greedy


def test_greedy_follows_the_logits(tiny):
    # Each greedy token is the argmax of llm.logits over prompt + previous answer tokens.
    prompt = tiny.tokenizer.encode(tiny.apply_chat_template(USER))
    out = tiny.chat(USER, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, repetition_penalty=1.0))
    logits = tiny.logits(prompt + out.token_ids[:-1])
    assert logits[len(prompt) - 1 :].argmax(-1).tolist() == out.token_ids


def test_stop_token_ids_and_eos(tiny):
    free = tiny.chat(USER, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)).token_ids
    stop_at = free[4]
    out = tiny.chat(USER, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_at]))
    assert out.token_ids == free[: free.index(stop_at) + 1]
    assert out.finish_reason == "stop"


def test_stop_strings_cut_the_text(tiny):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    free = tiny.generate("once upon a time", params)[0].text
    assert len(free) > 12
    stop = free[8:11]
    cut = tiny.generate("once upon a time", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=stop))
    assert cut[0].text == free[: free.index(stop)]
    assert cut[0].finish_reason == "stop"


def test_stop_strings_are_held_back_while_partial():
    stops = StopStrings(["</end>"])
    assert stops.feed("hello </") == ("hello ", False)
    assert stops.feed("en") == ("", False)
    assert stops.feed("d> tail") == ("", True)
    stops = StopStrings(["</end>"])
    assert stops.feed("a </") == ("a ", False)
    assert stops.feed("x") == ("</x", False)
    assert stops.flush("<") == "<"


def test_generate_many_prompts(tiny):
    outs = tiny.generate(["alpha", "beta gamma"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [5, 5]
    assert outs[0].usage.prompt_tokens == len(tiny.tokenizer.encode("alpha"))


def test_logits_shape_and_dtype(tiny):
    ids = tiny.tokenizer.encode("a short text")
    logits = tiny.logits(ids)
    assert logits.dtype == torch.float32 and logits.shape == (len(ids), tiny.config.vocab_size)


def test_max_tokens_capped_by_context(tiny):
    prompt = "word " * 120  # ~120 tokens of a 256-token context
    out = tiny.generate(prompt, SamplingParams(temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert out.usage.total_tokens == 256


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "must not be empty"),
        ([{"role": "wizard", "content": "hi"}], "unknown role 'wizard'"),
        ([{"content": "hi"}], "has no 'role'"),
        ("hello", "must be a list"),
        ([{"role": "user", "content": 42}], "must be a string, null or a list"),
    ],
)
def test_bad_messages(tiny, messages, message):
    with pytest.raises(InputError, match=message):
        tiny.chat(messages)


def test_prompt_longer_than_context(tiny):
    with pytest.raises(ContextLengthError, match="context holds 256"):
        tiny.chat([{"role": "user", "content": "word " * 400}])
    with pytest.raises(ContextLengthError):
        tiny.chat_stream([{"role": "user", "content": "word " * 400}])  # raised before iterating


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -3}, "top_k must be an integer"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"presence_penalty": 3}, r"presence_penalty must be in \[-2, 2\]"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"temperature": float("nan")}, "finite"),
        ({"stop": [""]}, "stop must be"),
    ],
)
def test_bad_sampling_values(kwargs, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**kwargs)


def test_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError):
        LLM(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        LLM(tmp_path, dtype="int3")


def test_demo_tool_call_round_trip(demo_llm):
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }]
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    # Left to itself ("auto"), this 0.5B coder model answers with a ```json block instead of a <tool_call>;
    # an answer that is only such a call to an offered tool is parsed as one.
    free = demo_llm.chat(messages, SamplingParams(max_tokens=64, temperature=0), tools=tools)
    assert free.raw_text.startswith("```json\n{") and "<tool_call>" not in free.raw_text
    assert [(c.name, c.arguments) for c in free.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert free.text == ""
    # Naming the function makes constrained decoding produce the template's format.
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = demo_llm.chat(messages, SamplingParams(max_tokens=64, temperature=0), tools=tools, tool_choice=choice)
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert "<tool_call>" not in out.text and out.finish_reason == "stop"
    # The OpenAI-shaped call (arguments as a JSON string) goes back into the template like transformers' dict form.
    call = out.tool_calls[0].to_openai()
    follow_up = messages + [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"temperature_c": 18}'},
    ]
    text = demo_llm.apply_chat_template(follow_up)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n{\"temperature_c\": 18}\n</tool_response>" in text


def test_min_tokens_holds_off_eos_and_stop_strings(demo_llm):
    messages = [{"role": "user", "content": "Say hi."}]
    greedy = dict(temperature=0, repetition_penalty=1.0)
    short = demo_llm.chat(messages, SamplingParams(max_tokens=64, **greedy))
    assert short.finish_reason == "stop" and len(short.token_ids) < 16
    held = demo_llm.chat(messages, SamplingParams(max_tokens=64, min_tokens=24, **greedy))
    # The reference: greedy over the model's logits with the end-of-sequence ids banned for 24 tokens.
    ids = demo_llm.encode_chat(messages).token_ids
    ends = sorted(demo_llm.engine.eos_token_ids)
    tokens: list[int] = []
    while len(tokens) < 64:
        logits = demo_llm.logits(ids + tokens)[-1].clone()
        if len(tokens) < 24:
            logits[ends] = -torch.inf
        tokens.append(int(logits.argmax()))
        if tokens[-1] in ends:
            break
    assert held.token_ids == tokens and len(held.token_ids) > 24
    # Stop strings count only from the 24th token on: the "!" of "Hello!" stays, the cut comes at the next one.
    cut = demo_llm.chat(messages, SamplingParams(max_tokens=64, min_tokens=24, stop=["!"], **greedy))
    text = demo_llm.tokenizer.decode(tokens[:24])
    assert "!" in text and cut.finish_reason == "stop"
    whole = demo_llm.tokenizer.decode(tokens)
    assert cut.text == text + whole[len(text):].split("!")[0]
    with pytest.raises(InputError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
