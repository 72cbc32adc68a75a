"""Streaming parser: whatever the cuts, its deltas add up to what the non-streaming parser gives."""

from __future__ import annotations

import json
import random

import pytest

from qwen_engine.text.parsers import (
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    parse_answer,
    parse_bare_tool_calls,
    parse_tool_call_block,
    parse_tool_calls,
    split_reasoning,
    tool_call_block_may_complete,
)
from qwen_engine.text.stream_parser import ParserDelta, StreamParser, ToolCallDelta


def hermes(name: str, arguments: object) -> str:
    return (
        TOOL_CALL_OPEN
        + "\n"
        + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        + "\n"
        + TOOL_CALL_CLOSE
    )


def xml(name: str, **parameters: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in parameters.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


# (answer, starts_in_think): realistic model outputs, and the awkward cases around tags.
CORPUS: list[tuple[str, bool]] = [
    ("Hello! How can I help you today?", False),
    ("  \n\nThe answer is 4.\n\n", False),
    ("你好！我是通义千问，很高兴为你服务。\n\n有什么可以帮你的吗？", False),
    ("Sure 😀👍🏽 — here you go: 🇫🇷 Paris!\n", False),
    ("<think>\nThe user asks 2+2. That is 4.\n</think>\n\nIt is **4**.", False),
    ("<think>\nLet me consider the options carefully; first, ", False),  # cut off while thinking
    ("<think>\n\n</think>\n\nHi there.", False),
    ("\n <think>\n嗯，用户问天气。\n</think>\n\n北京今天晴。", False),
    ("Need to add.\n</think>\n\n4", True),
    ("Still thinking about < and > signs and </th", True),  # cut off, ends in a partial tag
    ("<think>\nagain\n</think>\nok", True),  # the model repeats the <think> the prompt had
    ("</think>answer right away", True),
    ("", True),
    (
        "Let me check.\n" + hermes("get_weather", {"city": "Paris", "unit": "celsius"}) + "\nDone checking.",
        False,
    ),
    (hermes("get_weather", {"city": "Paris"}), False),
    (
        "<think>\nNeed both cities and the time.\n</think>\n\n"
        + hermes("get_weather", {"city": "Paris"})
        + "\n"
        + hermes("get_time", {"tz": "Europe/Paris"})
        + "\n"
        + hermes("get_weather", {"city": "東京"}),
        False,
    ),
    (
        "Need data.\n</think>\n\nOne moment.\n"
        + hermes("lookup", {"id": 7, "deep": {"a": [1, {"b": None}]}}),
        True,
    ),
    (
        "I will run it.\n"
        + xml(
            "run_code",
            code="def f(x):\n    return x < 3 and {'a': x}  # </b>",
            timeout="30",
            opts='{"fast": true}',
        )
        + "\nRunning.",
        False,
    ),
    (xml("now") + "\n" + hermes("search", {"q": "x"}) + "\n" + xml("查询", 城市="上海"), False),
    ('Intro.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>\nOutro.', False),  # unbalanced
    ("Try:\n<tool_call>\n{'name': 'f', 'arguments': {}}\n</tool_call>\n" + hermes("g", {"y": 2}), False),
    ('<tool_call>\n{"arguments": {"x": 1}}\n</tool_call> then text', False),  # no name
    ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', False),  # unclosed
    ('<tool_call>\n{"name": "f", "argu\n' + hermes("g", {}), False),  # unclosed, then a good one
    ("A\n<tool_call>\n<function=f>\nstray text\n</function>\n</tool_call>\nB", False),  # malformed XML
    ("If a < b and b > c, then a <b>bold</b> x <tool_ y <tool_call", False),
    ("<thinking>not a think tag</thinking> plain", False),
    ("```html\n<div>a</div>\n</think> is text here\n```\nif (x </ y) {}", False),
    ("ok " + hermes("run", {"code": 'x </tool_call> <tool_call> {"y": }', "q": 'say "hi" \\ '}), False),
    ("<think>\nMaybe " + hermes("draft", {}) + "?\n</think>\n\nNo call needed.", False),
    ("</think> stray", False),
    ("<think>a</think>b</think>c", False),
    (
        '<tool_call>\n{"name": "s", "arguments": '
        '{"q": "\\u5317\\u4eac \\ud83d\\ude00", "n": -1.5e3}}\n</tool_call>',
        False,
    ),
    ('<tool_call>{"name":"f","parameters":"{\\"a\\": 1}"}</tool_call>', False),
    (hermes("a", {}) + "\n\n  " + hermes("b", {"n": [True, None, 0.5]}) + "  \n", False),
    ("<think>  \n  a  b  \n\n</think>   \n\n  x  y  \n", False),
    ("<tool_call></tool_call>", False),
    ("<thi", False),
    ("x" + hermes("f", {}) + "y", False),
]


def expected(
    text: str,
    starts_in_think: bool,
    parse_reasoning: bool = True,
    parse_tools: bool = True,
    tool_names: frozenset[str] = frozenset(),
) -> tuple[str | None, str, list[tuple[str, dict]]]:
    """What the non-streaming parser gives, for the parser options given."""
    if not parse_reasoning:
        content, calls = parse_tool_calls(text)
        bare = None if calls or not tool_names else parse_bare_tool_calls(content, tool_names)
        if bare is not None:
            content, calls = "", bare
        return None, content, [(c.name, c.arguments) for c in calls]
    if not parse_tools:
        reasoning, answer = split_reasoning(text, starts_in_think)  # stripped only after a think block
        return reasoning, answer, []
    parsed = parse_answer(text, starts_in_think, tool_names)
    return parsed.reasoning, parsed.content, [(c.name, c.arguments) for c in parsed.tool_calls]


def run(pieces: list[str], starts_in_think: bool = False, **options: bool) -> tuple[StreamParser, list]:
    parser = StreamParser(starts_in_think=starts_in_think, **options)
    deltas = [parser.feed(piece) for piece in pieces]
    deltas.append(parser.finish())
    return parser, deltas


def check(pieces: list[str], starts_in_think: bool, **options: bool) -> None:
    text = "".join(pieces)
    parser, deltas = run(pieces, starts_in_think, **options)
    reasoning, content, calls = expected(text, starts_in_think, **options)
    where = f"{pieces!r} starts_in_think={starts_in_think} {options}"
    # The mapping: reasoning None (no think block) and "" (an empty one) both stream as nothing.
    assert "".join(d.reasoning for d in deltas) == (reasoning or ""), where
    assert parser.has_think_block is (reasoning is not None), where
    assert "".join(d.content for d in deltas) == content, where
    assert [(c.name, c.arguments) for c in parser.tool_calls] == calls, where
    check_call_deltas(parser, deltas)


def check_call_deltas(parser: StreamParser, deltas: list[ParserDelta]) -> None:
    streamed = [tc for d in deltas for tc in d.tool_calls]
    # Indexes come in order 0, 1, ...; within an index the first delta carries id and name, once.
    indexes = [tc.index for tc in streamed]
    assert indexes == sorted(indexes)
    assert sorted(set(indexes)) == list(range(len(parser.tool_calls)))
    for index, call in enumerate(parser.tool_calls):
        mine = [tc for tc in streamed if tc.index == index]
        assert (mine[0].id, mine[0].name) == (call.id, call.name)
        assert all(tc.id is None and tc.name is None for tc in mine[1:])
        assert "".join(tc.arguments for tc in mine) == call.arguments_json
    assert len({c.id for c in parser.tool_calls}) == len(parser.tool_calls)


def random_pieces(text: str, rng: random.Random, longest: int = 6) -> list[str]:
    """Cut like a tokenizer would: mostly short pieces of 1 to `longest` characters."""
    pieces, pos = [], 0
    while pos < len(text):
        size = rng.randint(1, longest)
        pieces.append(text[pos : pos + size])
        pos += size
    return pieces


def test_corpus_is_large_and_varied() -> None:
    assert len(CORPUS) >= 25
    kinds = [parse_answer(t, s) for t, s in CORPUS]
    assert sum(p.reasoning is not None for p in kinds) >= 8
    assert sum(bool(p.tool_calls) for p in kinds) >= 8
    assert sum(TOOL_CALL_OPEN in p.content for p in kinds) >= 5  # blocks that stay text


@pytest.mark.parametrize(("text", "starts_in_think"), CORPUS)
def test_every_split_point(text: str, starts_in_think: bool) -> None:
    for cut in range(len(text) + 1):
        check([text[:cut], text[cut:]], starts_in_think)


@pytest.mark.parametrize(("text", "starts_in_think"), CORPUS)
def test_token_like_splits(text: str, starts_in_think: bool) -> None:
    rng = random.Random(text)
    check(list(text), starts_in_think)
    check([text], starts_in_think)
    for _ in range(8):
        check(random_pieces(text, rng), starts_in_think)


@pytest.mark.parametrize(("text", "starts_in_think"), CORPUS)
@pytest.mark.parametrize("options", [{"parse_reasoning": False}, {"parse_tools": False}])
def test_options(text: str, starts_in_think: bool, options: dict[str, bool]) -> None:
    rng = random.Random(text)
    check(list(text), starts_in_think, **options)
    for _ in range(3):
        check(random_pieces(text, rng), starts_in_think, **options)


def tag_completions(prefix: str) -> list[str]:
    """Continuations that turn the partial tag `prefix` ends with (if any) into a tag that gets consumed."""
    endings = [""]
    for tag, after in (
        (THINK_OPEN, "Z"),
        (THINK_CLOSE, "Z"),
        (TOOL_CALL_OPEN, '{"name": "z"}' + TOOL_CALL_CLOSE),
    ):
        for size in range(1, len(tag)):
            if prefix.endswith(tag[:size]):
                endings.append(tag[size:] + after)
    return endings


@pytest.mark.parametrize(("text", "starts_in_think"), CORPUS)
def test_nothing_is_sent_that_more_text_could_take_back(text: str, starts_in_think: bool) -> None:
    """No partial tag leaks: after each character, what was sent must still hold however the text goes on,
    in particular when the partial tag it ends with (`</thi`, `<tool_`, ...) is completed."""
    parser = StreamParser(starts_in_think)
    sent_reasoning = sent_content = ""
    for cut in range(1, len(text) + 1):
        delta = parser.feed(text[cut - 1])
        sent_reasoning += delta.reasoning
        sent_content += delta.content
        for ending in tag_completions(text[:cut]):
            reasoning, content, _ = expected(text[:cut] + ending, starts_in_think)
            assert (reasoning or "").startswith(sent_reasoning), (text[:cut], ending)
            assert content.startswith(sent_content), (text[:cut], ending)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! 你好 a < b, c<d 😀 done.",
        "<think>\nx <y and z</t h</think>\n\nAnswer: a < b",
    ],
)
def test_text_that_cannot_start_a_tag_goes_out_at_once(text: str) -> None:
    parser = StreamParser()
    sent = ["", ""]
    for cut in range(1, len(text) + 1):
        delta = parser.feed(text[cut - 1])
        sent = [sent[0] + delta.reasoning, sent[1] + delta.content]
        # Against what finishing now would give, only a tag prefix may still wait (whitespace too, but a
        # finish drops trailing whitespace).
        reasoning, content, _ = expected(text[:cut], False)
        for whole, out in zip([reasoning or "", content], sent, strict=True):
            assert whole.startswith(out)
            held = whole[len(out) :]
            assert len(held) < len(THINK_CLOSE) and (not held or held.lstrip().startswith("<")), (
                text[:cut],
                out,
            )


