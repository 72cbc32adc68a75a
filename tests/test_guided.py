"""Structured output: the demo model, constrained by engine/guided.py, always writes JSON that parses and
matches the schema, ends its turn by itself, and makes the forced tool call; bad schemas are input errors.

Every generation runs in one engine batch (the `runs` fixture): a decode step of the demo model costs about as
much for ten sequences as for one, which keeps this file under a minute.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import jsonschema
import pytest
import torch

from qwen_engine import SamplingParams
from qwen_engine.engine.guided import GuideFactory
from qwen_engine.errors import InputError
from qwen_engine.text.parsers import parse_tool_calls
from qwen_engine.text.tokenizer import QwenTokenizer

PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "species": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "hobbies": {
            "type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 2, "maxItems": 4,
        },
    },
    "required": ["name", "age", "species", "address", "hobbies"],
    "additionalProperties": False,
}
PET_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}
JSON_OBJECT = {"type": "json_object"}
STRING_FORMAT = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string"}}}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_web",
            "description": "Search the web",
            "parameters": {
                "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"],
            },
        },
    },
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

CAT = [{"role": "user", "content": "Describe a fictional cat as a JSON object."}]
HAIKU = [{"role": "user", "content": "Write a haiku about autumn leaves."}]  # does not ask for JSON
PET = [{"role": "user", "content": "Invent a pet; give its name, age, species, address and hobbies as JSON."}]
WEATHER = [{"role": "user", "content": "What's the weather like in Paris today?"}]
HELLO = [{"role": "user", "content": "Hello!"}]


@dataclass
class Run:
    text: str
    output_ids: list[int]
    finish_reason: str | None


@pytest.fixture(scope="module")
def factory(demo_llm) -> GuideFactory:
    return GuideFactory(demo_llm.tokenizer, demo_llm.config.vocab_size, demo_llm.eos_token_ids)


@pytest.fixture(scope="module")
def runs(demo_llm, factory) -> dict[str, Run]:
    """All generations of this file, run together in one batch."""
    jobs = {
        # name: (messages, guide, seed, temperature, tools)
        "object-0": (CAT, factory.for_response_format(JSON_OBJECT), 0, 0.7, None),
        "object-1": (CAT, factory.for_response_format(JSON_OBJECT), 1, 0.7, None),
        "object-hot-0": (HAIKU, factory.for_response_format(JSON_OBJECT), 0, 1.2, None),
        "object-hot-1": (HAIKU, factory.for_response_format(JSON_OBJECT), 1, 1.2, None),
        "schema-1": (PET, factory.for_response_format(PET_FORMAT), 1, 0.7, None),
        "schema-greedy-a": (PET, factory.for_response_format(PET_FORMAT), 0, 0.0, None),
        "schema-greedy-b": (PET, factory.for_response_format(PET_FORMAT), 99, 0.0, None),
        "tool-any": (WEATHER, factory.for_tool_call(TOOLS, None), 0, 0.7, TOOLS),
        "tool-named": (HELLO, factory.for_tool_call(TOOLS, "get_weather"), 2, 1.2, TOOLS),
        "unguided-haiku": (HAIKU, None, 0, 0.0, None),
    }
    seqs = {}
    for name, (messages, guide, seed, temperature, tools) in jobs.items():
        max_tokens = 12 if guide is None else 200
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        params = params.with_defaults(demo_llm.default_params)
        prompt_ids = demo_llm.tokenizer.encode(demo_llm.apply_chat_template(messages, tools=tools))
        seqs[name] = demo_llm.engine.add_request(prompt_ids, params, guide=guide)
    steps, start = 0, time.perf_counter()
    while not all(seq.finished for seq in seqs.values()):
        demo_llm.engine.step()
        steps += 1
        assert steps < 400, "the engine made no progress"
    print(f"\n{len(seqs)} requests in one batch: {steps} steps, {time.perf_counter() - start:.1f} s")
    runs = {}
    for name, seq in seqs.items():
        runs[name] = Run(demo_llm.tokenizer.decode(seq.output_ids), seq.output_ids, seq.finish_reason)
        print(f"{name}: {runs[name].finish_reason}, {len(seq.output_ids)} tokens: {runs[name].text!r}")
    return runs


def assert_stopped_by_eos(run: Run, eos_ids: list[int]) -> None:
    assert run.finish_reason == "stop", run
    assert run.output_ids[-1] in eos_ids, run


# ---------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", ["object-0", "object-1", "object-hot-0", "object-hot-1"])
def test_json_object_always_parses_to_a_dict(runs, demo_llm, name):
    run = runs[name]
    assert isinstance(json.loads(run.text), dict), run.text
    assert_stopped_by_eos(run, demo_llm.eos_token_ids)


def test_the_guide_does_the_work(runs):
    # Unguided, the haiku prompt gets prose; guided (object-hot-*), the same prompt gets a JSON object.
    with pytest.raises(ValueError):
        json.loads(runs["unguided-haiku"].text)


@pytest.mark.parametrize("name", ["schema-1", "schema-greedy-a"])
def test_json_schema_output_validates(runs, demo_llm, name):
    run = runs[name]
    jsonschema.validate(json.loads(run.text), PET_SCHEMA)
    assert_stopped_by_eos(run, demo_llm.eos_token_ids)


def test_greedy_guided_output_is_deterministic(runs):
    # Same prompt, different seeds: greedy decoding through the same grammar must not depend on either.
    assert runs["schema-greedy-a"].output_ids == runs["schema-greedy-b"].output_ids


def test_tool_call_guide_makes_a_parseable_call(runs, demo_llm):
    run = runs["tool-any"]
    content, calls = parse_tool_calls(run.text)
    assert content == "" and len(calls) == 1, run.text
    assert calls[0].name in TOOL_SCHEMAS
    jsonschema.validate(calls[0].arguments, TOOL_SCHEMAS[calls[0].name])
    assert_stopped_by_eos(run, demo_llm.eos_token_ids)


def test_named_tool_call_is_forced_even_off_topic(runs, demo_llm):
    run = runs["tool-named"]
    content, calls = parse_tool_calls(run.text)
    assert content == "" and [c.name for c in calls] == ["get_weather"], run.text
    jsonschema.validate(calls[0].arguments, TOOL_SCHEMAS["get_weather"])
    assert_stopped_by_eos(run, demo_llm.eos_token_ids)
    # <tool_call> and </tool_call> come out as the single added tokens the template uses.
    tok = demo_llm.tokenizer
    assert run.output_ids[0] == tok.token_to_id("<tool_call>")
    assert tok.token_to_id("</tool_call>") in run.output_ids


# ---------------------------------------------------------------------------------------------- the factory


@pytest.mark.parametrize(
    "fmt, words",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}},
         "properties must be an object"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}, "objekt"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/gone"}}}, "gone"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "["}}},
         "regex"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}, "JSON Schema object"),
        ({"type": "json_schema"}, "json_schema object"),
        ({"type": "regex"}, "not supported"),
        ("json", "must be an object"),
    ],
)
def test_bad_response_formats_are_input_errors(factory, fmt, words):
    with pytest.raises(InputError, match=words):
        factory.for_response_format(fmt)


def test_text_format_needs_no_guide(factory):
    assert factory.for_response_format({"type": "text"}) is None


def test_bad_tool_choices_are_input_errors(factory):
    with pytest.raises(InputError, match="not among the tools"):
        factory.for_tool_call(TOOLS, "send_email")
    with pytest.raises(InputError, match="non-empty list"):
        factory.for_tool_call([], None)
    bad_params = [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]
    with pytest.raises(InputError, match="object"):
        factory.for_tool_call(bad_params, None)
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"properties": 5}}}]
    with pytest.raises(InputError, match="properties must be an object"):
        factory.for_tool_call(bad_schema, None)


def walk(guide, tok: QwenTokenizer, text: str, vocab: int) -> list[int]:
    """Feed `text`'s tokens through `guide`, checking each is allowed; return the ids allowed at the end."""
    for token in tok.encode(text):
        logits = guide.mask_logits(torch.zeros(vocab))
        assert torch.isfinite(logits[token]), (text, tok.decode([token]))
        guide.accept(token)
    return torch.isfinite(guide.mask_logits(torch.zeros(vocab))).nonzero().flatten().tolist()


