"""ChatTemplate against transformers' apply_chat_template(tokenize=False): byte-identical prompts."""

from __future__ import annotations

import copy
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from qwen_engine.errors import InputError, ModelLoadError
from qwen_engine.text.template import CHATML_TEMPLATE, ChatTemplate, load_chat_template, validate_messages
from qwen_engine.text.tokenizer import QwenTokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city. Données météo — 天气",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. 北京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
CALC_TOOL = {
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
TOOLS = [WEATHER_TOOL, CALC_TOOL]

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly."}

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Hello!"}],
    "system_user": [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
    "multi_turn": [
        SYSTEM,
        {"role": "user", "content": "Hi, who are you?"},
        {"role": "assistant", "content": "I am an assistant."},
        {"role": "user", "content": "写一首关于秋天的短诗 🍂"},
        {"role": "assistant", "content": "秋风起，\n落叶黄。"},
        {"role": "user", "content": "Now in English,\nplease.\n\n"},
    ],
    "assistant_last": [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "Hi there!"},
    ],
    "thinking_history": [
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": "<think>\n6*7 is 42.\n</think>\n\nIt is 42."},
        {"role": "user", "content": "And 6*8?"},
        {"role": "assistant", "content": "48", "reasoning_content": "6*8 = 48, easy."},
    ],
    "tool_round_trip": [
        SYSTEM,
        {"role": "user", "content": "What's the weather in Paris and in 北京? Also compute 3*7."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "北京", "unit": "celsius"}},
                },
                {"type": "function", "function": {"name": "calculate", "arguments": '{"expression": "3*7"}'}},
            ],
        },
        {"role": "tool", "content": '{"temperature": 18, "condition": "cloudy"}'},
        {"role": "tool", "content": '{"temperature": 25, "condition": "晴"}'},
        {"role": "tool", "content": "21"},
        {"role": "assistant", "content": "Paris: 18 °C, cloudy. 北京: 25 °C, sunny. 3*7 = 21."},
        {"role": "user", "content": "Thanks!"},
    ],
    "tool_call_pending": [
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
            ],
        },
        {"role": "tool", "content": '{"temperature": 30}'},
    ],
    "none_fields": [
        {"role": "system", "content": "Be terse.", "tool_calls": None},
        {"role": "user", "content": "Ping", "name": None},
    ],
}

CASES = [
    (name, tools, agp, thinking)
    for name in CONVERSATIONS
    for tools in (None, TOOLS)
    for agp in (True, False)
    for thinking in (None, True, False)
]


@pytest.fixture(scope="module")
def qwen3_template(qwen3_tokenizer_dir: Path) -> ChatTemplate:
    tok = QwenTokenizer.from_dir(qwen3_tokenizer_dir)
    return ChatTemplate(load_chat_template(qwen3_tokenizer_dir), tok.special_tokens_map())


@pytest.fixture(scope="module")
def gguf_template(gguf_meta: dict) -> ChatTemplate:
    meta = gguf_meta
    tok = QwenTokenizer.from_gguf_metadata(meta)
    return ChatTemplate(meta["tokenizer.chat_template"], tok.special_tokens_map())


def _reference(hf, messages, tools, agp, thinking, **kwargs) -> str:
    extra = {} if thinking is None else {"enable_thinking": thinking}
    return hf.apply_chat_template(
        copy.deepcopy(messages), tools=tools, add_generation_prompt=agp, tokenize=False, **extra, **kwargs
    )


@pytest.mark.parametrize(("name", "tools", "agp", "thinking"), CASES)
def test_qwen3_template_matches_transformers(qwen3_template, hf_qwen3, name, tools, agp, thinking) -> None:
    messages = CONVERSATIONS[name]
    before = copy.deepcopy(messages)
    ours = qwen3_template.render(messages, tools=tools, add_generation_prompt=agp, enable_thinking=thinking)
    assert ours == _reference(hf_qwen3, messages, tools, agp, thinking)
    assert messages == before  # the caller's messages are not modified


@pytest.mark.parametrize(("name", "tools", "agp"), [(n, t, a) for n, t, a, th in CASES if th is None])
def test_gguf_template_matches_transformers(gguf_template, hf_gguf_tokenizer, name, tools, agp) -> None:
    messages = CONVERSATIONS[name]
    ours = gguf_template.render(messages, tools=tools, add_generation_prompt=agp)
    assert ours == _reference(hf_gguf_tokenizer, messages, tools, agp, None)