def test_partial_tags_are_held_then_released() -> None:
    parser = StreamParser()
    assert parser.feed("<thi").empty  # may be <think>
    assert parser.feed("nk>\nReason ").reasoning == "Reason"
    assert parser.feed("</thi").empty
    assert parser.feed("s is not a tag").reasoning == " </this is not a tag"
    assert parser.feed("</think>\n\nAns <tool").content == "Ans"
    assert parser.feed("box>").content == " <toolbox>"
    assert parser.feed(' <tool_call>\n{"name": "f"').empty
    delta = parser.feed("}\n</tool_call> after")
    assert delta.content == "  after"  # the space held before the call, and the one after it
    assert [(tc.index, tc.name, tc.arguments) for tc in delta.tool_calls] == [(0, "f", "{}")]
    assert parser.finish().empty
    assert [c.name for c in parser.tool_calls] == ["f"]


def test_a_broken_block_is_released_as_soon_as_it_cannot_parse() -> None:
    parser = StreamParser()
    assert parser.feed("Intro.\n").content == "Intro."
    assert parser.feed("<tool_call>\n{'na").content == "\n<tool_call>\n{'na"  # JSON cannot start with '
    assert parser.feed("me': 'f'}\n</tool_call>\nOutro").content == "me': 'f'}\n</tool_call>\nOutro"
    parser = StreamParser()
    parser.feed('<tool_call>\n{"name": "f", "arguments": {"x": 1}\n')  # one brace short: may still close
    assert parser.feed("</tool_call> and on").content == (
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call> and on'
    )
    assert parser.tool_calls == []


