"""IncrementalDetokenizer: token-by-token text that adds up to decode() and never splits a character."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from qwen_engine.text.detokenizer import IncrementalDetokenizer
from qwen_engine.text.tokenizer import QwenTokenizer

LONG_TEXTS = [
    # Chinese prose: most characters are one or two tokens of three bytes split across token boundaries.
    "人工智能（Artificial Intelligence，简称AI）是研究、开发用于模拟、延伸和扩展人的智能的理论、方法、技术及应用"
    "系统的一门新的技术科学。龘靐齉爩麤 這些是罕見的繁體字。𠀀𠀁𠀂𪚥 是扩展区的汉字。" * 3,
    "日本語の文章です。東京は日本の首都で、人口は約1400万人です。ｶﾀｶﾅとカタカナ、ひらがな。"
    "한국어도 섞어 봅시다: 서울특별시는 대한민국의 수도입니다. 쀍쀍 뷁! " * 3,
    # Emoji: ZWJ families, skin tones, flags, keycaps, variation selectors.
    "👨‍👩‍👧‍👦👩🏽‍💻🧑🏿‍🚀🏳️‍🌈🏴‍☠️🇨🇳🇯🇵🇺🇸🇪🇺 #️⃣1️⃣ ❤️‍🔥 🫠🫨🪿 🤌🏼 " * 4,
    # Mixed code, symbols and scripts.
    'def 计算(数字: int) -> str:\n    """返回 emoji 🎉 和 Ελληνικά"""\n    return f\'{数字:,} ✓ → ∑ ∞ 🚀\'\n'
    * 3,
    "Ünïcödé àccents, Straße, Øresund, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, ∀x∈ℝ, नमस्ते, สวัสดี, مرحبا, שלום, Привет 🙈🙉🙊\n" * 3,
    "<|im_start|>assistant\n<think>\n先想一想 🤔\n</think>\n\n答案是：４２。<tool_call>\n"
    '{"name": "天气", "arguments": {"城市": "北京 🌤"}}\n</tool_call><|im_end|><|endoftext|>',
]


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir: Path) -> QwenTokenizer:
    return QwenTokenizer.from_dir(qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(qwen3_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


def _stream(tok: QwenTokenizer, ids: list[int], skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", LONG_TEXTS, ids=range(len(LONG_TEXTS)))
def test_stream_equals_decode(tok: QwenTokenizer, hf_tok, text: str, skip: bool) -> None:
    ids = tok.encode(text)
    # The texts really do split characters across tokens, or the test would prove nothing.
    assert any(_is_partial(tok.token_bytes(i)) for i in ids)
    deltas = _stream(tok, ids, skip)
    expected = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == expected == hf_tok.decode(ids, skip_special_tokens=skip)
    # No delta carries a replacement character: nothing was emitted half-finished.
    assert all("\ufffd" not in d for d in deltas)


def _is_partial(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize("text", LONG_TEXTS[:5], ids=range(5))
def test_text_is_released_as_soon_as_complete(tok: QwenTokenizer, text: str) -> None:
    detok = IncrementalDetokenizer(tok)
    pending = b""
    emitted = ""
    for i in tok.encode(text):
        pending += tok.token_bytes(i)
        emitted += detok.add(i)
        # Everything decodable is out; only the start of one unfinished character (at most 3 bytes) waits.
        done = emitted.encode("utf-8")
        assert pending.startswith(done)
        tail = pending[len(done) :]
        assert len(tail) <= 3
        assert _is_partial(tail) or tail == b""
    assert detok.flush() == ""
    assert emitted == text


def test_multibyte_character_waits_for_its_last_token(tok: QwenTokenizer) -> None:
    ids = tok.encode("🫠")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    outputs = [detok.add(i) for i in ids]
    assert outputs[:-1] == [""] * (len(ids) - 1)
    assert outputs[-1] == "🫠"
    assert detok.token_ids == ids


def test_special_tokens(tok: QwenTokenizer) -> None:
    ids = tok.encode("<|im_start|>hi<think>x</think><|im_end|>")
    assert "".join(_stream(tok, ids, True)) == "hi<think>x</think>"
    assert "".join(_stream(tok, ids, False)) == "<|im_start|>hi<think>x</think><|im_end|>"


def test_unfinished_character_at_end_becomes_replacement(tok: QwenTokenizer, hf_tok) -> None:
    ids = tok.encode("ok 🫠")[:-1]  # drop the token that finishes the emoji
    deltas = _stream(tok, ids, True)
    assert deltas[-1] == "\ufffd"
    assert "".join(deltas) == tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_equal_decode(tok: QwenTokenizer, hf_tok, skip: bool) -> None:
    """Arbitrary ids (invalid UTF-8, special tokens splitting a character) still add up to decode()."""
    rng = random.Random(11)
    partial = [i for i in range(0, tok.vocab_size, 7) if _is_partial(tok.token_bytes(i))]
    specials = sorted(tok.special_token_ids)
    for _ in range(200):
        ids = [rng.choice(partial) for _ in range(rng.randint(1, 12))]
        ids += [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 8))]
        ids += rng.sample(specials, rng.randint(0, 3))
        rng.shuffle(ids)
        expected = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(_stream(tok, ids, skip)) == expected == hf_tok.decode(ids, skip_special_tokens=skip)


def test_bytes_looked_up_one_by_one_equal_the_whole_table(qwen3_tokenizer_dir: Path) -> None:
    # The detokenizer looks tokens up one at a time (so the first token does not wait for the 151k-entry
    # table); guided decoding takes the table. Both must give the same bytes for every id, unknown ones too.
    one_by_one = QwenTokenizer.from_dir(qwen3_tokenizer_dir)
    table = QwenTokenizer.from_dir(qwen3_tokenizer_dir).all_token_bytes()
    ids = range(-3, len(table) + 3)
    assert [one_by_one.token_bytes(i) for i in ids] == [table[i] if 0 <= i < len(table) else b"" for i in ids]
    assert one_by_one.token_bytes(one_by_one.token_to_id("<think>")) == b"<think>"
