"""Qwen's byte-level BPE tokenizer, built on the `tokenizers` library from a Hugging Face folder or a GGUF file.

Both sources end in the same pipeline Qwen trained with: NFC normalisation, a regex split, byte-level
encoding and BPE merges. Special-token strings written in the text are matched whole, and no BOS is ever
added (Qwen's templates write every control token themselves).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import ModelLoadError

# Qwen2's pre-tokenise split (also used by Qwen2.5 and Qwen3): one digit per piece, letters with one leading
# non-letter, punctuation runs with trailing newlines, and whitespace runs that leave the last space to the
# following word.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5 keeps combining marks with the letters they modify.
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's `tokenizer.ggml.pre` names that mean one of Qwen's splits.
_GGUF_PRE_SPLITS = {"qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT, "qwen35": QWEN35_SPLIT}

# GGUF token types (llama.cpp's enum).
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's table giving each byte a printable character, so byte-level tokens are plain strings.

    Printable Latin-1 bytes stand for themselves; the other 68 are moved to code points 256 and up, in order.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def _qwen_pre_tokenizer(split: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _build(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    added: Iterable[AddedToken],
    split: str = QWEN2_SPLIT,
) -> Tokenizer:
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    # Qwen's own tokenizer applies NFC; see `from_gguf_metadata` for why GGUF files get it too.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _qwen_pre_tokenizer(split)
    tok.decoder = decoders.ByteLevel()
    # One call per token keeps ids in order when a token is not in the BPE vocabulary yet; special ones go
    # through add_special_tokens so decode(skip_special_tokens=True) knows to drop them.
    for token in added:
        if token.special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    return tok


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path, folder: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{folder}: cannot read {path.name} ({type(e).__name__}: {e})") from None


class QwenTokenizer:
    """Text ↔ token ids for Qwen models, id-identical to transformers' tokenizer for the same files."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: Mapping[str, str | None]):
        self._tok = tokenizer
        self._special = {name: special_tokens.get(name) for name in _SPECIAL_NAMES}
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._max_id: int | None = None  # max_id(), when first needed (get_vocab over Qwen's 151k tokens: ~0.1 s)
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = {i for i, t in added.items() if t.special}
        self._added = {i: t.content for i, t in added.items()}
        self._byte_decoder = unicode_to_byte()
        self._to_latin1 = {ord(c): b for c, b in self._byte_decoder.items()}
        # Bytes of the tokens seen so far; the whole table (151k tokens, ~0.15 s to build) only when asked for,
        # so the first generated token does not wait for it.
        self._seen_bytes: dict[int, bytes] = {}
        self._token_bytes: list[bytes] | None = None

    # ---- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> QwenTokenizer:
        """From a Hugging Face model folder: tokenizer.json, or vocab.json + merges.txt, and tokenizer_config.json."""
        folder = Path(path)
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: not a folder, cannot load a tokenizer from it")
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path, folder) if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise ModelLoadError(f"{folder}: tokenizer_config.json is not a JSON object")

        tokenizer_json = folder / "tokenizer.json"
        if tokenizer_json.is_file():
            try:
                tok = Tokenizer.from_file(str(tokenizer_json))
            except Exception as e:  # the library raises its own exception type for bad files
                raise ModelLoadError(f"{folder}: cannot read tokenizer.json ({e})") from None
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = cls._from_vocab_merges(folder, config)
        else:
            raise ModelLoadError(
                f"{folder}: no tokenizer found (need tokenizer.json, or vocab.json and merges.txt)"
            )

        # Qwen2Tokenizer's defaults when the config names no tokens.
        special: dict[str, str | None] = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        for name in _SPECIAL_NAMES:
            if name in config:
                special[name] = _token_content(config[name])
        return cls(tok, special)

    @staticmethod
    def _from_vocab_merges(folder: Path, config: dict) -> Tokenizer:
        vocab = _read_json(folder / "vocab.json", folder)
        if not isinstance(vocab, dict):
            raise ModelLoadError(f"{folder}: vocab.json is not a JSON object")
        try:
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{folder}: cannot read merges.txt ({e})") from None
        merges = []
        for n, line in enumerate(lines):
            if (n == 0 and line.startswith("#version")) or not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ModelLoadError(f"{folder}: merges.txt line {n + 1} is not a pair: {line!r}")
            merges.append((parts[0], parts[1]))

        decoder = config.get("added_tokens_decoder") or {}
        added = []
        vocab = dict(vocab)
        try:
            entries = sorted(((int(i), spec) for i, spec in decoder.items()), key=lambda e: e[0])
        except (AttributeError, ValueError):
            raise ModelLoadError(
                f"{folder}: tokenizer_config.json has a malformed added_tokens_decoder"
            ) from None
        for token_id, spec in entries:
            content = _token_content(spec)
            if content is None or not isinstance(spec, Mapping):
                raise ModelLoadError(f"{folder}: added token {token_id} has no content")
            special = bool(spec.get("special", False))
            # Pinning the id in the vocabulary makes add_tokens keep it, even if ids have gaps.
            vocab.setdefault(content, token_id)
            added.append(
                AddedToken(
                    content,
                    single_word=bool(spec.get("single_word", False)),
                    lstrip=bool(spec.get("lstrip", False)),
                    rstrip=bool(spec.get("rstrip", False)),
                    normalized=bool(spec.get("normalized", not special)),
                    special=special,
                )
            )
        return _build(vocab, merges, added)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> QwenTokenizer:
        """From a GGUF file's metadata (`GGUFFile(path).metadata`).

        The file carries no normaliser. We apply NFC anyway, as Qwen's own tokenizer.json does, so a GGUF
        tokenizes exactly like the tokenizer the model was trained with. transformers' GGUF loader leaves
        NFC out, so it differs from both on text that is not already NFC (e.g. a decomposed "é").
        """
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelLoadError(
                f"GGUF tokenizer model is {model!r}; only Qwen's byte-level BPE ('gpt2') is supported"
            )
        pre = meta.get("tokenizer.ggml.pre")
        split = _GGUF_PRE_SPLITS.get(pre) if isinstance(pre, str) else None
        if split is None:
            raise ModelLoadError(
                f"GGUF pre-tokenizer is {pre!r}; supported: {', '.join(sorted(_GGUF_PRE_SPLITS))}"
            )
        tokens = meta.get("tokenizer.ggml.tokens")
        raw_merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(tokens, list) or not tokens:
            raise ModelLoadError("GGUF file has no tokenizer.ggml.tokens")
        if not isinstance(raw_merges, list):
            raise ModelLoadError("GGUF file has no tokenizer.ggml.merges")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)  # no types: all normal
        if len(types) != len(tokens):
            raise ModelLoadError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")

        # Byte-level vocabularies spell every token in GPT-2's byte alphabet; a token written otherwise is
        # respelled byte by byte so it stays reachable (transformers does the same).
        # (Whole-list operations: a set per token and a loop per merge were a fifth of a GGUF load's time.)
        spelling = byte_to_unicode()
        alphabet = set(spelling.values())
        spelled = tokens
        if not set("".join(tokens)) <= alphabet:
            spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
        # a token written twice keeps its first id
        vocab = dict(zip(reversed(spelled), range(len(spelled) - 1, -1, -1), strict=True))
        merges = [tuple(merge.split(" ")) for merge in raw_merges]
        bad = next((m for m, pair in zip(raw_merges, merges, strict=True) if len(pair) != 2), None)
        if bad is not None:
            raise ModelLoadError(f"GGUF merge {bad!r} is not a pair")

        added = []
        for token, token_type in zip(tokens, types, strict=True):
            # A "control" token outside the byte alphabet is a llama.cpp mislabel; adding it would grow the
            # vocabulary past what the model expects.
            if token_type == _GGUF_CONTROL and set(token) <= alphabet:
                added.append(AddedToken(token, normalized=False, special=True))
            elif token_type == _GGUF_USER_DEFINED and token in vocab:
                added.append(AddedToken(token, normalized=False, special=False))
        tok = _build(vocab, merges, added, split)

        special: dict[str, str | None] = {}
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        ):
            token_id = meta.get(f"tokenizer.ggml.{key}")
            special[name] = (
                tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None
            )
        return cls(tok, special)

    # ---- encoding and decoding ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Special-token strings in it become their ids; no BOS/EOS is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; with skip_special_tokens, drops the tokens flagged special (not `<think>` etc.)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id < 0:
            return None
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for (b"" for an unknown id)."""
        if self._token_bytes is not None:
            return self._token_bytes[token_id] if 0 <= token_id < len(self._token_bytes) else b""
        raw = self._seen_bytes.get(token_id)
        if raw is None:
            raw = self._seen_bytes[token_id] = self._one_token_bytes(token_id)
        return raw

    def all_token_bytes(self) -> list[bytes]:
        """token_bytes of every id from 0 to the largest, as one list (built once)."""
        if self._token_bytes is None:
            self._token_bytes = self._all_token_bytes()
        return self._token_bytes

    def max_id(self) -> int:
        """The largest token id (added tokens included)."""
        if self._max_id is None:
            self._max_id = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)
        return self._max_id

    # BPE tokens are spelled in GPT-2's byte alphabet: each character maps back to its byte (one str.translate,
    # in C) and the result reads as Latin-1. Added tokens ("<think>", …) stand for their own text, as in the
    # byte-level decoder.
    def _one_token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < 1 << 32:  # id_to_token takes a u32, and gives None past the vocabulary
            return b""
        if token_id in self._added:
            return self._bytes_of(self._added[token_id])
        token = self._tok.id_to_token(token_id)
        return b"" if token is None else token.translate(self._to_latin1).encode("latin-1")

    def _all_token_bytes(self) -> list[bytes]:
        vocab = self._tok.get_vocab(with_added_tokens=False)
        table = [b""] * (self.max_id() + 1)
        for token, i in vocab.items():
            table[i] = token.translate(self._to_latin1).encode("latin-1") if i not in self._added else b""
        for i, content in self._added.items():
            table[i] = self._bytes_of(content)
        return table

    def _bytes_of(self, token: str | None) -> bytes:
        if token is None:
            return b""
        # The byte-level decoder's rule: a token spelled entirely in the byte alphabet stands for those bytes,
        # anything else (an added token such as "<think>" happens to be both) for its own UTF-8.
        table = self._byte_decoder
        try:
            return bytes(table[c] for c in token)
        except KeyError:
            return token.encode("utf-8")

    # ---- vocabulary and special tokens -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens, including added ones."""
        return self._vocab_size

    @property
    def eos_token(self) -> str | None:
        return self._special["eos_token"]

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self._special["eos_token"])

    @property
    def pad_token(self) -> str | None:
        return self._special["pad_token"]

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self._special["pad_token"])

    @property
    def bos_token(self) -> str | None:
        return self._special["bos_token"]

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self._special["bos_token"])

    @property
    def special_token_ids(self) -> set[int]:
        """Ids of the added tokens flagged special: the ones decode(skip_special_tokens=True) drops."""
        return set(self._special_ids)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def special_tokens_map(self) -> dict[str, str | None]:
        """bos_token, eos_token, pad_token and unk_token as chat templates expect them (None when absent)."""
        return dict(self._special)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def __len__(self) -> int:
        return self._vocab_size

    def __repr__(self) -> str:
        return f"QwenTokenizer(vocab_size={self._vocab_size}, eos_token={self.eos_token!r})"