def test_a_call_with_tags_inside_its_strings_waits_for_the_real_end() -> None:
    parser = StreamParser()
    delta = parser.feed('<tool_call>\n{"name": "f", "arguments": {"s": "a</tool_call>b<tool_call>')
    assert delta.empty
    delta = parser.feed('"}}\n</tool_call>')
    assert [(tc.name, json.loads(tc.arguments)) for tc in delta.tool_calls] == [
        ("f", {"s": "a</tool_call>b<tool_call>"})
    ]


def test_unclosed_block_and_partial_tags_flush_at_finish() -> None:
    parser, deltas = run(["Checking.\n<tool_call>\n", '{"name": "f", "arguments": {}}\n'])
    assert "".join(d.content for d in deltas) == 'Checking.\n<tool_call>\n{"name": "f", "arguments": {}}'
    assert parser.tool_calls == []
    parser, deltas = run(["<think>\nhmm </thi"])
    assert "".join(d.reasoning for d in deltas) == "hmm </thi"


def test_call_delta_shape() -> None:
    text = "Go.\n" + hermes("get_weather", {"city": "北京", "days": 3}) + hermes("now", {})
    parser, deltas = run([text])
    calls = deltas[0].tool_calls
    assert calls == [
        ToolCallDelta(0, parser.tool_calls[0].id, "get_weather", '{"city": "北京", "days": 3}'),
        ToolCallDelta(1, parser.tool_calls[1].id, "now", "{}"),
    ]
    assert all(c.id and c.id.startswith("call_") for c in calls)
    assert deltas[0].content == "Go."


