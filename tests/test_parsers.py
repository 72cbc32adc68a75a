"""Reasoning and tool-call parsing of Qwen answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qwen_engine.text.parsers import (
    ParsedAnswer,
    ToolCall,
    new_tool_call_id,
    parse_answer,
    parse_tool_calls,
    prompt_opens_thinking,
    split_reasoning,
)

ID_PATTERN = re.compile(r"call_[A-Za-z0-9]{24}")


def hermes(name: str, arguments: object) -> str:
    return (
        "<tool_call>\n"
        + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        + "\n</tool_call>"
    )


def names_and_args(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in calls]


# ---------------------------------------------------------------- prompt_opens_thinking


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("<|im_start|>assistant\n<think>", True),
        ("<|im_start|>assistant\n<think>\nI began already", True),
        # An earlier turn's think block does not count, open or closed.
        (
            "<|im_start|>assistant\n<think>\nold\n</think>\n\nok<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n"
            "<|im_start|>assistant\n",
            False,
        ),
        (
            "<|im_start|>assistant\n<think>\ncut<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("<|im_start|>assistant\nfine<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
        # No assistant turn at all (a raw completion prompt): the whole text decides.
        ("Question: why?\n<think>\n", True),
        ("plain prompt", False),
        ("", False),
    ],
)
def test_prompt_opens_thinking(prompt: str, expected: bool) -> None:
    assert prompt_opens_thinking(prompt) is expected


def render_qwen3(template: str, messages: list[dict], **kwargs: object) -> str:
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **kwargs)


@pytest.fixture(scope="module")
def qwen3_template(qwen3_tokenizer_dir: Path) -> str:
    config = json.loads((qwen3_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    return config["chat_template"]


def test_prompt_tails_from_the_real_qwen3_template(qwen3_template: str) -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    default = render_qwen3(qwen3_template, messages)
    assert default.endswith("<|im_start|>assistant\n")
    assert not prompt_opens_thinking(default)

    off = render_qwen3(qwen3_template, messages, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking(off)

    # Thinking-only Qwen3 templates (2507) open the block in the generation prompt.
    thinking_template = qwen3_template.replace(
        "{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}"
    )
    assert thinking_template != qwen3_template
    opened = render_qwen3(thinking_template, messages)
    assert opened.endswith("<|im_start|>assistant\n<think>\n")
    assert prompt_opens_thinking(opened)


# ---------------------------------------------------------------- split_reasoning


@pytest.mark.parametrize(
    ("text", "starts_in_think", "expected"),
    [
        ("<think>\nLet me add.\n</think>\n\nIt is 4.", False, ("Let me add.", "It is 4.")),
        ("  \n<think>x</think>y", False, ("x", "y")),
        ("<think>\n\n</think>\n\nHi", False, ("", "Hi")),
        ("Let me add.\n</think>\n\nIt is 4.", True, ("Let me add.", "It is 4.")),
        # The model repeating the opening tag the prompt already had.
        ("<think>\nLet me add.\n</think>\n\nIt is 4.", True, ("Let me add.", "It is 4.")),
        # Cut off while thinking: everything is reasoning.
        ("<think>\nStill think", False, ("Still think", "")),
        ("Still thinking about", True, ("Still thinking about", "")),
        ("", True, ("", "")),
        # Only the first </think> closes the block.
        ("<think>a</think>b</think>c", False, ("a", "b</think>c")),
        # Multi-line reasoning and answer keep their inner newlines.
        ("<think>\nl1\n\nl2\n</think>\n\na1\n\na2\n", False, ("l1\n\nl2", "a1\n\na2")),
    ],
)
def test_split_reasoning(text: str, starts_in_think: bool, expected: tuple[str | None, str]) -> None:
    assert split_reasoning(text, starts_in_think) == expected


@pytest.mark.parametrize(
    "text", ["Hello\n", "", "  spaced  ", "Say <think> later</think> is text", "</think> stray"]
)
def test_split_reasoning_without_a_think_block_is_untouched(text: str) -> None:
    assert split_reasoning(text) == (None, text)


# ---------------------------------------------------------------- ToolCall


def test_tool_call_ids_and_openai_form() -> None:
    call = ToolCall.create("get_weather", {"city": "北京", "days": 3})
    assert ID_PATTERN.fullmatch(call.id)
    assert call.arguments_json == '{"city": "北京", "days": 3}'
    assert call.to_openai() == {
        "id": call.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 3}'},
    }
    ids = {new_tool_call_id() for _ in range(50)}
    assert len(ids) == 50 and all(ID_PATTERN.fullmatch(i) for i in ids)
    assert ToolCall("call_x", "f", {}).to_openai()["function"]["arguments"] == "{}"


# ---------------------------------------------------------------- parse_tool_calls: Hermes JSON


def test_one_call_as_the_template_writes_it() -> None:
    content, calls = parse_tool_calls(hermes("get_weather", {"city": "Paris", "unit": "celsius"}))
    assert content == ""
    assert names_and_args(calls) == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    assert ID_PATTERN.fullmatch(calls[0].id)


def test_several_calls_keep_their_order_and_the_text_around() -> None:
    text = (
        "Let me look both up.\n"
        + hermes("get_weather", {"city": "Paris"})
        + "\n"
        + hermes("get_time", {"tz": "Europe/Paris"})
        + "\n"
        + hermes("get_weather", {"city": "Rome"})
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me look both up."
    assert names_and_args(calls) == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "Europe/Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    assert len({c.id for c in calls}) == 3


def test_text_between_and_after_calls_is_content() -> None:
    text = "Before " + hermes("a", {}) + " middle " + hermes("b", {}) + " after\n"
    content, calls = parse_tool_calls(text)
    assert content == "Before  middle  after"
    assert [c.name for c in calls] == ["a", "b"]


def test_compact_block_without_newlines() -> None:
    content, calls = parse_tool_calls('<tool_call>{"name":"f","arguments":{"x":[1,2]}}</tool_call>')
    assert content == "" and names_and_args(calls) == [("f", {"x": [1, 2]})]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('"{\\"a\\": 1, \\"b\\": \\"two\\"}"', {"a": 1, "b": "two"}),  # a JSON string holding an object
        ('""', {}),
        ("null", {}),
        ("{}", {}),
    ],
)
def test_arguments_forms(arguments: str, expected: dict) -> None:
    _, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": ' + arguments + "}\n</tool_call>")
    assert names_and_args(calls) == [("f", expected)]


def test_missing_arguments_and_parameters_alias() -> None:
    _, calls = parse_tool_calls('<tool_call>\n{"name": "now"}\n</tool_call>')
    assert names_and_args(calls) == [("now", {})]
    _, calls = parse_tool_calls('<tool_call>\n{"name": "f", "parameters": {"q": 1}}\n</tool_call>')
    assert names_and_args(calls) == [("f", {"q": 1})]


def test_nested_braces_and_tag_text_inside_json_strings() -> None:
    arguments = {
        "code": 'if (a) { b(); } </tool_call> <tool_call> {"x": }',
        "nested": {"deep": {"deeper": [1, {"k": "}"}]}},
        "quote": 'she said "hi" \\ ',
    }
    content, calls = parse_tool_calls("ok " + hermes("run", arguments))
    assert content == "ok"
    assert names_and_args(calls) == [("run", arguments)]


def test_cjk_arguments() -> None:
    content, calls = parse_tool_calls("我来查一下。\n" + hermes("查询天气", {"城市": "北京", "日期": "明天"}))
    assert content == "我来查一下。"
    assert names_and_args(calls) == [("查询天气", {"城市": "北京", "日期": "明天"})]
    assert calls[0].arguments_json == '{"城市": "北京", "日期": "明天"}'


@pytest.mark.parametrize(
    "block",
    [
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>',  # unbalanced braces
        "<tool_call>\n{'name': 'f', 'arguments': {}}\n</tool_call>",  # Python, not JSON
        '<tool_call>\n{"arguments": {"x": 1}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": "[1]"}\n</tool_call>',
        '<tool_call>\n["f", {}]\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {}} trailing words\n</tool_call>',
        "<tool_call>\nsearch for cats\n</tool_call>",
        "<tool_call></tool_call>",
    ],
)
def test_malformed_blocks_stay_verbatim(block: str) -> None:
    text = "Intro.\n" + block + "\nOutro."
    content, calls = parse_tool_calls(text)
    assert calls == []
    assert content == text.strip()
    # A good call after the broken one is still found.
    content, calls = parse_tool_calls(text + "\n" + hermes("g", {"y": 2}))
    assert names_and_args(calls) == [("g", {"y": 2})]
    assert content == text.strip()


def test_unclosed_blocks_stay_verbatim() -> None:
    cut = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    assert parse_tool_calls(cut) == (cut.strip(), [])
    whole_json_no_close = '<tool_call>\n{"name": "f", "arguments": {}}\n'
    assert parse_tool_calls(whole_json_no_close) == (whole_json_no_close.strip(), [])
    # An unclosed block followed by a complete one: the first stays text, the second is a call.
    text = '<tool_call>\n{"name": "f", "argu\n' + hermes("g", {})
    content, calls = parse_tool_calls(text)
    assert content == '<tool_call>\n{"name": "f", "argu'
    assert [c.name for c in calls] == ["g"]


def test_every_prefix_parses_without_raising() -> None:
    first, second = (
        hermes("a", {"s": "x</tool_call>y"}),
        "<tool_call>\n<function=b>\n<parameter=n>\n1\n</parameter>\n</function>\n</tool_call>",
    )
    text = "Hi " + first + "\n" + second + " bye"
    first_end = text.index(first) + len(first)
    second_end = text.index(second) + len(second)
    for cut in range(len(text) + 1):
        prefix = text[:cut]
        content, calls = parse_tool_calls(prefix)
        expected = (cut >= first_end) + (cut >= second_end)
        assert len(calls) == expected, prefix
        if expected == 0:
            assert content == prefix.strip()


def test_pathological_nesting_does_not_raise() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    for body in ('{"name": "f", "arguments": ' + deep + "}", '{"name": "f", "arguments": "' + deep + '"}'):
        text = "<tool_call>\n" + body + "\n</tool_call>"
        assert parse_tool_calls(text) == (text, [])
    text = "<tool_call>\n<function=f>\n<parameter=a>\n" + deep + "\n</parameter>\n</function>\n</tool_call>"
    assert names_and_args(parse_tool_calls(text)[1]) == [("f", {"a": deep})]


def test_no_tool_calls() -> None:
    assert parse_tool_calls("  just an answer\n") == ("just an answer", [])
    assert parse_tool_calls("") == ("", [])
    assert parse_tool_calls("mentions </tool_call> only") == ("mentions </tool_call> only", [])


def test_calls_rendered_by_the_real_template_round_trip(qwen3_template: str) -> None:
    arguments = [{"city": "北京", "note": "<b>&'\"</b>"}, {"q": {"nested": [1, 2.5, None, True]}}]
    messages = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": "Calling.",
            "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": arguments[0]}},
                {"type": "function", "function": {"name": "search", "arguments": arguments[1]}},
            ],
        },
    ]
    rendered = render_qwen3(qwen3_template, messages)
    turn = rendered.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    reasoning, answer = split_reasoning(turn)
    assert reasoning == ""  # the template writes an empty think block before the last answer
    content, calls = parse_tool_calls(answer)
    assert content == "Calling."
    assert names_and_args(calls) == [("weather", arguments[0]), ("search", arguments[1])]


# ---------------------------------------------------------------- parse_tool_calls: XML form


def test_xml_call() -> None:
    text = (
        "I will run it.\n"
        "<tool_call>\n<function=run_code>\n"
        "<parameter=language>\npython\n</parameter>\n"
        "<parameter=code>\ndef f(x):\n    return {'a': x}\n\nprint(f(1))\n</parameter>\n"
        "<parameter=timeout>\n30\n</parameter>\n"
        '<parameter=options>\n{"fast": true, "tags": ["a"]}\n</parameter>\n'
        "</function>\n</tool_call>"
    )
    content, calls = parse_tool_calls(text)
    assert content == "I will run it."
    assert names_and_args(calls) == [
        (
            "run_code",
            {
                "language": "python",
                "code": "def f(x):\n    return {'a': x}\n\nprint(f(1))",
                "timeout": 30,
                "options": {"fast": True, "tags": ["a"]},
            },
        )
    ]


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("\nhello\n", "hello"),
        ("\n\nhello\n\n", "\nhello\n"),  # only one framing newline on each side goes
        ("hello", "hello"),
        ("\n5\n", 5),
        ("\n-2.5\n", -2.5),
        ("\ntrue\n", True),
        ("\nnull\n", None),
        ('\n"5"\n', "5"),
        ("\n[1, 2]\n", [1, 2]),
        ("\nNaN\n", "NaN"),
        ("\nInfinity\n", "Infinity"),
        ("\n北京\n", "北京"),
        ("\n</tool_call> and </function>\n", "</tool_call> and </function>"),
        ("\n\n", ""),
    ],
)
def test_xml_parameter_values(raw: str, value: object) -> None:
    text = f"<tool_call>\n<function=f>\n<parameter=v>{raw}</parameter>\n</function>\n</tool_call>"
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert names_and_args(calls) == [("f", {"v": value})]


def test_xml_call_without_parameters_and_mixed_with_json() -> None:
    text = (
        "<tool_call>\n<function=now>\n</function>\n</tool_call>\n"
        + hermes("search", {"q": "x"})
        + "\n<tool_call>\n<function=查询>\n<parameter=城市>\n上海\n</parameter>\n</function>\n</tool_call>"
    )
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert names_and_args(calls) == [("now", {}), ("search", {"q": "x"}), ("查询", {"城市": "上海"})]


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</function>\n</tool_call>",  # parameter never closed
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</tool_call>",  # function never closed
        "<tool_call>\n<function=>\n</function>\n</tool_call>",  # no name
        "<tool_call>\n<function=f>\nstray text\n</function>\n</tool_call>",
        "<tool_call>\n<function=f>\n</function>\nextra\n</tool_call>",
    ],
)
def test_malformed_xml_blocks_stay_verbatim(block: str) -> None:
    content, calls = parse_tool_calls("A\n" + block + "\nB")
    assert calls == []
    assert content == "A\n" + block + "\nB"


# ---------------------------------------------------------------- parse_answer


def test_think_and_tool_calls_together() -> None:
    text = (
        "<think>\nThe user wants weather; I should call the tool.\n</think>\n\n"
        + hermes("get_weather", {"city": "Paris"})
        + "\n"
        + hermes("get_weather", {"city": "東京"})
    )
    parsed = parse_answer(text)
    assert isinstance(parsed, ParsedAnswer)
    assert parsed.reasoning == "The user wants weather; I should call the tool."
    assert parsed.content == ""
    assert names_and_args(parsed.tool_calls) == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "東京"}),
    ]


def test_prompt_opened_think_with_answer_and_call() -> None:
    text = "Need data.\n</think>\n\nOne moment.\n" + hermes("lookup", {"id": 7})
    parsed = parse_answer(text, starts_in_think=True)
    assert (parsed.reasoning, parsed.content) == ("Need data.", "One moment.")
    assert names_and_args(parsed.tool_calls) == [("lookup", {"id": 7})]


def test_tool_calls_inside_the_reasoning_are_not_calls() -> None:
    call = hermes("draft", {})
    parsed = parse_answer("<think>\nMaybe " + call + "?\n</think>\n\nNo call needed.")
    assert parsed.reasoning == "Maybe " + call + "?"
    assert parsed.content == "No call needed."
    assert parsed.tool_calls == []


def test_cut_off_while_thinking() -> None:
    parsed = parse_answer("Considering " + hermes("f", {}), starts_in_think=True)
    assert parsed.reasoning == "Considering " + hermes("f", {})
    assert parsed.content == "" and parsed.tool_calls == []


def test_plain_answer() -> None:
    parsed = parse_answer("The answer is 4.\n")
    assert parsed == ParsedAnswer(None, "The answer is 4.", [])


# ---------------------------------------------------------------- untagged calls


def test_untagged_call_objects_naming_offered_tools_are_calls() -> None:
    # What Qwen2.5-Coder-0.5B answers to "What's the weather in Paris?" with a get_weather tool.
    text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    parsed = parse_answer(text, tool_names={"get_weather"})
    assert parsed.content == "" and names_and_args(parsed.tool_calls) == [("get_weather", {"city": "Paris"})]
    two = '\n{"name": "a", "parameters": {"x": [1]}}\n\n{"name": "b", "arguments": "{\\"y\\": null}"}  '
    assert names_and_args(parse_answer(two, tool_names={"a", "b"}).tool_calls) == [("a", {"x": [1]}), ("b", {"y": None})]
    fenced = parse_answer("```json\n{\n  " + text[1:-1] + "\n}\n```", tool_names={"get_weather"})
    assert fenced.content == "" and names_and_args(fenced.tool_calls) == [("get_weather", {"city": "Paris"})]
    reasoned = parse_answer("<think>Use it.</think>\n" + text, tool_names={"get_weather"})
    assert reasoned.reasoning == "Use it." and len(reasoned.tool_calls) == 1


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',  # no tool names given: plain JSON content
        '{"name": "other", "arguments": {}}',  # not an offered tool
        '{"name": "get_weather"}',  # no arguments: just an object with a name
        '{"name": "get_weather", "arguments": {}, "note": 1}',  # more than a call
        'Call: {"name": "get_weather", "arguments": {}}',  # prose around it
        '{"name": "get_weather", "arguments": {}} done',
        '{"name": "get_weather", "arguments": [1]}',
        '{"name": "get_weather", "arguments": {}',  # cut off
        '```json\n{"name": "get_weather", "arguments": {}}\n```\nThat is the call.',
        '```json\n{"name": "get_weather", "arguments": {}}',  # the block never closes
        '```py\n{"name": "get_weather", "arguments": {}}\n```',
    ],
)
def test_other_json_answers_stay_content(text: str) -> None:
    names = set() if text.startswith('{"name": "get_weather", "arguments": {"city"') else {"get_weather"}
    parsed = parse_answer(text, tool_names=names)
    assert parsed.tool_calls == [] and parsed.content == text.strip()


def test_tagged_calls_win_over_untagged_ones() -> None:
    untagged = '{"name": "f", "arguments": {}}'
    parsed = parse_answer(hermes("f", {"x": 1}) + "\n" + untagged, tool_names={"f"})
    assert names_and_args(parsed.tool_calls) == [("f", {"x": 1})] and parsed.content == untagged
