"""QwenTokenizer against transformers: the same ids for a varied corpus, from tokenizer.json and from the GGUF."""

from __future__ import annotations

import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest

from qwen_engine.errors import ModelLoadError
from qwen_engine.text.tokenizer import QwenTokenizer, byte_to_unicode

BASE = [
    # English, punctuation, contractions
    "Hello world",
    "Hello, world!",
    " Hello world",
    "Hello world ",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see they've done what we'd've expected; it's John's, isn't it?",
    "DON'T SHOUT, I'M HERE. WE'LL SEE. IT'S FINE. THEY'RE OK. YOU'VE GOT IT. HE'D GO.",
    "Don't stop believin'",
    "'s 't 're 've 'm 'll 'd",
    "rock 'n' roll",
    "Mr. O'Neil paid $3.50 (plus 20% tax) — about €4.",
    "e.g. i.e. etc... ?!?! ... ---",
    "A\u00a0non-breaking space and a thin\u2009space",
    "Tabs\tbetween\twords",
    "semicolons; colons: commas, periods.",
    "UPPER lower MiXeD CaSe",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "She said, \u201cthat\u2019s it\u201d and left \u2018quietly\u2019.",
    # Chinese, Japanese, Korean and other scripts
    "你好，世界！",
    "我们今天去公园散步，天气非常好。",
    "机器学习是人工智能的一个分支。",
    "通义千问是阿里云开发的大语言模型。",
    "中文English混合text测试123",
    "《红楼梦》是中国古典四大名著之一。",
    "こんにちは、世界！",
    "日本語のテキストをトークン化します。カタカナとひらがな、そして漢字。",
    "ｶﾀｶﾅ 半角 全角ＡＢＣ１２３",
    "안녕하세요, 세계!",
    "한국어 문장을 토큰화합니다. 띄어쓰기도 있습니다.",
    "Привет, мир! Как дела?",
    "Ελληνικά γράμματα: αβγδε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Tiếng Việt có dấu: Hà Nội, Sài Gòn",
    "Ünïcödé àccents: café, naïve, résumé, Straße, Æsir, Øresund",
    "Ǆ ǅ ǆ ﬁ ﬂ ﬃ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝒜𝒷𝒸",
    "∀x∈ℝ: x² ≥ 0, ∑ᵢ aᵢ ≤ ∞, √2 ≈ 1.414",
    # emoji, ZWJ sequences, flags, skin tones, keycaps
    "I love pizza 🍕🍕🍕",
    "😀😃😄😁😆😅😂🤣",
    "👨‍👩‍👧‍👦 family",
    "👩🏽‍💻 coding at night 🌙",
    "🏳️‍🌈 and 🏴‍☠️",
    "🇨🇳🇯🇵🇰🇷🇺🇸🇬🇧🇫🇷🇩🇪",
    "#️⃣ 1️⃣ 2️⃣ *️⃣",
    "👍🏻👍🏼👍🏽👍🏾👍🏿",
    "❤️ vs ❤ vs ♥",
    "🧑‍🚀🚀✨🌌",
    "emoji at end🎉",
    "🎉emoji at start",
    # whitespace runs
    "    four leading spaces",
    "trailing spaces    ",
    "a  b   c    d     e",
    "\t\tindented with tabs",
    "line one\nline two\n\nline four\n\n\n",
    "\n\n\nleading newlines",
    "windows\r\nline\r\nendings\r\n",
    "mixed \t \n \r\n whitespace \u3000 ideographic",
    " ",
    "  ",
    "\n",
    "\t",
    "\r\n",
    " \n ",
    "x" + " " * 40 + "y",
    "\n" * 12,
    # digits and numbers
    "0",
    "1234567890",
    "3.14159265358979323846264338327950288419716939937510",
    "The year 2024 had 366 days.",
    "Call +1 (555) 123-4567 or +86 138 0013 8000",
    "1,000,000 and 1.000.000 and 1 000 000",
    "0x1F 0b1010 0o777 1e-10 6.02e23",
    "٠١٢٣٤٥٦٧٨٩ ①②③ Ⅻ",
    "v1.2.3-beta+build.456",
    # URLs, paths, markup
    "https://www.example.com/path/to/page?query=value&other=123#anchor",
    "Visit http://qwen.ai or mailto:someone@example.org today.",
    "C:\\Users\\name\\Documents\\file.txt",
    "/usr/local/bin/python3 -m pip install --upgrade pip",
    '<html><body><p class="x">Hi &amp; bye</p></body></html>',
    "**bold** _italic_ `code` [link](http://x.y) # Heading",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;",
    # code in several languages
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "import numpy as np\n\nx = np.arange(10)\nprint(x.sum())  # 45\n",
    "class Foo:\n\tdef __init__(self):\n\t\tself.x = {'a': [1, 2]}\n",
    '#include <stdio.h>\nint main(void) {\n    printf("Hello, %s!\\n", "world");\n    return 0;\n}\n',
    'fn main() {\n    let v: Vec<i32> = (0..10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}\n',
    "function add(a, b) {\n  return a + b;\n}\nconsole.log(add(1, 2));\n",
    "const f = async () => { await fetch('/api'); };",
    'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("hi")\n}\n',
    'public static void main(String[] args) { System.out.println("Hi"); }',
    '#!/bin/bash\nfor i in $(seq 1 5); do echo "$i"; done\n',
    "x <- c(1, 2, 3); mean(x)",
    "SELECT * FROM t WHERE s LIKE '%foo%';",
    "template<typename T> T max(T a, T b) { return a > b ? a : b; }",
    "lambda x: x**2 if x >= 0 else -x",
    "a != b && c <= d || e >= f;; ++i; --j; i += 1;",
    "    // comment\n    /* block */\n    # hash\n",
    "a\tb\tc\n1\t2\t3\n",
    "$$E = mc^2$$ and \\frac{a}{b} + \\sqrt{x}",
    # special and added tokens in the text
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "<|im_end|><|im_end|><|im_start|>",
    "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
    "<think></think>",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    '<tool_response>\n{"temp": 21}\n</tool_response>',
    "<|fim_prefix|>def f(x):\n<|fim_suffix|>\n    return y<|fim_middle|>",
    "<|repo_name|>qwen<|file_sep|>main.py\nprint(1)",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>",
    "<|im_start|> spaced <|im_end|>",
    "< |im_start| > not a token",
    "<|im_start|",
    "<|unknown_token|>",
    "<tool_call><tool_call></tool_call>",
    # odd characters
    "\u200b\u200c\u200d zero width",
    "\ufeffBOM at start",
    "control chars \x00\x01\x07\x1b[31m red \x1b[0m",
    "\u2028line separator\u2029paragraph separator",
    "surrogate-range emoji 🙈🙉🙊 and CJK ext 𠀀𠀁",
    "¡¿Qué?! «Guillemets» „Anführung“",
    "a" * 100,
    "ab" * 60,
    "🍕" * 20,
    "中" * 50,
    "",
]

