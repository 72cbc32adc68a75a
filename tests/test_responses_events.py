"""The Responses API's streamed events for answers with reasoning, text and calls, from a scripted stream: they
must add up to the output items the non-streamed response holds for the same text."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from qwen_engine.server.async_engine import Update
from qwen_engine.server.responses import ResponsesRequest, _events, _items, _Shell, _split


class _Anything:
    """Stands in for the metrics: every attribute and call is itself."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


class _Stream:
    def __init__(self, pieces: list[str], finish: str):
        self.created = 0.0
        self.done = False
        self.updates = [Update(p, [1]) for p in pieces[:-1]]
        self.updates.append(Update(pieces[-1], [1], finish_reason=finish, prompt_tokens=7,
                                   completion_tokens=len(pieces)))

    async def __aiter__(self):
        for update in self.updates:
            yield update


def run_events(pieces: list[str], chat, finish: str = "stop") -> list[dict]:
    shell = _Shell(ResponsesRequest(model="m", input="x"), "resp_1", 0, "m")
    engine = SimpleNamespace(abort=lambda s: None, finished=lambda s: None)

    async def collect():
        return [e async for e in _events(_Stream(pieces, finish), shell, chat, engine, _Anything())]

    raw = asyncio.run(collect())
    return [json.loads(block.split("data: ", 1)[1]) for block in raw]


CHAT = SimpleNamespace(starts_in_think=False, parse_tools=True, tool_names=frozenset({"f"}))
CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


@pytest.mark.parametrize(
    "text",
    ["<think>Plan it.</think>\n\nHello there.", "Hello there.", CALL, "<think>Need f.</think>\n" + CALL,
     "Calling.\n" + CALL + "\n" + CALL, '```json\n{"name": "f", "arguments": {}}\n```', "", "<think>only"],
)
def test_streamed_items_equal_the_whole_answer(text):
    for size in (1, 3, len(text) or 1):
        pieces = [text[i : i + size] for i in range(0, len(text), size)] or [""]
        events = run_events(pieces, CHAT)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
        final = events[-1]["response"]["output"]
        expected = _items(*_split(text, CHAT))
        strip = lambda items: [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in items]  # noqa: E731
        assert strip(final) == strip(expected), (text, size)
        # Every item was announced, then finished, in order; deltas add up to the items' text.
        assert [e["item"]["type"] for e in events if e["type"] == "response.output_item.done"] == \
            [i["type"] for i in final]
        for index, item in enumerate(final):
            deltas = "".join(e["delta"] for e in events if e.get("output_index") == index and "delta" in e)
            whole = {"message": lambda i: i["content"][0]["text"], "function_call": lambda i: i["arguments"],
                     "reasoning": lambda i: i["content"][0]["text"]}[item["type"]](item)
            assert deltas == whole


def test_cut_short_is_incomplete():
    events = run_events(["Hel", "lo"], CHAT, finish="length")
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_response_store_drops_the_least_recently_used():
    from qwen_engine.server.responses import ResponseStore

    store = ResponseStore(capacity=2)
    for name in ("a", "b"):
        store.put(name, [{"role": "user", "content": name}], {"id": name})
    assert store.get("a") is not None  # now the most recent
    store.put("c", [], {"id": "c"})
    assert store.get("b") is None and store.get("a").response == {"id": "a"} and store.get("c") is not None
    assert store.delete("a") and not store.delete("a")
    off = ResponseStore(capacity=0)
    off.put("x", [], {})
    assert off.get("x") is None


def test_input_items_are_listed_with_ids():
    from qwen_engine.server.responses import _input_items

    body = ResponsesRequest(model="m", input=[{"role": "user", "content": "Hi"},
                                              {"type": "function_call_output", "call_id": "c1", "output": "{}"}])
    items = _input_items(body)
    assert [i["type"] for i in items] == ["message", "function_call_output"]
    assert items[0]["id"].startswith("msg_") and items[1]["id"].startswith("fco_")
    (only,) = _input_items(ResponsesRequest(model="m", input="Hello"))
    assert only["content"] == [{"type": "input_text", "text": "Hello"}] and only["role"] == "user"
