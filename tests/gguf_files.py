"""Tiny transformers models written as GGUF files the way llama.cpp's converter lays them out: its tensor names,
its metadata keys, the tokenizer as a token list with merges, and a chosen ggml type per kind of tensor.

Mixtures of experts (Qwen2-MoE, Qwen3-MoE) get one 3-D tensor per kind of expert weight ([experts, out, in],
`ffn_{gate,up,down}_exps`), the router as `ffn_gate_inp`, and Qwen2-MoE's shared expert as `*_shexp`, its
one-row gate as a vector — as in the released files.

Qwen3.5 (`qwen35`, `qwen35moe`) and Qwen3-Next (`qwen3next`) are written with the converter's transforms:
RMSNorm weights stored as 1 + w (not the gated norm of the DeltaNet layers), A = -exp(A_log), the convolution as
[channels, kernel]; for Qwen3.5, where key and value heads differ in number, the value heads in tiled order
(value head j reads key head j mod Hk) in every tensor that has them; for Qwen3-Next, in_proj_qkvz split into
attn_qkv and attn_gate, and in_proj_ba kept fused as ssm_ba. tests/test_hybrid.py checked this writer's F32 output against the converter's
own (llama.cpp b8xxx's convert_hf_to_gguf.py, run by hand): same names, shapes, values and metadata.
"""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
# Which type each kind of tensor is stored as: every type the gguf package both writes and reads.
TYPES = {"attn_q": Q.Q8_0, "attn_k": Q.F16, "attn_v": Q.BF16, "attn_output": Q.Q4_0, "ffn_gate": Q.Q8_0,
         "ffn_up": Q.Q5_0, "ffn_down": Q.F16, "token_embd": Q.Q8_0, "output": Q.F16,
         "ffn_gate_exps": Q.Q8_0, "ffn_up_exps": Q.Q4_0, "ffn_down_exps": Q.F16, "ffn_gate_inp": Q.Q8_0,
         "ffn_gate_shexp": Q.Q5_0, "ffn_up_shexp": Q.Q8_0, "ffn_down_shexp": Q.BF16,
         "attn_qkv": Q.Q8_0, "attn_gate": Q.Q5_0, "ssm_alpha": Q.F16, "ssm_beta": Q.Q8_0, "ssm_out": Q.Q4_0, "ssm_ba": Q.Q8_0}
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "linear_attn.in_proj_qkv": "attn_qkv", "linear_attn.in_proj_z": "attn_gate", "linear_attn.in_proj_b": "ssm_beta",
    "linear_attn.in_proj_a": "ssm_alpha", "linear_attn.conv1d": "ssm_conv1d", "linear_attn.norm": "ssm_norm",
    "linear_attn.out_proj": "ssm_out", "linear_attn.in_proj_ba": "ssm_ba",
}
ARCHS = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
         "qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe", "qwen3_next": "qwen3next",
         # the language side of vision-language models (the tower goes into an mmproj file, write_mmproj)
         "qwen2_vl_text": "qwen2vl", "qwen2_5_vl_text": "qwen2vl", "qwen3_vl_text": "qwen3vl",
         "qwen3_vl_moe_text": "qwen3vlmoe"}
HYBRID = ("qwen35", "qwen35moe", "qwen3next")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def gguf_name(hf: str, arch: str = "qwen3") -> str:
    if hf.endswith("linear_attn.A_log"):
        return f"blk.{hf.split('.')[2]}.ssm_a"
    if hf.endswith("linear_attn.dt_bias"):
        return f"blk.{hf.split('.')[2]}.ssm_dt.bias"
    if arch in HYBRID and hf.endswith("post_attention_layernorm.weight"):
        return f"blk.{hf.split('.')[2]}.post_attention_norm.weight"
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def _tiled(values: np.ndarray, axis: int, key_heads: int, per_key: int, width: int) -> np.ndarray:
    """Value heads from grouped order (key head g's r value heads together) to tiled (value head v of every key
    head together), along `axis`, each head `width` values wide."""
    shape = values.shape
    grouped = values.reshape(*shape[:axis], key_heads, per_key, width, *shape[axis + 1:])
    return np.swapaxes(grouped, axis, axis + 1).reshape(shape)


