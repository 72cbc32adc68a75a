"""Structured output: grammars that constrain sampling, for OpenAI's `response_format` and forced tool calls.

    factory = GuideFactory(llm.tokenizer, llm.config.vocab_size, llm.eos_token_ids)   # one per model
    guide = factory.for_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": ...}})
    seq = llm.engine.add_request(prompt_ids, params, guide=guide)    # every step: mask_logits, then accept

The grammar library is llguidance. It installs as one self-contained wheel with no torch dependency (xgrammar
pulls in triton and a TVM runtime; outlines-core compiles each schema into a full index over the vocabulary
up front), and it works out each step's mask lazily from a token trie, in well under a millisecond for
Qwen's 151k vocabulary. It covers JSON Schema ($ref, anyOf, enum, pattern, format, numeric bounds, minItems)
plus Lark grammars that can name special tokens such as `<tool_call>`, and it takes the vocabulary as raw
token bytes, so it is built offline from our own tokenizer.

JSON is generated compact, with ", " and ": " separators (the Hermes tool-call form): free whitespace lets
small models pad forever instead of closing the object. The schema is always enforced, whatever `strict`
says. Once the grammar is complete only the end-of-turn tokens are allowed, so a guided request ends with
finish_reason "stop".
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import llguidance
import numpy as np
import torch

from ..errors import InputError
from ..text.parsers import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from ..text.tokenizer import QwenTokenizer

log = logging.getLogger(__name__)

# llguidance's JSON options: compact JSON with the separators Python's json.dumps and Qwen's templates use.
JSON_FORMAT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Compiled grammars kept per factory (a new schema costs about a millisecond to compile, a big one more).
GRAMMAR_CACHE_SIZE = 128

# byte value -> the additive bias of its 8 mask bits (bit i, least significant first, is token 8k+i):
# 0 where allowed, -inf where banned. Looking bytes up in it turns a bitmask into a bias with no branches.
_BIAS_OF_BYTE = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(bool),
    np.float32(0.0),
    np.float32(-np.inf),
).astype(np.float32)


class _Vocab:
    """The library's view of one model's vocabulary, plus which token ids may ever be produced."""

    def __init__(self, tokenizer: QwenTokenizer, vocab_size: int, eos_token_ids: list[int]):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        token_bytes = _token_bytes(tokenizer, vocab_size)
        wrapper = llguidance.TokenizerWrapper(_ByteVocabulary(tokenizer, token_bytes, self.eos_token_ids))
        self.llg = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=self.eos_token_ids)
        self.n_words = (vocab_size + 31) // 32
        producible = [i for i, raw in enumerate(token_bytes) if raw]
        self.allowed = _bits_of(producible + self.eos_token_ids, self.n_words)
        self.eos_only = _bits_of(self.eos_token_ids, self.n_words)


class _ByteVocabulary:
    """What llguidance.TokenizerWrapper reads: every id's bytes, the special ids, and an encode function."""

    def __init__(self, tokenizer: QwenTokenizer, token_bytes: list[bytes], eos_token_ids: list[int]):
        self._tokenizer = tokenizer
        self.tokens = token_bytes
        self.eos_token_id = eos_token_ids[0]
        self.bos_token_id = None
        # Added tokens (<|im_end|>, <tool_call>, <think>, ...) only appear where a grammar names them, never
        # inside free text such as a JSON string.
        added = tokenizer.backend.get_added_tokens_decoder()
        self.special_token_ids = sorted(i for i in added if i < len(token_bytes))

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


def _token_bytes(tokenizer: QwenTokenizer, vocab_size: int) -> list[bytes]:
    """Each model row's bytes; b"" (never produced) for rows past the tokenizer's end and for llama.cpp's
    "[PAD<id>]" filler tokens, which stand for text the model was never trained to write."""
    known = tokenizer.all_token_bytes()
    table = []
    for i in range(vocab_size):
        raw = known[i] if i < len(known) else b""
        table.append(b"" if raw == b"[PAD%d]" % i else raw)
    return table


def _bits_of(ids: Iterable[int], n_words: int) -> np.ndarray:
    flags = np.zeros(n_words * 32, dtype=bool)
    flags[list(ids)] = True
    return np.packbits(flags, bitorder="little").view(np.int32).copy()