def test_finish_once_and_nothing_after() -> None:
    parser = StreamParser()
    assert parser.feed("").empty
    assert parser.feed("Hi ").content == "Hi"
    assert parser.finish().empty  # the held space was trailing
    assert parser.finish().empty
    assert parser.feed("more").empty


def test_reasoning_mapping() -> None:
    for text, starts_in_think, has_block in [
        ("plain", False, False),
        ("<think></think>x", False, True),
        ("", True, True),
        ("", False, False),
        ("  ", False, False),
    ]:
        parser, _ = run([text], starts_in_think)
        assert parser.has_think_block is has_block
        assert (split_reasoning(text, starts_in_think)[0] is not None) is has_block


# ---------------------------------------------------------------- random text built from tag fragments

FRAGMENTS = [
    THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, "<thi", "nk>", "</th", "<tool_", "call>",
    "\n", " ", "  \n", "a", "北京", "😀", "<", "</", ">", "{", "}", '"', "\\", ":", ",",
    '"name"', '"f"', '"arguments"', '{"x": 1}', "{}", '"na', "tru", "1.", "e+",
    "<function=f>", "</function>", "<parameter=p>", "</parameter>", "<function=", "<parameter=",
]  # fmt: skip


def random_answer(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 14)):
        roll = rng.random()
        if roll < 0.12:
            parts.append(
                hermes(rng.choice(["f", "查询"]), {"x": rng.choice([1, "a</tool_call>", [None], "\n"])})
            )
        elif roll < 0.2:
            parts.append(xml("g", p=rng.choice(["1", "x < y", "</tool_call>"])))
        else:
            parts.append(rng.choice(FRAGMENTS))
    return "".join(parts)


def test_random_tag_soup_matches_the_whole_text_parser() -> None:
    rng = random.Random(20240607)
    for _ in range(700):
        text = random_answer(rng)
        starts_in_think = rng.random() < 0.3
        check(random_pieces(text, rng, longest=rng.choice([2, 5, 12])), starts_in_think)
        cut = rng.randint(0, len(text))
        check([text[:cut], text[cut:]], starts_in_think)
    for _ in range(150):
        text = random_answer(rng)
        options = rng.choice([{"parse_reasoning": False}, {"parse_tools": False}])
        check(random_pieces(text, rng), rng.random() < 0.3, **options)


# ---------------------------------------------------------------- the block helpers in parsers.py