def test_only_eos_after_the_grammar_is_complete(factory, demo_llm):
    guide = factory.for_response_format(PET_FORMAT)
    text = '{"name": "Rex", "age": 4, "species": "dog", "address": {"city": "Oslo", "zip": "01234"}, ' \
           '"hobbies": ["naps", "balls"]}'
    assert walk(guide, demo_llm.tokenizer, text, demo_llm.config.vocab_size) == sorted(demo_llm.eos_token_ids)
    assert guide.is_complete


def test_tool_call_guide_accepts_every_tool_and_rejects_others(factory, demo_llm):
    tok, vocab = demo_llm.tokenizer, demo_llm.config.vocab_size
    call = '<tool_call>\n{"name": "search_web", "arguments": {"query": "rain"}}\n</tool_call>'
    assert walk(factory.for_tool_call(TOOLS, None), tok, call, vocab) == sorted(demo_llm.eos_token_ids)
    # A call to another tool than the named one is refused at the first differing character.
    guide = factory.for_tool_call(TOOLS, "get_weather")
    with pytest.raises(AssertionError):
        walk(guide, tok, call, vocab)


def test_vocabulary_rows_without_text_are_banned(factory, demo_llm):
    # The demo GGUF pads its vocabulary to the model's 151936 rows with "[PAD<id>]" tokens; inside a JSON
    # string nearly every token is allowed, but never those, nor added tokens such as <tool_call>.
    tok, vocab = demo_llm.tokenizer, demo_llm.config.vocab_size
    guide = factory.for_response_format(STRING_FORMAT)
    allowed = set(walk(guide, tok, '"abc', vocab))
    assert len(allowed) > 100_000
    pads = [i for i in range(vocab) if tok.token_bytes(i) == b"[PAD%d]" % i]
    assert pads and not allowed & set(pads)
    assert tok.token_to_id("<tool_call>") not in allowed and tok.token_to_id("<|im_end|>") not in allowed


