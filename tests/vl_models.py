"""Small random Qwen2-VL / Qwen2.5-VL / Qwen3-VL (and Qwen3-VL-MoE) and Qwen3.5 checkpoints built and saved by `transformers`, for parity tests.

Structural features are kept (shared/design/oracle.md §1): Qwen2.5-VL window attention with full-attention
blocks (a 320x240 image gives 3x3 windows), Qwen3-VL DeepStack (features into LLM layers 0..2), learned position
embeddings (48x48, resampled) and interleaved M-RoPE. Weights are perturbed (N(0, 0.1), norm weights
1 + N(0, 0.1)) so position and attention bugs move the logits well past the tolerance (oracle.md §9).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VOCAB = 151936
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    bos_token_id=151643,
    eos_token_id=151645,
)
VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=64, hidden_size=64, mlp_ratio=2, num_heads=4),
    "qwen2_5_vl": dict(
        depth=4, hidden_size=64, intermediate_size=96, out_hidden_size=64, num_heads=4, window_size=112,
        fullatt_block_indexes=[1, 3], tokens_per_second=2,
    ),
    "qwen3_vl": dict(
        depth=4, hidden_size=64, intermediate_size=96, out_hidden_size=64, num_heads=4, patch_size=16,
        num_position_embeddings=2304, deepstack_visual_indexes=[1, 2, 3],
    ),
}
ROPE = {
    "qwen2_vl": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
    "qwen2_5_vl": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
    "qwen3_vl": {
        "rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True,
    },
}
VISION["qwen3_vl_moe"], ROPE["qwen3_vl_moe"] = VISION["qwen3_vl"], ROPE["qwen3_vl"]
# Qwen3.5: Qwen3-VL's tower without DeepStack over the hybrid decoder (gated-DeltaNet layers 0 and 2), half of
# each attention head rotated (16 of 32: 8 pairs in sections 3, 3, 2, interleaved).
VISION["qwen3_5"] = {k: v for k, v in VISION["qwen3_vl"].items() if k != "deepstack_visual_indexes"}
ROPE["qwen3_5"] = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [3, 3, 2],
                   "mrope_interleaved": True, "partial_rotary_factor": 0.5}
HYBRID = dict(num_hidden_layers=4, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
              linear_key_head_dim=16, linear_value_head_dim=24, linear_conv_kernel_dim=4,
              layer_types=["linear_attention", "full_attention"] * 2)
# Qwen3-VL-MoE's text side: 6 experts of width 48 (hidden 64 ≠ 2·48, so the two fused layouts differ in shape).
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[])
IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            is_norm_weight = name.endswith("weight") and ("norm" in name or "ln_q" in name)
            param.copy_(1.0 + noise if is_norm_weight else noise)


def build_vl(family: str, folder: Path, tokenizer_dir: Path, hub_config: bool = False, seed: int = 0,
             bfloat16: bool = False):
    """Save a tiny `family` model into `folder` (with the real Qwen tokenizer); return the reference (eager).
    `bfloat16`: saved in bfloat16; the reference is transformers loading that checkpoint in float32."""
    import transformers

    text = dict(TEXT, rope_parameters=ROPE[family])
    if family == "qwen3_5":
        cfg = transformers.Qwen3_5Config(text_config=dict(text, **HYBRID), vision_config=VISION[family], **IDS)
        cls = transformers.Qwen3_5ForConditionalGeneration
    elif family == "qwen3_vl_moe":
        cfg = transformers.Qwen3VLMoeConfig(text_config=dict(text, head_dim=32, **MOE), vision_config=VISION[family],
                                            **IDS)
        cls = transformers.Qwen3VLMoeForConditionalGeneration
    elif family == "qwen3_vl":
        text["head_dim"] = 32
        cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=VISION[family], **IDS)
        cls = transformers.Qwen3VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=VISION[family], **IDS)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=VISION[family], **IDS)
        cls = transformers.Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    perturb(model, seed + 1)
    if family == "qwen3_5":  # its decoder's RMSNorms scale by 1 + w: draw w around 0
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "language_model" in name and name.endswith("norm.weight") and "linear_attn.norm" not in name:
                    param.sub_(1.0)
    if family == "qwen3_vl_moe":  # routers drawn wider (std 0.5): fewer near-ties between the k-th and next expert
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.mul_(5)
    model.eval()
    model.to(torch.bfloat16 if bfloat16 else torch.float32).save_pretrained(folder)
    if bfloat16:
        model = cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    if hub_config:
        _to_hub_config(folder / "config.json", family)
        if family == "qwen3_vl_moe":
            _to_hub_experts(folder)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, folder / name)
    # The Qwen3 tokenizer's config carries Qwen3's text chat template; a VL folder needs the VL one (here the
    # built-in fallback), so leave the template out.
    tok_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return model


def _to_hub_config(path: Path, family: str) -> None:
    """Rewrite transformers 5's config in the spelling of released checkpoints: Qwen2/2.5-VL keep the text keys
    at the top level with rope_theta + rope_scaling {"type": "mrope"}; Qwen3-VL nests text_config with
    rope_theta + rope_scaling {"rope_type": "default", "mrope_section", "mrope_interleaved"}."""
    data = json.loads(path.read_text())
    text = data.pop("text_config")
    text.pop("model_type")  # the top level keeps the VL model_type (qwen2_5_vl), as released configs have it
    params = text.pop("rope_parameters")
    text["rope_theta"] = params.pop("rope_theta")
    params.pop("rope_type", None)
    if family.startswith("qwen3_vl"):
        text["rope_scaling"] = {"rope_type": "default", **params}
        data["text_config"] = text
    else:
        text["rope_scaling"] = {"type": "mrope", **params}
        data.update(text)
    path.write_text(json.dumps(data, indent=2))


def _to_hub_experts(folder: Path) -> None:
    """Rewrite the fused experts in the layout of released Qwen3-VL-MoE files: transformers 5 saves
    gate_up_proj [E, 2I, H] and down_proj [E, H, I]; the Hub holds [E, H, 2I] and [E, I, H]."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    for name in list(tensors):
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    data = json.loads((folder / "config.json").read_text())
    data["transformers_version"] = "4.57.1"
    (folder / "config.json").write_text(json.dumps(data, indent=2))
