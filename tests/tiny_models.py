"""Small random Qwen2 / Qwen3 (and their MoE) checkpoints built and saved by `transformers`, for parity tests.

Weights are drawn more strongly than the default init (N(0, 0.1), norms 1 + N(0, 0.1)): with the default,
attention is nearly uniform and real bugs move the logits by only ~5e-3 (shared/design/oracle.md §9).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VOCAB = 151936  # the real size, so the real tokenizer's special ids fit


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(1.0 + noise if "norm" in name else noise)


def build_tiny(
    arch: str,
    folder: Path,
    *,
    tokenizer_dir: Path,
    yarn: bool = False,
    legacy_config: bool = False,
    shard: bool = False,
    seed: int = 0,
    bfloat16: bool = False,
    dense_layers: tuple[int, ...] = (1,),
    expert_widths: tuple[int, int] = (48, 80),
) -> torch.nn.Module:
    """Save a tiny `arch` ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "qwen3_5" or "qwen3_5_moe") model into `folder`; return the reference model (eager, fp32).
    `bfloat16`: saved in bfloat16, as Qwen publishes its checkpoints; the reference is then transformers loading
    that checkpoint in float32. `dense_layers`: the MoE layers that keep a dense MLP; `expert_widths`: the experts'
    and the shared expert's intermediate sizes."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": 1_000_000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0, "original_max_position_embeddings": 32}
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_parameters=rope,
        bos_token_id=151643, eos_token_id=151645,
    )
    # Mixtures of experts: 6 experts of width 48 (hidden ≠ 2·48, so a transposed expert layout could not pass),
    # 2 chosen per token; `dense_layers` keep a dense MLP (mlp_only_layers) so both kinds of layer are covered.
    width, shared_width = expert_widths
    moe = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=width, decoder_sparse_step=1,
               mlp_only_layers=list(dense_layers))
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, **moe, head_dim=32, norm_topk_prob=True, tie_word_embeddings=False)
        cls = transformers.Qwen3MoeForCausalLM
    elif arch in ("qwen3_5", "qwen3_5_moe"):
        # Qwen3.5's hybrid layout: gated-DeltaNet layers 0 and 2 around softmax-attention layers 1 and 3 (4 layers).
        # Key and value heads of different counts and widths, so a transposed state or grouping cannot pass;
        # a quarter of each attention head rotated (rotary_dim 8).
        common = {**common, "num_hidden_layers": 4,
                  "rope_parameters": {**rope, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1]}}
        hybrid = dict(head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                      linear_value_head_dim=24, linear_conv_kernel_dim=4, tie_word_embeddings=False,
                      layer_types=["linear_attention", "full_attention"] * 2)
        if arch == "qwen3_5":
            cfg = transformers.Qwen3_5TextConfig(**common, **hybrid)
            cls = transformers.Qwen3_5ForCausalLM
        else:
            cfg = transformers.Qwen3_5MoeTextConfig(
                **{k: v for k, v in common.items() if k != "intermediate_size"}, **hybrid,
                num_experts=6, num_experts_per_tok=2, moe_intermediate_size=width,
                shared_expert_intermediate_size=shared_width)
            cls = transformers.Qwen3_5MoeForCausalLM
    elif arch == "qwen3_next":  # Qwen3.5's hybrid layers with fused projections, and a MoE with a dense layer 1
        common = {**common, "num_hidden_layers": 4,
                  "rope_parameters": {**rope, "partial_rotary_factor": 0.25}}
        cfg = transformers.Qwen3NextConfig(
            **common, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=24, linear_conv_kernel_dim=4, tie_word_embeddings=False,
            layer_types=["linear_attention", "full_attention"] * 2, **moe, shared_expert_intermediate_size=shared_width,
            norm_topk_prob=True)
        cls = transformers.Qwen3NextForCausalLM
    elif arch == "qwen2_moe":  # Qwen1.5/Qwen2-MoE: q/k/v biases, a shared expert, weights not renormalised
        cfg = transformers.Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=shared_width, norm_topk_prob=False,
                                          tie_word_embeddings=False)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    perturb(model, seed)
    if arch.startswith("qwen3_5") or arch == "qwen3_next":  # its RMSNorms scale by 1 + w: draw w around 0, not around 1
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight") and "linear_attn.norm" not in name:
                    param.sub_(1.0)
    if arch.endswith("_moe"):  # routers drawn wider (std 0.5): fewer near-ties between the k-th and next expert
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.mul_(5)
    model.eval()
    model.to(torch.bfloat16 if bfloat16 else torch.float32).save_pretrained(
        folder, max_shard_size="4MB" if shard else "2GB")
    if bfloat16:
        model = cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    if legacy_config:
        # The spelling of checkpoints on the Hub: rope_theta at the top, rope_scaling with "type".
        path = folder / "config.json"
        data = json.loads(path.read_text())
        params = data.pop("rope_parameters")
        data["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type")
        data["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
        path.write_text(json.dumps(data, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return model


def reference_greedy(ref: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    """`tokens` greedy tokens from transformers' own generate (its KV cache), eos ignored."""
    with torch.inference_mode():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    return out[0, len(prompt):].tolist()


def engine_greedy(llm, prompt: list[int], tokens: int) -> list[int]:
    """`tokens` greedy tokens through our engine (paged KV cache, native decode steps), eos ignored."""
    from qwen_engine import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, repetition_penalty=1.0)
    seq = llm.engine.add_request(prompt, params.with_defaults(llm.default_params))
    while not seq.finished:
        llm.engine.step()
    return seq.output_ids