def _converted(name: str, values: np.ndarray, cfg, arch: str) -> np.ndarray:
    """A Qwen3.5 or Qwen3-Next tensor as llama.cpp's converter stores it (see the module's docstring)."""
    if name.endswith("norm.weight") and "linear_attn.norm" not in name:
        values = values + 1
    if name.endswith("linear_attn.A_log"):
        values = -np.exp(values)
    if name.endswith("linear_attn.conv1d.weight"):
        values = values.reshape(values.shape[0], -1)
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    if "linear_attn." not in name or hk == hv or arch == "qwen3next":  # (qwen3next keeps the grouped order)
        return values
    r, dv, qk = hv // hk, cfg.linear_value_head_dim, 2 * hk * cfg.linear_key_head_dim
    if name.endswith(("in_proj_qkv.weight", "conv1d.weight")):  # only the value channels, after q and k
        return np.concatenate([values[:qk], _tiled(values[qk:], 0, hk, r, dv)])
    if name.endswith("in_proj_z.weight"):
        return _tiled(values, 0, hk, r, dv)
    if name.endswith(("in_proj_b.weight", "in_proj_a.weight", "A_log", "dt_bias")):
        return _tiled(values, 0, hk, r, 1)
    if name.endswith("out_proj.weight"):
        return _tiled(values, 1, hk, r, dv)
    return values


def _qkvz(name: str, values: np.ndarray, cfg) -> dict[str, np.ndarray]:
    """Qwen3-Next's in_proj_qkvz (grouped by key head: q, k, v, z of each) as the converter writes it: attn_qkv
    (all q, all k, all v) and attn_gate (all z)."""
    hk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    per_key = cfg.linear_num_value_heads // hk * dv
    q, k, v, z = np.split(values.reshape(hk, -1, values.shape[1]), np.cumsum([dk, dk, per_key])[:3], axis=1)
    layer = name.split(".")[2]
    flat = [part.reshape(-1, values.shape[1]) for part in (q, k, v, z)]
    return {f"blk.{layer}.attn_qkv.weight": np.concatenate(flat[:3]), f"blk.{layer}.attn_gate.weight": flat[3]}


def _text_part(model: torch.nn.Module):
    """(text config, state dict in a causal LM's names) of a text model, or of a vision-language model's
    language side (its tower is left out: llama.cpp writes it to an mmproj file)."""
    if not hasattr(model.config, "vision_config"):
        return model.config, model.state_dict()
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.language_model."):
            state["model." + name[len("model.language_model."):]] = tensor
        elif name == "lm_head.weight":
            state[name] = tensor
    return model.config.text_config, state


def _tensors(state: dict, cfg, arch: str = "qwen3") -> dict[str, np.ndarray]:
    """GGUF name → float32 values, with each layer's experts stacked [experts, out, in]."""
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, tensor in state.items():
        values = tensor.float().numpy()
        if arch in HYBRID:
            values = _converted(name, values, cfg, arch)
        if name.endswith("linear_attn.in_proj_qkvz.weight"):  # qwen3next: q, k, v of every head, then z
            out.update(_qkvz(name, values, cfg))
        elif m := _EXPERT.fullmatch(name):
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = values
        elif m := _FUSED.fullmatch(name):  # transformers 5 holds the experts fused in memory: [E, 2I, H], [E, H, I]
            if m.group(2) == "down_proj":
                out[f"blk.{m.group(1)}.ffn_down_exps.weight"] = values
            else:
                gate, up = np.split(values, 2, axis=1)
                out[f"blk.{m.group(1)}.ffn_gate_exps.weight"], out[f"blk.{m.group(1)}.ffn_up_exps.weight"] = gate, up
        else:
            out[gguf_name(name, arch)] = values
    for (layer, kind), per_expert in experts.items():
        out[f"blk.{layer}.ffn_{kind}_exps.weight"] = np.stack([per_expert[j] for j in sorted(per_expert)])
    return out