SNIPPETS = ["hello", "世界", "🤖", "  ", "\n", "42", "it's", "<|im_end|>", "Ωμέγα", "x=1;", "\t", "日本"]
NUMBERS = ["7", "42", "512", "2048", "65536", "1048576", "12345678901234567890", "3.0", "-17", "1/3"]


def build_corpus() -> list[str]:
    corpus = list(BASE)
    rng = random.Random(20240501)
    # Pairs and triples of snippets, with and without separating spaces.
    for a in SNIPPETS:
        for b in SNIPPETS[::3]:
            corpus.append(a + b)
            corpus.append(f"{a} {b}")
    for n in NUMBERS:
        corpus.append(f"There are {n} items")
        corpus.append(f"{n}{n}")
    for s in BASE[:30]:
        corpus.append(s.upper())
        corpus.append(s + "\n\n")
    for _ in range(40):
        k = rng.randint(2, 6)
        corpus.append("".join(rng.choice(SNIPPETS + BASE[:60]) for _ in range(k)))
    return list(dict.fromkeys(corpus))


CORPUS = build_corpus()
NFC_CORPUS = [s for s in CORPUS if unicodedata.normalize("NFC", s) == s]

# Text that NFC changes: decomposed accents, compatibility-free compositions, Hangul jamo, CJK compatibility.
NON_NFC = [
    "cafe\u0301",
    "re\u0301sume\u0301 and nai\u0308ve",
    "A\u030a and \u212b (angstrom sign)",
    "\u1100\u1161\u11a8 jamo",
    "\u1112\u1161\u11ab\u1100\u1173\u11af",
    "o\u0302 e\u0302 u\u031b",
    "\u2126 ohm sign",
    "\uf900\uf901 compatibility ideographs",
    "Tie\u0302\u0301ng Vie\u0323\u0302t",
    "s\u0323\u0307 dot below and above",
    "the letter \u0041\u0308 is Ä",
    "mixed ñ and n\u0303 and \u00f1",
]