def random_json_value(rng: random.Random, depth: int = 0) -> object:
    roll = rng.random()
    if depth > 3 or roll < 0.5:
        return rng.choice(
            [0, -0.0, 1.5e-7, -12, 3.25e21, 10**20, True, False, None, float("nan"), float("-inf"),
             "", 'a"b\\c\n\t\x01', "北京😀", "\ud83d", "</tool_call>", "x" * rng.randint(0, 4)]
        )  # fmt: skip
    if roll < 0.75:
        return [random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {
        rng.choice(["k", "名", 'q"\\', "😀"]) + str(i): random_json_value(rng, depth + 1) for i in range(3)
    }


def test_every_prefix_of_a_good_block_may_complete() -> None:
    rng = random.Random(7)
    for _ in range(400):
        body = json.dumps(
            {"name": "f", "arguments": {"v": random_json_value(rng)}},
            ensure_ascii=rng.random() < 0.5,
            indent=rng.choice([None, 0, 2]),
            separators=rng.choice([None, (",", ":")]),
        )
        text = (
            TOOL_CALL_OPEN + rng.choice(["", "\n", " \n "]) + body + rng.choice(["", "\n"]) + TOOL_CALL_CLOSE
        )
        assert parse_tool_call_block(text) is not None
        for cut in range(len(text) + 1):
            assert tool_call_block_may_complete(text[:cut]), text[:cut]
    text = xml("f", a="x", b="</tool_call>") + "tail"
    call, end = parse_tool_call_block(text)
    assert (call.name, call.arguments, text[end:]) == ("f", {"a": "x", "b": "</tool_call>"}, "tail")
    for cut in range(len(text) + 1):
        assert tool_call_block_may_complete(text[:cut]), text[:cut]


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\nsearch for cats",
        "<tool_call>\n{'name': 'f'}",
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}\n<',
        '<tool_call>\n{"arguments": {}}',
        '<tool_call>\n{"name": "f", "arguments": [1]}',
        '<tool_call>\n{"name": "f"} trailing',
        '<tool_call>\n{"name": "f\n',
        '<tool_call>\n{"name": "\\x',
        '<tool_call>\n{"name": 1.x',
        '<tool_call>\n{"name": trux',
        "<tool_call>\n<function=f>\nstray",
        "<tool_call>\n<function=f\n",
        "<tool_call>\n<function= >",
        "<tool_call>\n<function=f>\n</function>\nextra",
        "<tool_call>\n<function=f>\n<parameter=>",
        "<tool_calx",
    ],
)
def test_broken_block_starts_cannot_complete(text: str) -> None:
    assert not tool_call_block_may_complete(text)
    assert parse_tool_call_block(text) is None


def test_too_deep_to_judge_waits_for_the_end() -> None:
    deep = "<tool_call>\n" + '{"name": "f", "arguments": ' + "[" * 100_000
    assert tool_call_block_may_complete(deep)
    parser, deltas = run([deep[:50], deep[50:], "]" * 100_000 + "}\n</tool_call> end"])
    text = deep + "]" * 100_000 + "}\n</tool_call> end"
    assert "".join(d.content for d in deltas) == parse_answer(text).content == text


def test_any_characters_never_raise() -> None:
    rng = random.Random(3)
    alphabet = '<>/{}[]":,\\ \n\t\x00\x1f\ud800\ufeff\u3000é北😀tnkfu' + "".join(FRAGMENTS)
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        check(random_pieces(text, rng, 3), rng.random() < 0.5)


# ---------------------------------------------------------------- untagged calls (tool_names)

NAMES = frozenset({"get_weather", "f"})


def bare(name: str, arguments: object, key: str = "arguments") -> str:
    return json.dumps({"name": name, key: arguments}, ensure_ascii=False)


BARE_CORPUS: list[tuple[str, bool]] = [
    (bare("get_weather", {"city": "Paris"}), False),
    ("  " + bare("get_weather", {"city": "北京"}) + "\n" + bare("f", {}, "parameters") + "\n", False),
    (bare("unknown", {}), False),
    (bare("f", {}) + " and more text", False),
    ('{"name": "f"}', False),
    ('{"city": "Paris", "n": [1, 2]}', False),
    ("<think>The weather tool.</think>\n\n" + bare("get_weather", {"city": "Oslo"}), False),
    ("I need the tool.\n</think>\n" + bare("f", {"x": 1}), True),
    ("Sure: " + bare("f", {}), False),
    (bare("f", {"s": "<tool_call>{}</tool_call>"}), False),
    (hermes("f", {}) + "\n" + bare("f", {}), False),
    (bare("f", {}) + "\n" + hermes("f", {"x": 2}), False),
    ('{"name": "f", "arguments": {}, "extra": 1}', False),
    ('{"name": "f", "arguments": "{\\"x\\": 1}"}', False),
    ('{"name": "f", "arguments": {}', False),
    ("{", False),
    ("   ", False),
    ("", False),
    # What the demo model writes at temperature 0: the object, pretty-printed, in a ```json block.
    ("```json\n" + json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}, indent=2) + "\n```", False),
    ("```\n" + bare("f", {}) + "\n" + bare("f", {"x": 1}) + "\n```\n", False),
    ("```json\n" + bare("f", {}) + "\n```\nDone.", False),
    ("```python\nprint(1)\n```", False),
    ("```json\n" + bare("f", {}) + "\n", False),
    ("```json\n```", False),
    ("`f`", False),
    ('```json\n{"city": 1}\n```', False),
]