def write_gguf(model: torch.nn.Module, tokenizer_dir, path, types: dict | None = None, mtp_layers: int = 0,
               chat_template: str | None = None, ollama: bool = False) -> None:
    """`mtp_layers`: append that many copies of the last layer as multi-token-prediction blocks, which released
    Qwen3.5 files carry after the model's own (block_count includes them, nextn_predict_layers counts them).
    A vision-language model is written as its language side. `chat_template`: instead of the tokenizer's.

    `ollama`: a vision-language model in the layout of ollama's published files, as its translation layer for
    llama.cpp (llama/compat/llama-ollama-compat.cpp) describes them: one file holding the tower too (ollama_tower),
    Qwen2.5-VL's architecture named qwen25vl, M-RoPE sections as rope.mrope_section (Qwen3.5: three
    dimension_sections), and for Qwen3.5 head_count_kv per layer (0 for the linear ones), `ssm_dt` without
    `.bias` and the multi-token-prediction weights as `mtp.*`."""
    cfg, state = _text_part(model)
    arch = ARCHS[cfg.model_type]
    if ollama and arch == "qwen2vl":
        arch = "qwen25vl"
    types = TYPES if types is None else types
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers + mtp_layers)
    if mtp_layers:
        w.add_uint32(f"{arch}.nextn_predict_layers", mtp_layers)
    if getattr(cfg, "intermediate_size", None) is not None:  # (Qwen3.5-MoE has only experts)
        w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    if ollama and arch in HYBRID:
        w.add_array(f"{arch}.attention.head_count_kv",
                    [0 if kind == "linear_attention" else cfg.num_key_value_heads for kind in cfg.layer_types])
    else:
        w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch in HYBRID:
        w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
        w.add_ssm_state_size(cfg.linear_key_head_dim)
        w.add_ssm_group_count(cfg.linear_num_key_heads)
        w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
        w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)
        w.add_array(f"{arch}.attention.recurrent_layers", [kind == "linear_attention" for kind in cfg.layer_types])
        w.add_full_attention_interval(4)
        w.add_rope_dimension_count(int(head_dim * cfg.rope_parameters["partial_rotary_factor"]))
    if "mrope_section" in cfg.rope_parameters and ollama:
        sections = list(cfg.rope_parameters["mrope_section"])
        if arch in HYBRID:
            w.add_array(f"{arch}.rope.dimension_sections", sections)
            w.add_bool(f"{arch}.rope.mrope_interleaved", True)
        else:
            w.add_array(f"{arch}.rope.mrope_section", sections)
        ollama_vision_kv(w, model, arch)
    elif "mrope_section" in cfg.rope_parameters:  # qwen2vl, qwen3vl(moe), qwen35(moe)
        w.add_rope_dimension_sections([*cfg.rope_parameters["mrope_section"], 0])
    if arch.startswith("qwen3vl") and not ollama:
        w.add_uint32(f"{arch}.n_deepstack_layers", len(model.config.vision_config.deepstack_visual_indexes))
    if arch.endswith("moe") or arch == "qwen3next":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", 0):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    # The tokenizer as llama.cpp's converter writes it: vocabulary, merges, token types, padded to the model's rows.
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    rows = cfg.vocab_size  # (151936 in the tests' models; 248320 in benchmarks/synthetic_qwen3_5.py's)
    tokens = [""] * rows
    token_types = [gguf.TokenType.NORMAL] * rows
    for token, i in data["model"]["vocab"].items():
        tokens[i] = token
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
        token_types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    for i in range(rows):
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
    w.add_chat_template(chat_template or json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"])
    tensors = _tensors(state, cfg, arch)
    last = f"blk.{cfg.num_hidden_layers - 1}."
    for extra in range(mtp_layers):
        block = f"blk.{cfg.num_hidden_layers + extra}."
        tensors.update({block + n[len(last):]: v for n, v in list(tensors.items()) if n.startswith(last)})
    if ollama:
        tensors = {n.removesuffix(".bias") if n.endswith(".ssm_dt.bias") else n: v for n, v in tensors.items()}
        if arch in HYBRID:  # a multi-token-prediction weight under ollama's name: not the model's, skipped
            tensors["mtp.fc.weight"] = np.ones((cfg.hidden_size, 2 * cfg.hidden_size), np.float32)
        tensors.update(ollama_tower(model))
    for target, values in tensors.items():
        if target.startswith("v.") and ollama:  # the tower as published: F16 matrices, F32 vectors
            _add_tensor(w, target, values, Q.F32 if values.ndim == 1 else Q.F16)
            continue
        if target.endswith("ffn_gate_inp_shexp.weight") and arch not in HYBRID:
            values = values.reshape(-1)  # llama.cpp's converter writes this one-row gate as a vector (but qwen35moe's)
        kind = target.split(".")[-2] if target.startswith("blk.") else target.split(".")[0]
        _add_tensor(w, target, values, Q.F32 if values.ndim == 1 else types.get(kind, Q.F32))
    _finish(w)


def _add_tensor(w, name: str, values: np.ndarray, qtype) -> None:
    if qtype == Q.F32:
        w.add_tensor(name, values)
    elif qtype == Q.F16:
        w.add_tensor(name, values.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# The tower's tensors as llama.cpp's converter names them (per block, then the merger's), by family.
_MMPROJ_BLOCK = {"norm1": "ln1", "norm2": "ln2", "attn.proj": "attn_out", "attn.qkv": "attn_qkv",
                 "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                 "mlp.gate_proj": "ffn_gate", "mlp.linear_fc1": "ffn_up", "mlp.linear_fc2": "ffn_down"}
_MMPROJ_MERGER = {"merger.ln_q": "v.post_ln", "merger.mlp.0": "mm.0", "merger.mlp.2": "mm.2", "merger.norm": "v.post_ln",
                  "merger.linear_fc1": "mm.0", "merger.linear_fc2": "mm.2"}
_DEEPSTACK_PARTS = {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"}
_PROJECTOR_TYPES = {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger", "qwen3_vl": "qwen3vl_merger",
                    "qwen3_vl_moe": "qwen3vl_merger", "qwen3_5": "qwen3vl_merger", "qwen3_5_moe": "qwen3vl_merger"}


def mmproj_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A vision-language model's tower as llama.cpp's converter writes it into an mmproj file: the Conv3d patch
    embedding as two Conv2d kernels (one per frame), Qwen2/2.5-VL's qkv split into q, k, v (Qwen3-VL's kept), the
    merger as v.post_ln / mm.0 / mm.2, DeepStack mergers numbered by the block they tap."""
    vcfg = model.config.vision_config
    split_qkv = model.config.model_type in ("qwen2_vl", "qwen2_5_vl")
    taps = list(getattr(vcfg, "deepstack_visual_indexes", None) or [])
    out: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith("model.visual."):
            continue
        values, local = tensor.float().numpy(), name[len("model.visual."):]
        module, _, attr = local.rpartition(".")
        if local == "patch_embed.proj.weight":  # [out, C, 2, P, P]
            out["v.patch_embd.weight"], out["v.patch_embd.weight.1"] = values[:, :, 0], values[:, :, 1]
        elif local == "patch_embed.proj.bias":
            out["v.patch_embd.bias"] = values
        elif local == "pos_embed.weight":
            out["v.position_embd.weight"] = values
        elif local.startswith("blocks."):
            _, block, part = module.split(".", 2)
            if part == "attn.qkv" and split_qkv:
                for kind, piece in zip("qkv", np.split(values, 3), strict=True):
                    out[f"v.blk.{block}.attn_{kind}.{attr}"] = piece
            else:
                out[f"v.blk.{block}.{_MMPROJ_BLOCK[part]}.{attr}"] = values
        elif local.startswith("deepstack_merger_list."):
            _, k, part = module.split(".", 2)
            out[f"v.deepstack.{taps[int(k)]}.{_DEEPSTACK_PARTS[part]}.{attr}"] = values
        else:
            out[f"{_MMPROJ_MERGER[module]}.{attr}"] = values
    return out


def write_mmproj(model: torch.nn.Module, path, qtype=Q.F32, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)) -> None:
    """A vision-language model's tower as an mmproj file, with the metadata llama.cpp's converter writes
    (`clip.*`); matrices and patch kernels stored as `qtype` (F32, F16 or a block type), vectors and the position
    table as F32. Checked by hand against the converter's own output (tests/test_gguf_vision.py)."""
    cfg, vcfg = model.config, model.config.vision_config
    family = cfg.model_type
    qwen2 = family in ("qwen2_vl", "qwen2_5_vl")
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_file_type(0 if qtype == Q.F32 else 1)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.projection_dim", cfg.text_config.hidden_size)
    w.add_uint32("clip.vision.image_size", 560 if qwen2 else int(vcfg.num_position_embeddings ** 0.5 * vcfg.patch_size))
    w.add_uint32("clip.vision.patch_size", vcfg.patch_size)
    if family == "qwen2_vl":  # the converter's quirk: Qwen2-VL's feed_forward_length is the LLM's width
        w.add_uint32("clip.vision.embedding_length", vcfg.embed_dim)
        w.add_uint32("clip.vision.feed_forward_length", vcfg.hidden_size)
    else:
        w.add_uint32("clip.vision.embedding_length", vcfg.hidden_size)
        w.add_uint32("clip.vision.feed_forward_length", vcfg.intermediate_size)
    w.add_uint32("clip.vision.block_count", vcfg.depth)
    w.add_uint32("clip.vision.attention.head_count", vcfg.num_heads)
    w.add_array("clip.vision.image_mean", list(image_mean))
    w.add_array("clip.vision.image_std", list(image_std))
    w.add_string("clip.projector_type", _PROJECTOR_TYPES[family])
    if family == "qwen2_5_vl":
        w.add_bool("clip.use_silu", True)
        w.add_uint32("clip.vision.n_wa_pattern", vcfg.fullatt_block_indexes[0] + 1)
    if not qwen2:
        w.add_bool("clip.use_gelu", True)
        w.add_uint32("clip.vision.spatial_merge_size", vcfg.spatial_merge_size)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", cfg.text_config.rms_norm_eps)
    if not qwen2:
        taps = set(getattr(vcfg, "deepstack_visual_indexes", None) or [])
        w.add_array("clip.vision.is_deepstack_layers", [i in taps for i in range(vcfg.depth)])
    for name, values in mmproj_tensors(model).items():
        _add_tensor(w, name, values, Q.F32 if values.ndim == 1 or name == "v.position_embd.weight" else qtype)
    _finish(w)


def ollama_tower(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A vision-language model's tower under the names of ollama's published files (what its translation layer
    renames for llama.cpp): q, k, v apart; Qwen2.5-VL's patch kernels per frame (v.patch_embd_0 / _1), ln1 / ln2,
    ffn_*, v.merger.ln_q / mlp.*; Qwen3-VL's and Qwen3.5's Conv3d kept whole with out and in channels flattened
    together (v.patch_embed.weight), norm1 / norm2, mlp.linear_fc*, v.pos_embed, v.merger.norm / linear_fc*,
    v.deepstack_merger.K (K: the place in the list)."""
    qwen25 = model.config.model_type == "qwen2_5_vl"
    out: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith("model.visual."):
            continue
        values, local = tensor.float().numpy(), name[len("model.visual."):]
        if local == "patch_embed.proj.weight":  # [out, C, 2, P, P]
            if qwen25:
                out["v.patch_embd_0.weight"], out["v.patch_embd_1.weight"] = values[:, :, 0], values[:, :, 1]
            else:
                out["v.patch_embed.weight"] = values.reshape(-1, *values.shape[2:])
            continue
        if ".attn.qkv." in local:
            for kind, piece in zip("qkv", np.split(values, 3), strict=True):
                out["v." + local.replace("blocks.", "blk.").replace("attn.qkv", f"attn_{kind}")] = piece
            continue
        renamed = "v." + local
        for old, new in (("blocks.", "blk."), ("attn.proj", "attn_out"), ("patch_embed.proj", "patch_embed"),
                         ("deepstack_merger_list", "deepstack_merger")):
            renamed = renamed.replace(old, new)
        if qwen25:
            for old, new in (("norm1", "ln1"), ("norm2", "ln2"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                             ("mlp.down_proj", "ffn_down")):
                renamed = renamed.replace(old, new)
        out[renamed] = values
    return out


def ollama_vision_kv(w, model: torch.nn.Module, arch: str) -> None:
    """The `<arch>.vision.*` metadata of ollama's published vision files."""
    v = model.config.vision_config
    w.add_uint32(f"{arch}.vision.block_count", v.depth)
    w.add_uint32(f"{arch}.vision.embedding_length", v.hidden_size)
    w.add_uint32(f"{arch}.vision.attention.head_count", v.num_heads)
    w.add_uint32(f"{arch}.vision.num_channels", v.in_channels)
    w.add_uint32(f"{arch}.vision.patch_size", v.patch_size)
    w.add_uint32(f"{arch}.vision.spatial_merge_size", v.spatial_merge_size)
    if arch == "qwen25vl":
        w.add_uint32(f"{arch}.vision.window_size", v.window_size)
        w.add_float32(f"{arch}.vision.attention.layer_norm_epsilon", 1e-6)
        w.add_float32(f"{arch}.vision.rope.freq_base", 10000.0)
        w.add_array(f"{arch}.vision.fullatt_block_indexes", list(v.fullatt_block_indexes))
        w.add_uint32(f"{arch}.vision.temporal_patch_size", v.temporal_patch_size)
    elif arch.startswith("qwen3vl"):
        w.add_uint32(f"{arch}.vision.temporal_patch_size", v.temporal_patch_size)
        w.add_float32(f"{arch}.vision.rope.freq_base", 10000.0)
        w.add_float32(f"{arch}.vision.attention.layer_norm_epsilon", 1e-6)
        w.add_array(f"{arch}.vision.deepstack_visual_indexes", list(v.deepstack_visual_indexes))
        w.add_uint32(f"{arch}.vision.shortest_edge", 65536)
        w.add_uint32(f"{arch}.vision.longest_edge", 16777216)
        w.add_array(f"{arch}.vision.image_mean", [0.5, 0.5, 0.5])
        w.add_array(f"{arch}.vision.image_std", [0.5, 0.5, 0.5])
    else:  # qwen35, qwen35moe
        w.add_uint32(f"{arch}.image_token_id", model.config.image_token_id)