@pytest.fixture(scope="module")
def qwen3(qwen3_tokenizer_dir: Path) -> QwenTokenizer:
    return QwenTokenizer.from_dir(qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def gguf_tok(gguf_meta: dict) -> QwenTokenizer:
    return QwenTokenizer.from_gguf_metadata(gguf_meta)


def test_corpus_is_big_and_varied() -> None:
    assert len(CORPUS) >= 200
    assert len(NFC_CORPUS) >= 200
    assert any("<|im_start|>" in s for s in NFC_CORPUS)
    assert any(ord(c) > 0xFFFF for s in NFC_CORPUS for c in s)  # astral-plane emoji


def _mismatches(ours: QwenTokenizer, ref, texts: list[str]) -> list[tuple[str, list[int], list[int]]]:
    bad = []
    for s in texts:
        mine, theirs = ours.encode(s), ref.encode(s, add_special_tokens=False)
        if mine != theirs:
            bad.append((s, mine, theirs))
    return bad


def test_encode_matches_transformers_tokenizer_json(qwen3: QwenTokenizer, hf_qwen3) -> None:
    assert _mismatches(qwen3, hf_qwen3, CORPUS) == []
    # transformers' default call (add_special_tokens=True) adds nothing either: Qwen has no BOS.
    assert qwen3.encode("Hello world") == hf_qwen3("Hello world")["input_ids"]


def test_encode_matches_transformers_gguf(gguf_tok: QwenTokenizer, hf_gguf_tokenizer) -> None:
    assert _mismatches(gguf_tok, hf_gguf_tokenizer, NFC_CORPUS) == []
    assert gguf_tok.encode("Hello world") == hf_gguf_tokenizer("Hello world")["input_ids"]


def test_special_tokens_become_single_ids(qwen3: QwenTokenizer, gguf_tok: QwenTokenizer) -> None:
    for tok in (qwen3, gguf_tok):
        ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
        assert ids[0] == tok.token_to_id("<|im_start|>") == 151644
        assert ids[-1] == tok.token_to_id("<|im_end|>") == tok.eos_token_id == 151645
        assert tok.encode("<tool_call>") == [151657]
    assert qwen3.encode("<think>") == [151667]


def test_vocabulary_matches(qwen3: QwenTokenizer, hf_qwen3, gguf_tok: QwenTokenizer, hf_gguf_tokenizer) -> None:
    for ours, ref in ((qwen3, hf_qwen3), (gguf_tok, hf_gguf_tokenizer)):
        assert ours.vocab_size == len(ref)
        assert ours.backend.get_vocab(with_added_tokens=True) == ref.get_vocab()
        # The tokens decode(skip_special_tokens=True) drops: added tokens flagged special.
        assert ours.special_token_ids == {i for i, t in ref.added_tokens_decoder.items() if t.special}
        assert set(ref.all_special_ids) <= ours.special_token_ids
        assert ours.eos_token_id == ref.eos_token_id
        assert ours.pad_token_id == ref.pad_token_id
        expected_map = {
            k: ref.special_tokens_map.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        assert ours.special_tokens_map() == expected_map
        for i in (0, 100, 151643, 151657, ours.vocab_size - 1):
            assert ours.id_to_token(i) == ref.convert_ids_to_tokens(i)
    assert gguf_tok.vocab_size == 151936  # the GGUF keeps its padding rows as tokens
    assert qwen3.bos_token is None and gguf_tok.bos_token == "<|endoftext|>"
    assert gguf_tok.id_to_token(-1) is None and gguf_tok.id_to_token(10**7) is None
    assert gguf_tok.token_to_id("no such token ⁇") is None


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(qwen3: QwenTokenizer, hf_qwen3, gguf_tok, hf_gguf_tokenizer, skip: bool) -> None:
    for ours, ref, texts in ((qwen3, hf_qwen3, CORPUS), (gguf_tok, hf_gguf_tokenizer, NFC_CORPUS)):
        for s in texts:
            ids = ours.encode(s)
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), s
        # Arbitrary id sequences: broken UTF-8 across tokens, special tokens in between, padding rows.
        rng = random.Random(7)
        for _ in range(60):
            ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 25))]
            ids += rng.sample(sorted(ours.special_token_ids), 2)
            rng.shuffle(ids)
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_round_trip_without_special_tokens(qwen3: QwenTokenizer) -> None:
    for s in NFC_CORPUS:
        ids = qwen3.encode(s)
        assert qwen3.decode(ids, skip_special_tokens=False) == s
        # token_bytes joined back gives the UTF-8 of the text exactly.
        assert b"".join(qwen3.token_bytes(i) for i in ids) == s.encode("utf-8")


