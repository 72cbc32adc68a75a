"""Tiny transformers models written as GGUF files the way llama.cpp's converter lays them out: its tensor names,
its metadata keys, the tokenizer as a token list with merges, and a chosen ggml type per kind of tensor.

Mixtures of experts (Qwen2-MoE, Qwen3-MoE) get one 3-D tensor per kind of expert weight ([experts, out, in],
`ffn_{gate,up,down}_exps`), the router as `ffn_gate_inp`, and Qwen2-MoE's shared expert as `*_shexp`, its
one-row gate as a vector — as in the released files.
"""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import torch
from tiny_models import VOCAB

Q = gguf.GGMLQuantizationType
# Which type each kind of tensor is stored as: every type the gguf package both writes and reads.
TYPES = {"attn_q": Q.Q8_0, "attn_k": Q.F16, "attn_v": Q.BF16, "attn_output": Q.Q4_0, "ffn_gate": Q.Q8_0,
         "ffn_up": Q.Q5_0, "ffn_down": Q.F16, "token_embd": Q.Q8_0, "output": Q.F16,
         "ffn_gate_exps": Q.Q8_0, "ffn_up_exps": Q.Q4_0, "ffn_down_exps": Q.F16, "ffn_gate_inp": Q.Q8_0,
         "ffn_gate_shexp": Q.Q5_0, "ffn_up_shexp": Q.Q8_0, "ffn_down_shexp": Q.BF16}
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
ARCHS = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


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


def _tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """GGUF name → float32 values, with each layer's experts stacked [experts, out, in]."""
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, tensor in model.state_dict().items():
        values = tensor.float().numpy()
        if m := _EXPERT.fullmatch(name):
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = values
        elif m := _FUSED.fullmatch(name):  # transformers 5 holds the experts fused in memory: [E, 2I, H], [E, H, I]
            if m.group(2) == "down_proj":
                out[f"blk.{m.group(1)}.ffn_down_exps.weight"] = values
            else:
                gate, up = np.split(values, 2, axis=1)
                out[f"blk.{m.group(1)}.ffn_gate_exps.weight"], out[f"blk.{m.group(1)}.ffn_up_exps.weight"] = gate, up
        else:
            out[gguf_name(name)] = values
    for (layer, kind), per_expert in experts.items():
        out[f"blk.{layer}.ffn_{kind}_exps.weight"] = np.stack([per_expert[j] for j in sorted(per_expert)])
    return out


def write_gguf(model: torch.nn.Module, tokenizer_dir, path, types: dict | None = None) -> None:
    cfg = model.config
    arch = ARCHS[cfg.model_type]
    types = TYPES if types is None else types
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch.endswith("moe"):
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", 0):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    # The tokenizer as llama.cpp's converter writes it: vocabulary, merges, token types, padded to the model's rows.
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokens = [""] * VOCAB
    token_types = [gguf.TokenType.NORMAL] * VOCAB
    for token, i in data["model"]["vocab"].items():
        tokens[i] = token
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
        token_types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    for i in range(VOCAB):
        if not tokens[i]:
            tokens[i], token_types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_eos_token_id(151645)
    w.add_pad_token_id(151643)
    w.add_bos_token_id(151643)
    w.add_chat_template(json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"])
    for target, values in _tensors(model).items():
        if target.endswith("ffn_gate_inp_shexp.weight"):
            values = values.reshape(-1)  # llama.cpp's converter writes this one-row gate as a vector
        kind = target.split(".")[-2] if target.startswith("blk.") else target.split(".")[0]
        qtype = Q.F32 if values.ndim == 1 else types.get(kind, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(target, values)
        else:
            w.add_tensor(target, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