def test_model_rows_past_the_tokenizer_are_banned(qwen3_tokenizer_dir):
    # Qwen3's tokenizer.json has 151669 tokens, its models 151936 embedding rows.
    tok = QwenTokenizer.from_dir(qwen3_tokenizer_dir)
    vocab = 151936
    assert tok.vocab_size < vocab
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    factory = GuideFactory(tok, vocab, eos)
    guide = factory.for_response_format(STRING_FORMAT)
    allowed = walk(guide, tok, '"x', vocab)
    assert len(allowed) > 100_000 and max(allowed) < tok.vocab_size
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n' \
           "</tool_call>"
    assert walk(factory.for_tool_call(TOOLS, None), tok, call, vocab) == sorted(eos)


def test_compiled_grammars_are_cached(factory):
    factory.for_response_format(PET_FORMAT)
    start = time.perf_counter()
    for _ in range(20):
        factory.for_response_format(PET_FORMAT)
    assert (time.perf_counter() - start) / 20 < 0.01  # a copy of the cached matcher, not a new compile


def test_mask_cost(factory, demo_llm, capsys):
    """Prints a mask's cost per step for the 151936-row vocabulary (not asserted: the machine is shared)."""
    tok, vocab = demo_llm.tokenizer, demo_llm.config.vocab_size
    text = '{"name": "Rex", "age": 4, "species": "dog", "address": {"city": "Oslo", "zip": "01234"}, ' \
           '"hobbies": ["long walks in the park", "balls"]}'
    costs = {}
    for label, fmt in (("json_object", JSON_OBJECT), ("json_schema", PET_FORMAT)):
        guide = factory.for_response_format(fmt)
        logits = torch.randn(vocab)
        times = []
        for token in tok.encode(text):
            start = time.perf_counter()
            guide.mask_logits(logits)
            times.append(time.perf_counter() - start)
            guide.accept(token)
        costs[label] = (statistics.median(times) * 1e3, max(times) * 1e3)
    with capsys.disabled():
        for label, (median, worst) in costs.items():
            print(f"\nmask_logits, {label}, {vocab} rows: median {median:.3f} ms, max {worst:.3f} ms", end="")


# ---------------------------------------------------------------- vLLM's structured outputs


def test_choice_regex_and_grammar_walks(factory, demo_llm):
    tok, vocab = demo_llm.tokenizer, demo_llm.config.vocab_size
    eos = sorted(demo_llm.eos_token_ids)
    assert walk(factory.for_structured_output({"choice": ["yes", "no way"]}), tok, "no way", vocab) == eos
    with pytest.raises(AssertionError):
        walk(factory.for_structured_output({"choice": ["yes", "no way"]}), tok, "nope", vocab)
    assert walk(factory.for_structured_output({"regex": r"[0-9]{3}-[a-z]+"}), tok, "123-abc", vocab) != eos
    assert walk(factory.for_structured_output({"grammar": 'start: "(" /[a-c]+/ ")"'}), tok, "(abc)", vocab) == eos
    with pytest.raises(AssertionError):
        walk(factory.for_structured_output({"regex": r"[0-9]{3}"}), tok, "12a", vocab)


@pytest.mark.parametrize(
    ("spec", "words"),
    [({"choice": []}, "non-empty list"), ({"regex": "(unclosed"}, "regex cannot be used"),
     ({"grammar": "start: nope"}, "grammar cannot be used"), ({"choice": ["a"], "regex": "b"}, "exactly one"),
     ({"xml": "x"}, "unknown structured output"), ({"json": {"type": "objekt"}}, "objekt")],
)
def test_bad_structured_outputs_are_one_line_input_errors(factory, spec, words):
    with pytest.raises(InputError, match=words) as caught:
        factory.for_structured_output(spec)
    assert "\n" not in str(caught.value)


def test_structured_chat_and_completion(demo_llm):
    import re

    greedy = SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.0)
    question = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]
    free = demo_llm.chat(question, greedy)
    assert free.text.rstrip(".") == "Paris"
    # A choice the model would make anyway changes nothing; one it would not is forced.
    assert demo_llm.chat(question, greedy, structured_output={"choice": ["Paris", "Lyon"]}).text == "Paris"
    forced = demo_llm.chat(question, greedy, structured_output={"choice": ["Lyon", "Nice"]})
    assert forced.text in ("Lyon", "Nice") and forced.finish_reason == "stop"
    date = demo_llm.chat([{"role": "user", "content": "When did the Berlin wall fall?"}], greedy,
                         structured_output={"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"})
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", date.text)
    (number,) = demo_llm.generate("The answer to 6 * 7 is ", greedy, structured_output={"regex": r"[0-9]+\."})
    assert number.text == "42."