def test_special_tokens_skipped_only_when_flagged(qwen3: QwenTokenizer, gguf_tok: QwenTokenizer) -> None:
    text = "<|im_start|>assistant\n<think>\nhm\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>"
    assert (
        qwen3.decode(qwen3.encode(text))
        == "assistant\n<think>\nhm\n</think>\n\n<tool_call>\n{}\n</tool_call>"
    )
    assert (
        gguf_tok.decode(gguf_tok.encode("<tool_call>x</tool_call><|endoftext|>"))
        == "<tool_call>x</tool_call>"
    )


def test_token_bytes(qwen3: QwenTokenizer, gguf_tok: QwenTokenizer, hf_qwen3) -> None:
    ni_hao = qwen3.encode("你")
    assert b"".join(qwen3.token_bytes(i) for i in ni_hao) == "你".encode()
    assert qwen3.token_bytes(qwen3.token_to_id("<|im_start|>")) == b"<|im_start|>"
    assert qwen3.token_bytes(qwen3.token_to_id("Ġworld")) == b" world"
    assert qwen3.token_bytes(qwen3.token_to_id("Ċ")) == b"\n"
    assert qwen3.token_bytes(10**7) == b"" and qwen3.token_bytes(-1) == b"" and qwen3.token_bytes(1 << 40) == b""
    assert gguf_tok.token_bytes(151700) == b"[PAD151700]"
    # Every single token that is whole UTF-8 decodes to what transformers gives for it alone.
    rng = random.Random(3)
    for i in rng.sample(range(qwen3.vocab_size), 3000):
        raw = qwen3.token_bytes(i)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            assert hf_qwen3.decode([i], skip_special_tokens=False) == raw.decode("utf-8", errors="replace")
        else:
            assert hf_qwen3.decode([i], skip_special_tokens=False) == text


def test_gguf_applies_nfc_like_qwen(gguf_tok: QwenTokenizer, qwen3: QwenTokenizer, hf_gguf_tokenizer) -> None:
    """Our GGUF tokenizer keeps Qwen's NFC step; transformers' GGUF tokenizer drops it."""
    assert all(unicodedata.normalize("NFC", s) != s for s in NON_NFC)
    differs = 0
    for s in NON_NFC:
        ids = gguf_tok.encode(s)
        # Same ordinary BPE vocabulary as Qwen3's tokenizer.json, which normalises to NFC.
        assert ids == qwen3.encode(s), s
        # Equal to transformers' GGUF tokenizer once the text is normalised by hand ...
        assert ids == hf_gguf_tokenizer.encode(unicodedata.normalize("NFC", s), add_special_tokens=False), s
        # ... which it does not do itself.
        differs += ids != hf_gguf_tokenizer.encode(s, add_special_tokens=False)
    assert differs == len(NON_NFC)


def test_gguf_and_tokenizer_json_share_ordinary_vocab(gguf_tok: QwenTokenizer, qwen3: QwenTokenizer) -> None:
    for i in range(0, 151643, 97):
        assert gguf_tok.id_to_token(i) == qwen3.id_to_token(i)
    for s in NFC_CORPUS:
        if not any(t in s for t in ("<think>", "</think>", "<tool_response>", "</tool_response>")):
            assert gguf_tok.encode(s) == qwen3.encode(s), s