def test_rendered_prompts_are_what_qwen_expects(qwen3_template, gguf_template) -> None:
    """Spot checks that do not depend on the reference: the parity tests above could agree on garbage."""
    msgs = [{"role": "user", "content": "Hi"}]
    assert qwen3_template.render(msgs) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert qwen3_template.render(msgs, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert qwen3_template.render(msgs, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert gguf_template.render(msgs).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud."
    )
    with_tools = gguf_template.render(msgs, tools=[WEATHER_TOOL])
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False) in with_tools


def test_special_tokens_and_kwargs_reach_the_template(
    qwen3_template, gguf_template, hf_qwen3, hf_gguf_tokenizer
) -> None:
    source = (
        "[{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ custom }}|{{ documents }}"
        "|{{ enable_thinking is defined }}]{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
    )
    msgs = [{"role": "user", "content": "x"}]
    for ours_full, hf in ((qwen3_template, hf_qwen3), (gguf_template, hf_gguf_tokenizer)):
        ours = ChatTemplate(source, ours_full.special_tokens)
        expected = hf.apply_chat_template(msgs, chat_template=source, tokenize=False, custom=[1, "a"])
        assert ours.render(msgs, custom=[1, "a"]) == expected
        # A keyword argument overrides a special token, as in transformers.
        expected = hf.apply_chat_template(msgs, chat_template=source, tokenize=False, eos_token="E")
        assert ours.render(msgs, eos_token="E") == expected
    assert (
        ChatTemplate(source, gguf_template.special_tokens)
        .render(msgs)
        .startswith("[<|endoftext|>|<|im_end|>|<|endoftext|>||")
    )


HELPER_TEMPLATES = [
    "{{ messages | tojson }}",
    "{{ messages[0] | tojson(indent=2) }}",
    "{{ messages[0] | tojson(indent=2, sort_keys=true) }}",
    "{{ messages[0] | tojson(separators=(',', ':')) }}",
    "{{ messages[0] | tojson(ensure_ascii=true) }}",
    "{{ '<b>&</b>' | tojson }}",
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{% if m.role == 'user' %}{% continue %}{% endif %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{{ dict(a=1, b='x') | tojson }}",
    "  {% if true %}\n    indented\n  {% endif %}\n{{ messages | length }}",
    "{{ messages[0].thinking }}|{{ messages[0].reasoning_content }}|{{ messages[1].reasoning_content }}",
    "{{ messages[0].get('missing', 'dflt') }}{{ messages[0]['content'][::-1] }}",
]


@pytest.mark.parametrize("source", HELPER_TEMPLATES)
def test_template_helpers_match_transformers(hf_qwen3, source: str) -> None:
    msgs = [
        {"role": "assistant", "content": "héllo 🌍 <tag>", "reasoning": "because"},
        {"role": "user", "content": 'say "hi"', "reasoning_content": None},
    ]
    expected = hf_qwen3.apply_chat_template(msgs, chat_template=source, tokenize=False)
    assert ChatTemplate(source, {}).render(msgs) == expected


def test_strftime_now() -> None:
    out = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}", {}).render([{"role": "user", "content": ""}])
    assert out == datetime.now().strftime("%Y-%m-%d")


def test_chatml_fallback() -> None:
    t = ChatTemplate(None, {"eos_token": "<|im_end|>"})
    assert t.is_fallback and t.source == CHATML_TEMPLATE
    msgs = [
        {"role": "system", "content": "S"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}],
        },
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42"},
    ]
    expected = (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nab<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n"
    )
    assert t.render(msgs, add_generation_prompt=False) == expected
    assert t.render(msgs) == expected + "<|im_start|>assistant\n"


def test_raise_exception_becomes_input_error(hf_qwen3) -> None:
    source = (
        "{% if messages[0].role != 'system' %}{{ raise_exception('System first, please.') }}{% endif %}ok"
    )
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(InputError, match=r"^System first, please\.$"):
        ChatTemplate(source, {}).render(msgs)
    # transformers raises the same message (as a jinja TemplateError).
    with pytest.raises(Exception, match=r"^System first, please\.$"):
        hf_qwen3.apply_chat_template(msgs, chat_template=source, tokenize=False)
    ok = [{"role": "system", "content": "s"}]
    assert ChatTemplate(source, {}).render(ok) == hf_qwen3.apply_chat_template(
        ok, chat_template=source, tokenize=False
    )