class Guide:
    """One request's place in its grammar: bans the tokens that cannot come next, follows the sampled ones."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: _Vocab):
        self._matcher = matcher
        self._vocab = vocab
        self._words = np.zeros(vocab.n_words, dtype=np.int32)
        self._bias = np.empty((vocab.n_words * 4, 8), dtype=np.float32)
        self._broken = False  # set when a token the grammar refused got through; from then on only EOS

    @property
    def is_complete(self) -> bool:
        """The grammar is satisfied and nothing may follow but an end-of-turn token."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def error(self) -> str | None:
        if not self._matcher.is_error():
            return None
        return self._matcher.get_error() or "error"

    def allowed_mask(self) -> np.ndarray:
        """The next token's bitmask as int32 words (bit i of word k is token 32k+i)."""
        if not (self._broken or self._matcher.is_error()):
            self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            np.bitwise_and(self._words, self._vocab.allowed, out=self._words)
            if self._words.any() and not self._matcher.is_error():
                return self._words
        # A matcher in an error state offers nothing: ending the turn is the only way out.
        np.copyto(self._words, self._vocab.eos_only)
        return self._words

    def allowed_token_ids(self) -> list[int]:
        bits = self.allowed_mask().view(np.uint8)
        return np.flatnonzero(np.unpackbits(bits, bitorder="little", count=self._vocab.vocab_size)).tolist()

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 [vocab] logits with every token the grammar forbids set to -inf (in place when on CPU)."""
        words = self.allowed_mask()
        # A lookup and an add: masked_fill over 151k entries costs several times more on a busy CPU.
        np.take(_BIAS_OF_BYTE, words.view(np.uint8), axis=0, out=self._bias)
        n = min(logits.shape[-1], self._vocab.vocab_size)
        bias = self._bias.reshape(-1)[:n]
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
            view = logits.numpy()
            np.add(view[:n], bias, out=view[:n])
        else:
            logits = logits.clone()
            logits[:n] += torch.from_numpy(bias).to(logits.device, logits.dtype)
        if logits.shape[-1] > n:  # rows past the declared vocabulary are never allowed
            logits[n:] = float("-inf")
        return logits

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token."""
        if self._broken:
            return
        if token_id in self._vocab.eos_token_ids and self._matcher.is_accepting():
            return  # the turn ends here; nothing more to follow
        if not self._matcher.consume_token(token_id):
            # Only a bug (or logits that were -inf everywhere allowed) gets here; ending the turn beats
            # raising inside the engine's step, which would fail every request in the batch.
            log.warning("guided decoding: token %d refused (%s); forcing end of turn", token_id,
                        self._matcher.get_error())
            self._broken = True