def test_from_vocab_and_merges(
    tmp_path: Path, qwen3_tokenizer_dir: Path, qwen3: QwenTokenizer, hf_qwen3
) -> None:
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer_dir / name, tmp_path / name)
    tok = QwenTokenizer.from_dir(tmp_path)
    assert tok.vocab_size == qwen3.vocab_size
    assert tok.special_token_ids == qwen3.special_token_ids
    assert tok.special_tokens_map() == qwen3.special_tokens_map()
    assert _mismatches(tok, hf_qwen3, CORPUS) == []
    for s in CORPUS[:80]:
        ids = tok.encode(s)
        assert tok.decode(ids) == hf_qwen3.decode(ids, skip_special_tokens=True)


def test_missing_files_raise(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        QwenTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="merges.txt"):
        QwenTokenizer.from_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="not a folder"):
        QwenTokenizer.from_dir(tmp_path / "nope")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        QwenTokenizer.from_dir(tmp_path)


def test_small_vocab_from_files(tmp_path: Path) -> None:
    """A hand-made vocabulary: merges apply in order, added tokens keep their ids and flags."""
    vocab = {"a": 0, "b": 1, "Ġ": 2, "ab": 3, "Ġab": 4}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nĠ ab\n")
    config = {
        "eos_token": "<eos>",
        "pad_token": {"content": "<pad>", "__type": "AddedToken"},
        "added_tokens_decoder": {
            "5": {"content": "<eos>", "special": True, "normalized": False},
            "7": {"content": "<pad>", "special": True, "normalized": False},
            "6": {"content": "<mark>", "special": False, "normalized": False},
        },
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = QwenTokenizer.from_dir(tmp_path)
    assert tok.encode("ab ab<mark>a<eos>") == [3, 4, 6, 0, 5]
    assert tok.eos_token_id == 5 and tok.pad_token_id == 7
    assert tok.special_token_ids == {5, 7}
    assert tok.decode([3, 4, 6, 5, 7]) == "ab ab<mark>"
    assert tok.decode([3, 5], skip_special_tokens=False) == "ab<eos>"
    assert tok.special_tokens_map() == {
        "bos_token": None,
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": None,
    }


def _tiny_gguf_meta(**changes) -> dict:
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<|end|>", "<x>", "[PAD5]"],
        "tokenizer.ggml.token_type": [1, 1, 1, 3, 4, 5],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.eos_token_id": 3,
    }
    meta.update(changes)
    return meta


def test_tiny_gguf() -> None:
    tok = QwenTokenizer.from_gguf_metadata(_tiny_gguf_meta())
    assert tok.encode("ab<|end|><x>b") == [2, 3, 4, 1]
    assert tok.special_token_ids == {3}
    assert tok.decode([2, 3, 4, 5]) == "ab<x>[PAD5]"
    assert tok.eos_token == "<|end|>" and tok.bos_token is None and tok.pad_token_id is None
    assert tok.vocab_size == 6


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tokenizer.ggml.model": "llama"}, "llama"),
        ({"tokenizer.ggml.pre": "llama-bpe"}, "llama-bpe"),
        ({"tokenizer.ggml.pre": None}, "pre-tokenizer"),
        ({"tokenizer.ggml.tokens": None}, "tokens"),
        ({"tokenizer.ggml.merges": None}, "merges"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "token types"),
        ({"tokenizer.ggml.merges": ["a b", "ab"]}, "merge 'ab' is not a pair"),
    ],
)
def test_unsupported_gguf_raises(changes: dict, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        QwenTokenizer.from_gguf_metadata(_tiny_gguf_meta(**changes))


def test_gguf_vocabulary_keeps_first_ids_and_respells_outside_the_byte_alphabet() -> None:
    """A token written twice keeps its first id; one spelled outside GPT-2's byte alphabet ("€") is respelled byte
    by byte (the spelling its bytes' merges would reach); a "control" token outside the alphabet is not added."""
    tokens = ["a", "b", "ab", "<|end|>", "<x>", "[PAD5]", "ab", "€", "€€"]
    tok = QwenTokenizer.from_gguf_metadata(_tiny_gguf_meta(**{
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [1, 1, 1, 3, 4, 5, 1, 1, 3]}))
    assert tok.encode("ab") == [2]
    spelling = byte_to_unicode()
    assert tok._tok.token_to_id("".join(spelling[b] for b in "€".encode())) == 7
    assert tok.token_bytes(7) == "€".encode()
    assert tok.special_token_ids == {3}
    assert tok.max_id() == 8