def test_template_errors_are_clean(qwen3_template, hf_qwen3) -> None:
    with pytest.raises(ModelLoadError, match="syntax error at line 2"):
        ChatTemplate("ok\n{% if %}", {})
    with pytest.raises(ModelLoadError, match="syntax error"):
        ChatTemplate("{% for x in y %}", {})
    with pytest.raises(InputError, match="UndefinedError"):
        ChatTemplate("{{ nothing.here.at_all }}", {}).render([{"role": "user", "content": "x"}])
    with pytest.raises(InputError, match="TypeError"):
        ChatTemplate("{{ messages[0].content + 1 }}", {}).render([{"role": "user", "content": "x"}])
    with pytest.raises(InputError, match="SecurityError"):
        ChatTemplate("{{ messages.append(1) }}", {}).render([{"role": "user", "content": "x"}])
    with pytest.raises(InputError, match="SecurityError"):
        ChatTemplate("{% set ns = namespace(_x=1) %}", {}).render([{"role": "user", "content": "x"}])
    # Qwen3's template needs a string content on assistant turns; transformers fails too.
    bad = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": []}]
    with pytest.raises(Exception):  # noqa: B017 (the reference raises a bare jinja error)
        hf_qwen3.apply_chat_template(copy.deepcopy(bad), tokenize=False)
    with pytest.raises(InputError, match="could not render"):
        qwen3_template.render(bad)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "must not be empty"),
        ("hello", "must be a list"),
        (None, "must be a list"),
        ([{"role": "user", "content": "x"}, "oops"], r"messages\[1\] must be an object"),
        ([{"content": "x"}], "has no 'role'"),
        ([{"role": None, "content": "x"}], "has no 'role'"),
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([{"role": "user", "content": 5}], "content must be a string, null or a list"),
        ([{"role": "user", "content": {"text": "x"}}], "content must be a string, null or a list"),
        ([{"role": "user", "content": ["x"]}], r"content\[0\] must be an object"),
    ],
)
def test_validate_messages(messages, message: str) -> None:
    with pytest.raises(InputError, match=message):
        validate_messages(messages)
    with pytest.raises(InputError, match=message):
        ChatTemplate(None, {}).render(messages)


def test_validate_messages_accepts_good_input() -> None:
    validate_messages(
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "t"}]},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "tool", "content": "r"},
        ]
    )


def test_bad_tools_rejected() -> None:
    with pytest.raises(InputError, match="tools"):
        ChatTemplate(None, {}).render([{"role": "user", "content": "x"}], tools=["not a dict"])


def test_load_chat_template_sources(tmp_path: Path) -> None:
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from-config"}))
    assert load_chat_template(tmp_path) == "from-config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from-json"}))
    assert load_chat_template(tmp_path) == "from-json"
    (tmp_path / "chat_template.jinja").write_text("from-jinja", encoding="utf-8")
    assert load_chat_template(tmp_path) == "from-jinja"
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("tools-jinja")
    assert load_chat_template(tmp_path) == {"default": "from-jinja", "tool_use": "tools-jinja"}
    (tmp_path / "chat_template.json").write_text("{broken")
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(ModelLoadError, match="chat_template.json"):
        load_chat_template(tmp_path)


def test_named_templates_match_transformers(tmp_path: Path, qwen3_tokenizer_dir: Path, hf_qwen3) -> None:
    """tokenizer_config.json with a list of named templates: "tool_use" when tools are given, else "default"."""
    from transformers import AutoTokenizer

    config = json.loads((qwen3_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = [
        {"name": "default", "template": "D:{% for m in messages %}{{ m.content }}{% endfor %}{{ tools }}"},
        {"name": "tool_use", "template": "T:{{ tools | length }}:{{ tools[0].function.name }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    shutil.copy(qwen3_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    hf = AutoTokenizer.from_pretrained(tmp_path)
    loaded = load_chat_template(tmp_path)
    assert isinstance(loaded, dict) and set(loaded) == {"default", "tool_use"}
    t = ChatTemplate(loaded, QwenTokenizer.from_dir(tmp_path).special_tokens_map())
    msgs = [{"role": "user", "content": "hi"}]
    for tools in (None, TOOLS):
        expected = hf.apply_chat_template(msgs, tools=tools, tokenize=False)
        assert t.render(msgs, tools=tools, add_generation_prompt=False) == expected
    assert t.render(msgs, tools=TOOLS) == "T:2:get_weather"


def test_named_templates_without_default() -> None:
    assert ChatTemplate({"only": "O"}, {}).render([{"role": "user", "content": ""}]) == "O"
    with pytest.raises(ModelLoadError, match="none is 'default'"):
        ChatTemplate({"a": "A", "b": "B"}, {})
