"""A small random Qwen3 written as a GGUF file (mixed F32 / F16 / BF16 / Q8_0 / Q4_0 tensors, the real Qwen3
tokenizer in GGUF form) and loaded both by qwen-engine and by transformers' GGUF loader: same logits.

This covers the `qwen3` GGUF architecture (q_norm / k_norm tensors, key_length ≠ hidden/heads), the tensor-name
map, several quantisation types, and the tokenizer built from a GGUF token list. Measured max|Δlogit| = 2.4e-6.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_files import write_gguf
from tiny_models import build_tiny

from qwen_engine import LLM

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def pair(tmp_path_factory, qwen3_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-qwen3-gguf")
    model = build_tiny("qwen3", folder / "hf", tokenizer_dir=qwen3_tokenizer_dir, seed=5)
    path = folder / "tiny-qwen3.gguf"
    write_gguf(model, qwen3_tokenizer_dir, path)
    # transformers' GGUF config reader ignores qwen3.attention.key_length (it assumes hidden/heads), so it is
    # given the config; the weights still come from the GGUF through its own dequantisation and name map.
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, config=model.config,
                                               dtype=torch.float32, attn_implementation="eager").eval()
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
    return LLM(path), ref, ref_tok


def test_config_read_from_gguf(pair):
    llm, ref, _ = pair
    cfg = llm.config
    assert (cfg.architecture, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.qk_norm) == ("qwen3", 32, 4, 2, True)
    assert cfg.head_dim != cfg.hidden_size // cfg.num_heads


def test_logits_match_transformers(pair):
    llm, ref, ref_tok = pair
    text = llm.apply_chat_template([{"role": "user", "content": "Hello, 世界! 1234 <think>"}])
    ids = llm.tokenizer.encode(text)
    assert ids == ref_tok(text)["input_ids"]
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    diff = (llm.logits(ids) - expected).abs().max().item()
    print(f"max|Δlogit| = {diff:.2e}")
    assert diff <= 1e-4, diff


def test_quantised_tensors_are_the_dequantised_blocks(pair, tmp_path):
    from qwen_engine.weights.gguf import GGUFFile

    llm, _, _ = pair
    g = GGUFFile(llm.path)
    for name, qtype in [("blk.0.attn_q.weight", Q.Q8_0), ("blk.1.attn_v.weight", Q.BF16),
                        ("blk.2.attn_output.weight", Q.Q4_0), ("blk.0.ffn_up.weight", Q.Q5_0)]:
        assert g.tensors[name].qtype == qtype
        raw = g.raw(name)
        expected = gguf.quants.dequantize(raw, qtype).reshape(tuple(reversed(g.tensors[name].shape)))
        assert np.array_equal(g.dequantize(name), expected)
