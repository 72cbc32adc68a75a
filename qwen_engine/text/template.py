"""Chat templates: a model's own Jinja template rendered the way transformers' `apply_chat_template` does.

The template is untrusted code from a model repository, so it runs in Jinja's immutable sandbox and only sees
copies of the caller's data made of plain JSON types.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InputError, ModelLoadError, QwenEngineError

ROLES = ("system", "user", "assistant", "tool")

# Used when a model ships no template: plain ChatML, which every Qwen instruct model speaks.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- elif message['content'] is iterable %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Names a message's reasoning may come under; templates read `reasoning_content` (Qwen) or `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def validate_messages(messages: Any) -> None:
    """Raise InputError unless `messages` is a non-empty list of chat messages with known roles."""
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"messages must be a list of message objects, got {type(messages).__name__}")
    if not messages:
        raise InputError("messages must not be empty")
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(
                f"messages[{n}] must be an object with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role is None:
            raise InputError(f"messages[{n}] has no 'role'")
        if role not in ROLES:
            raise InputError(f"messages[{n}] has unknown role {role!r}; allowed: {', '.join(ROLES)}")
        content = message.get("content")
        if content is None and role != "assistant":  # only a reply that is all tool calls may have none
            raise InputError(f"messages[{n}] ({role}) has no content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise InputError(
                f"messages[{n}].content must be a string, null or a list of parts, got {type(content).__name__}"
            )
        for k, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise InputError(f"messages[{n}].content[{k}] must be an object, got {type(part).__name__}")


def _plain(value: Any) -> Any:
    """A deep copy made only of JSON-like types. The sandbox cannot vet methods of arbitrary objects, and a
    copy keeps the template from touching the caller's data."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)  # drop subclass methods (enums and the like)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _plain(value.item())
        except (TypeError, ValueError):
            pass
    # Templates only test media fields for presence, so an inert stand-in renders the same.
    return f"<{type(value).__name__}>"


def _prepare_message(message: Mapping[str, Any]) -> dict[str, Any]:
    # Like transformers: drop keys set to None (OpenAI clients send content=None, tool_calls=None), which
    # templates handle as missing but would print as "None".
    out = {k: _plain(v) for k, v in message.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_FIELDS if out.get(k) is not None), None)
    if reasoning is not None:
        # Same key order as transformers, so a template dumping the message with tojson matches too.
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for training masks; rendering ignores it.

    The body runs as a call block, so it scopes variables the same way transformers' tracker does.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (mirrors jinja's signature so `self=` works)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace cannot hold the attribute {name!r}")


def _raise_exception(message: str) -> None:
    # The template's own message reaches the user unchanged (e.g. "System message must be at the beginning.").
    raise InputError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes and sorts keys; chat templates need plain json.dumps output.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _dict
    return env


class ChatTemplate:
    """A model's chat template, rendered like transformers' `apply_chat_template(tokenize=False)`.

    `source` is the template text, a dict of named templates (picks "tool_use" when tools are given, else
    "default"), or None for plain ChatML. `special_tokens` is `QwenTokenizer.special_tokens_map()`.
    """

    def __init__(
        self,
        source: str | Mapping[str, str] | None,
        special_tokens: Mapping[str, str | None] | None = None,
    ):
        self.is_fallback = source is None
        if source is None:
            sources = {"default": CHATML_TEMPLATE}
        elif isinstance(source, str):
            sources = {"default": source}
        elif isinstance(source, Mapping) and source and all(isinstance(v, str) for v in source.values()):
            sources = dict(source)
            if "default" not in sources:
                if len(sources) > 1:
                    raise ModelLoadError(
                        f"the model has several chat templates ({', '.join(sorted(sources))}) and none is 'default'"
                    )
                sources["default"] = next(iter(sources.values()))
        else:
            raise ModelLoadError(
                f"chat template must be a string or named strings, got {type(source).__name__}"
            )
        # transformers passes only the special tokens that are set; an unset one stays undefined (renders "").
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.sources = sources
        env = _environment()
        self._compiled = {name: self._compile(env, name, text) for name, text in sources.items()}

    @property
    def source(self) -> str:
        """The default template's text."""
        return self.sources["default"]

    @staticmethod
    def _compile(env: ImmutableSandboxedEnvironment, name: str, text: str) -> jinja2.Template:
        try:
            return env.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            label = "chat template" if name == "default" else f"chat template {name!r}"
            raise ModelLoadError(
                f"the model's {label} has a syntax error at line {e.lineno}: {e.message}"
            ) from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (and `tools`), ready to encode."""
        validate_messages(messages)
        if tools is not None:
            if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
                raise InputError("tools must be a list of JSON-schema objects")
            tools = [_plain(t) for t in tools]
        template = self._compiled[
            "tool_use" if tools is not None and "tool_use" in self._compiled else "default"
        ]

        extra = dict(kwargs)
        if enable_thinking is not None:
            extra["enable_thinking"] = enable_thinking
        extra.setdefault("documents", None)
        # Explicit keyword arguments win over the special tokens, as in transformers.
        variables = {**self.special_tokens, **_plain(extra)}
        chat = [_prepare_message(m) for m in messages]
        try:
            return template.render(
                messages=chat, tools=tools, add_generation_prompt=add_generation_prompt, **variables
            )
        except QwenEngineError:
            raise  # raise_exception() from the template
        except jinja2.TemplateError as e:
            raise InputError(
                f"the chat template could not render these messages: {type(e).__name__}: {e}"
            ) from None
        except (
            TypeError,
            ValueError,
            KeyError,
            IndexError,
            AttributeError,
            ArithmeticError,
            RecursionError,
        ) as e:
            raise InputError(
                f"the chat template could not render these messages: {type(e).__name__}: {e}"
            ) from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read the chat template ({e})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


def _templates_from_value(value: Any, where: Path) -> str | dict[str, str] | None:
    """A `chat_template` entry: a string, or a list of {"name", "template"} objects."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for entry in value:
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ModelLoadError(
                    f"{where}: chat_template list entries need 'name' and 'template' strings"
                )
            named[entry["name"]] = entry["template"]
        return named or None
    raise ModelLoadError(f"{where}: chat_template must be a string or a list, got {type(value).__name__}")


def load_chat_template(model_dir: str | Path) -> str | dict[str, str] | None:
    """The chat template of a Hugging Face model folder, in transformers' order of precedence:
    chat_template.jinja (plus additional_chat_templates/*.jinja), chat_template.json, tokenizer_config.json.

    Returns the template text, a dict of named templates when the model has several, or None.
    """
    folder = Path(model_dir)
    jinja_file = folder / "chat_template.jinja"
    extra_dir = folder / "additional_chat_templates"
    extra = {p.stem: _read_text(p) for p in sorted(extra_dir.glob("*.jinja"))} if extra_dir.is_dir() else {}
    if jinja_file.is_file():
        default = _read_text(jinja_file)
        return {"default": default, **extra} if extra else default

    json_file = folder / "chat_template.json"
    if json_file.is_file():
        data = _read_json(json_file)
        if not isinstance(data, Mapping):
            raise ModelLoadError(f"{json_file}: expected an object with a 'chat_template' entry")
        found = _templates_from_value(data.get("chat_template"), json_file)
        if found is not None:
            return found

    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        data = _read_json(config_file)
        if isinstance(data, Mapping):
            return _templates_from_value(data.get("chat_template"), config_file)
    return None
