"""The Qwen2, Qwen3 and Qwen3.5 decoders, and their mixture-of-experts variants.

All are pre-norm transformers with grouped-query attention, rotary positions and a SwiGLU MLP. Qwen2 has
biases on the q/k/v projections; Qwen3 has none but normalises each head of q and k (RMSNorm over head_dim)
before the rotation. Qwen2-MoE and Qwen3-MoE replace the MLP of their sparse layers by a mixture of experts
(models/moe.py). Qwen3.5 is hybrid: three layers in four mix tokens with a gated DeltaNet
(models/gated_deltanet.py), and its softmax-attention layers gate their output by sigmoid(gate), the gate coming
from q_proj alongside q, and rotate only part of each head. Tensors are packed token-major ([tokens, …]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .gated_deltanet import GatedDeltaNet
from .layers import RotaryEmbedding, SwiGLU, make_norm, rotate, rotate_partly
from .moe import ExpertMixture


class Attention(nn.Module):
    """`layer` is this layer's index among the softmax-attention layers: its place in the KV cache."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.output_gate = cfg.attention_output_gate
        q_out = 2 * q_size if self.output_gate else q_size  # per head: head_dim of q, then head_dim of gate
        self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)
        # Set by weights/quantized.py: q, k and v stacked into one layer (one kernel call per step).
        self.qkv_proj: nn.Module | None = None
        self.split_sizes = [q_out, kv_size, kv_size]
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg.head_dim, cfg.rms_norm_eps, cfg.zero_centered_norm)
            self.k_norm = make_norm(cfg.head_dim, cfg.rms_norm_eps, cfg.zero_centered_norm)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        tokens = x.shape[0]
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
            q, k, v = qkv.split(self.split_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.output_gate:
            q, gate = q.reshape(tokens, self.num_heads, 2 * self.head_dim).split(self.head_dim, dim=-1)
            q = self.q_norm(q.contiguous())
            k = self.k_norm(k.reshape(tokens, self.num_kv_heads, self.head_dim))
            q, k = rotate_partly(q, cos, sin), rotate_partly(k, cos, sin)
            v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
            out = cache.attend(self.layer, q, k, v) * torch.sigmoid(gate.reshape(tokens, -1))
            return self.o_proj(out)
        if self.q_norm is not None:
            q = self.q_norm(q.view(tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(tokens, self.num_kv_heads, self.head_dim))
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        elif self.qkv_proj is not None:
            # q and k sit side by side in the fused output: rotate them as one [tokens, heads_q + heads_kv] view.
            qk = qkv[:, : self.split_sizes[0] + self.split_sizes[1]].view(tokens, -1, self.head_dim)
            qk = rotate(qk, cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q = rotate(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
            k = rotate(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        return self.o_proj(cache.attend(self.layer, q, k, v))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        norm = cfg.zero_centered_norm
        self.input_layernorm = make_norm(cfg.hidden_size, cfg.rms_norm_eps, norm)
        linear = cfg.linear_attention
        if linear is not None and layer in linear.layers:
            self.linear_attn = GatedDeltaNet(cfg, sorted(linear.layers).index(layer))
        else:
            self.self_attn = Attention(cfg, cfg.attention_layers.index(layer))
        self.post_attention_layernorm = make_norm(cfg.hidden_size, cfg.rms_norm_eps, norm)
        if cfg.moe is not None and layer in cfg.moe.sparse_layers:
            self.mlp: nn.Module = ExpertMixture(cfg)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        h = self.input_layernorm(x)
        mixer = getattr(self, "self_attn", None)
        x = x + (mixer(h, cos, sin, cache) if mixer is not None else self.linear_attn(h, cache))
        return x + self.mlp(self.post_attention_layernorm(x))


class QwenModel(nn.Module):
    """Embeddings, decoder layers and final norm; parameter names follow the Hugging Face checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Given its (uninitialised) weight, Embedding skips its random init: the loader builds this model on
        # the meta device, where normal_() would pull in torch._dynamo (~1.5 s) for nothing.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centered_norm)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.rotary_dim)


@dataclass
class VisualRows:
    """Vision encoder output placed into a batch: these rows' embeddings are replaced by `embeds`, and (Qwen3-VL
    DeepStack) `deepstack[k]` is added to the same rows after decoder layer k."""

    rows: torch.Tensor  # int64 [n], indices into the batch's tokens
    embeds: torch.Tensor  # [n, hidden]
    deepstack: list[torch.Tensor] = field(default_factory=list)  # each [n, hidden]


class QwenForCausalLM(nn.Module):
    """The decoder with its LM head; vision-language checkpoints add `visual`, their vision encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = QwenModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Decode steps run natively (models/decode_step.py) unless this is False; built on the first such step.
        self.native_decode = True
        self._decode_step = None
        if cfg.vision is not None:
            from .vision import VisionConfig, VisionTransformer

            self.visual = VisionTransformer(VisionConfig.from_dict(cfg.vision.vision_config, cfg.vision.family))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache, visual: VisualRows | None = None
    ) -> torch.Tensor:
        """Hidden states [tokens, hidden] after the final norm. The caller commits the cache afterwards.
        `positions` is [tokens], or [3, tokens] (time, height, width) for M-RoPE."""
        x = self.model.embed_tokens(input_ids)
        if visual is not None:
            x = x.index_copy(0, visual.rows, visual.embeds.to(x.dtype))
        cos, sin = self.model.rotary(positions, x.dtype)
        decode_inputs = getattr(cache, "native_decode_inputs", None)
        if visual is None and decode_inputs is not None and self.native_decode:
            inputs = decode_inputs()
            step = self.decode_step() if inputs is not None else None
            if step is not None:
                return step.forward(x, cos, sin, *inputs)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache)
            if visual is not None and i < len(visual.deepstack):
                x = x.index_add(0, visual.rows, visual.deepstack[i].to(x.dtype))
        return self.model.norm(x)

    def decode_step(self):
        """The native decode step over this model's weights (None where it does not apply), built once."""
        if self._decode_step is None:
            from . import decode_step

            self._decode_step = decode_step.build(self) or False
        return self._decode_step or None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