class GuideFactory:
    """Builds guides for one loaded model; keeps the library's vocabulary and compiled grammars.

    The vocabulary (~1.5 s to build) is made on first use, or ahead of time with `prepare()`.
    Thread-safe: the server builds guides in its request handlers while the engine thread runs them.
    """

    def __init__(self, tokenizer: QwenTokenizer, vocab_size: int, eos_token_ids: list[int]):
        if not eos_token_ids:
            raise InputError("guided decoding needs at least one end-of-turn token id")
        self.tokenizer = tokenizer
        # The model may have more embedding rows than the tokenizer has tokens; masks span the larger.
        self.vocab_size = max(int(vocab_size), tokenizer.vocab_size)
        self.eos_token_ids = list(dict.fromkeys(int(i) for i in eos_token_ids))
        self._vocab: _Vocab | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Build the library's vocabulary now rather than on the first guided request."""
        self._get_vocab()

    # -- what callers ask for --------------------------------------------------------------------------------

    def for_response_format(self, response_format: dict) -> Guide | None:
        """A guide for an OpenAI `response_format`: None for "text", any JSON object for "json_object", the
        given schema for "json_schema". Raises InputError for a malformed format or an unusable schema."""
        if not isinstance(response_format, dict):
            raise InputError("response_format must be an object such as {\"type\": \"json_object\"}")
        kind = response_format.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return self._json_guide({"type": "object"}, "response_format")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict):
                raise InputError("response_format of type json_schema needs a json_schema object")
            schema = spec.get("schema", {"type": "object"})  # OpenAI allows leaving the schema out
            return self._json_guide(schema, "response_format.json_schema.schema")
        raise InputError(
            f"response_format type {kind!r} is not supported (use 'text', 'json_object' or 'json_schema')"
        )

    def for_structured_output(self, spec: dict) -> Guide:
        """A guide for exactly one of vLLM's structured outputs: {"choice": [strings]} (the answer is one of
        them), {"regex": pattern}, {"json": schema} or {"grammar": a Lark grammar}."""
        if not isinstance(spec, dict) or len([k for k, v in spec.items() if v is not None]) != 1:
            raise InputError("structured output takes exactly one of choice, regex, json and grammar",
                             "structured_outputs")
        kind, value = next((k, v) for k, v in spec.items() if v is not None)
        if kind == "json":
            return self._json_guide(value, "structured_outputs.json")
        if kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise InputError("choice must be a non-empty list of non-empty strings", "structured_outputs")
            grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(map(_lark_string, value)))
        elif kind == "regex" and isinstance(value, str) and value:
            grammar = llguidance.LLMatcher.grammar_from_regex(value)
        elif kind == "grammar" and isinstance(value, str) and value.strip():
            grammar = llguidance.LLMatcher.grammar_from_lark(value)
        elif kind in ("regex", "grammar"):
            raise InputError(f"{kind} must be a non-empty string", "structured_outputs")
        else:
            raise InputError(f"unknown structured output {kind!r} (use choice, regex, json or grammar)",
                             "structured_outputs")
        return self._guide(grammar, f"the {kind} cannot be used")

    def for_tool_call(self, tools: list[dict], name: str | None) -> Guide:
        """A guide forcing one Hermes-style call (Qwen2.5/Qwen3) and then the end of the turn:

            <tool_call>
            {"name": "<tool name>", "arguments": <object matching that tool's parameters>}
            </tool_call>

        to any of `tools` (OpenAI's tool_choice "required") or to the one called `name` (a named choice)."""
        functions = _functions(tools)
        if name is not None:
            if name not in functions:
                raise InputError(f"tool_choice names {name!r}, which is not among the tools")
            functions = {name: functions[name]}
        lines = [f"start: {self._token_or_text(TOOL_CALL_OPEN)} \"\\n\" call \"\\n\" "
                 f"{self._token_or_text(TOOL_CALL_CLOSE)}",
                 "call: " + " | ".join(f"call_{n}" for n in range(len(functions)))]
        for n, (fname, parameters) in enumerate(functions.items()):
            head = '{"name": ' + json.dumps(fname, ensure_ascii=False) + ', "arguments": '
            # Each tool's arguments get their own %json block, so its $refs still resolve from its own root.
            schema = dict(parameters, **{"x-guidance": JSON_FORMAT})
            lines.append(f"call_{n}: {_lark_string(head)} args_{n} \"}}\"")
            lines.append(f"args_{n}: %json {json.dumps(schema, ensure_ascii=False)}")
        grammar = llguidance.LLMatcher.grammar_from_lark("\n".join(lines) + "\n")
        return self._guide(grammar, "the tools' parameters are not a usable JSON Schema")

    # -- grammars --------------------------------------------------------------------------------------------

    def _json_guide(self, schema: Any, where: str) -> Guide:
        if not isinstance(schema, dict):
            raise InputError(f"{where} must be a JSON Schema object, got {type(schema).__name__}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema, ensure_ascii=False, allow_nan=False), overrides=JSON_FORMAT
            )
        except (TypeError, ValueError) as e:
            raise InputError(f"{where} is not a usable JSON Schema: {e}") from None
        return self._guide(grammar, f"{where} is not a usable JSON Schema")

    def _guide(self, grammar: str, problem: str) -> Guide:
        vocab = self._get_vocab()
        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
        if template is None:
            template = llguidance.LLMatcher(vocab.llg, grammar, log_level=0)
            if template.is_error():
                raise InputError(f"{problem}: {template.get_error().strip().splitlines()[0]}")
            with self._lock:
                self._compiled[grammar] = template
                while len(self._compiled) > GRAMMAR_CACHE_SIZE:
                    self._compiled.popitem(last=False)
        # The cached matcher never advances; each request walks its own copy (cheap: the grammar is shared).
        return Guide(template.deep_copy(), vocab)

    def _get_vocab(self) -> _Vocab:
        with self._lock:
            if self._vocab is None:
                self._vocab = _Vocab(self.tokenizer, self.vocab_size, self.eos_token_ids)
            return self._vocab

    def _token_or_text(self, token: str) -> str:
        """Lark for `token`: the single added token when the vocabulary has it, else its text."""
        token_id = self.tokenizer.token_to_id(token)
        if token_id is not None and token_id < self.vocab_size:
            return f"<[{token_id}]>"
        return _lark_string(token)


def _lark_string(text: str) -> str:
    # Lark string literals take JSON's escapes.
    return json.dumps(text, ensure_ascii=False)


def _functions(tools: Any) -> dict[str, dict]:
    """name -> parameters schema (an object schema) of OpenAI-style tools, validated."""
    if not isinstance(tools, list) or not tools:
        raise InputError("a forced tool call needs a non-empty list of tools")
    functions: dict[str, dict] = {}
    for n, tool in enumerate(tools):
        # {"type": "function", "function": {...}} as OpenAI sends it, or the bare function.
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise InputError(f"tools[{n}] has no function name")
        parameters = fn.get("parameters")
        if parameters is None:  # OpenAI: no parameters means a function that takes none
            parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(parameters, dict):
            raise InputError(f"tools[{n}] ({name}): parameters must be a JSON Schema object")
        if parameters.get("type", "object") != "object":
            raise InputError(
                f"tools[{n}] ({name}): parameters must describe an object, not {parameters['type']!r}"
            )
        functions.setdefault(name, dict(parameters, type="object"))
    return functions