def test_bare_corpus_has_calls_and_non_calls() -> None:
    parsed = [parse_answer(t, s, NAMES) for t, s in BARE_CORPUS]
    assert [len(p.tool_calls) for p in parsed] == [1, 2, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0,
                                                   1, 2, 0, 0, 0, 0, 0, 0]
    assert all(p.content == "" for p in parsed if p.tool_calls and p is not parsed[10] and p is not parsed[11])
    # Without the names, none of the untagged objects is a call.
    assert [len(parse_answer(t, s).tool_calls) for t, s in BARE_CORPUS[:2]] == [0, 0]


@pytest.mark.parametrize(("text", "starts_in_think"), BARE_CORPUS)
def test_bare_calls_stream_as_the_whole_text_parses(text: str, starts_in_think: bool) -> None:
    rng = random.Random(text)
    for cut in range(len(text) + 1):
        check([text[:cut], text[cut:]], starts_in_think, tool_names=NAMES)
    check(list(text), starts_in_think, tool_names=NAMES)
    for _ in range(4):
        check(random_pieces(text, rng), starts_in_think, tool_names=NAMES)
    check(list(text), starts_in_think, parse_reasoning=False, tool_names=NAMES)


def test_a_bare_call_sends_no_content_on_the_way() -> None:
    text = bare("get_weather", {"city": "Paris"})
    parser, deltas = run(list(text), tool_names=NAMES)
    assert all(d.content == "" and not d.tool_calls for d in deltas[:-1])
    assert [(c.name, c.arguments) for c in parser.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_text_that_cannot_be_a_bare_call_goes_out_without_waiting() -> None:
    parser = StreamParser(tool_names=NAMES)
    assert parser.feed("Sure").content == "Sure"
    parser = StreamParser(tool_names=NAMES)
    assert parser.feed('{"name": "nope", "arguments": {}} x').content == '{"name": "nope", "arguments": {}} x'
    parser = StreamParser(tool_names=NAMES)
    assert parser.feed(bare("f", {}) + " then").content == bare("f", {}) + " then"
    # A JSON answer that opens with another key goes out as soon as that key is known.
    parser = StreamParser(tool_names=NAMES)
    assert parser.feed('{"city"').content == '{"city"'
    assert parser.feed(': "Paris"}').content == ': "Paris"}'
    parser = StreamParser(tool_names=NAMES)
    assert parser.feed('{"name"').content == ""  # may still be a call


def test_random_bare_answers_match_the_whole_text_parser() -> None:
    rng = random.Random(99)
    pieces = [bare("f", {}), bare("get_weather", {"c": "x"}), bare("g", {}), '{"name": "f"}', "{}", "[]",
              " ", "\n", "x", hermes("f", {}), "{", '"', "}", "<think>", "</think>", "```json\n", "```", "`",
              '{"city": "Paris"}', '{"name', '{"arguments": {}, "name": "f"}', '{ "c',
              "\n```"]  # fmt: skip
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
        starts_in_think = rng.random() < 0.2
        check(random_pieces(text, rng, longest=rng.choice([1, 3, 9])), starts_in_think, tool_names=NAMES)


@pytest.mark.parametrize(("text", "starts_in_think"), CORPUS[:12])
def test_feeding_the_last_piece_finishes(text: str, starts_in_think: bool) -> None:
    parser, deltas = run(list(text), starts_in_think)
    together = StreamParser(starts_in_think)
    pieces = list(text) or [""]
    joined = [together.feed(p, last=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert "".join(d.content for d in joined) == "".join(d.content for d in deltas)
    assert "".join(d.reasoning for d in joined) == "".join(d.reasoning for d in deltas)
    assert [(c.name, c.arguments) for c in together.tool_calls] == [(c.name, c.arguments) for c in parser.tool_calls]
    assert together.feed("more").empty  # ended
