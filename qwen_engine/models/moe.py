"""The mixture of experts of Qwen2-MoE and Qwen3-MoE, which replaces the MLP in their sparse layers.

A router (`gate`, a linear layer with one output per expert) scores every expert for each token; the softmax of
those scores, taken in float32, picks the top k experts, whose SwiGLU outputs are summed with those
probabilities as weights (renormalised to sum to one over the k chosen when the config says so). Qwen2-MoE adds
a shared expert that every token runs, scaled by sigmoid(shared_expert_gate(x)).

Experts are ordinary SwiGLU modules named as in the checkpoints (`experts.{j}.gate_proj`, …), so the loaders,
the GGUF blocks and the bfloat16 kernels treat them like any other linear layer. Tokens are grouped by expert:
one product per expert that any token chose, in expert order, as the reference accumulates them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import SwiGLU


class ExpertMixture(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.top_k, self.norm_topk_prob = moe.experts_per_token, moe.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(cfg.hidden_size, moe.expert_intermediate_size) for _ in range(moe.num_experts)
        )
        if moe.shared_expert_intermediate_size:
            self.shared_expert: SwiGLU | None = SwiGLU(cfg.hidden_size, moe.shared_expert_intermediate_size)
            self.shared_expert_gate: nn.Linear | None = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [tokens, k] in x's dtype, expert ids [tokens, k]) for x [tokens, hidden]."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(flat)
        if flat.shape[0] == 1:
            out = self._one_token(flat, weights[0], chosen[0])
        else:
            out = self._grouped(flat, weights, chosen)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view_as(x)

    def _one_token(self, flat: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        # A single-sequence decode step: no gathering or scattering, the chosen experts in ascending order.
        # (Stacking the chosen experts' gate/up products into one kernel call measured no faster.)
        out = torch.zeros_like(flat)
        for expert, weight in sorted(zip(chosen.tolist(), weights.tolist(), strict=True)):
            out.add_(self.experts[expert](flat), alpha=weight)
        return out

    def _grouped(self, flat: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        # Sort the (token, slot) choices by expert so each expert's tokens are one contiguous run.
        order = chosen.flatten().argsort(stable=True)
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        flat_weights = weights.flatten()
        out = torch.zeros_like(flat)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            picks = order[start : start + count]
            start += count
            tokens = picks // self.top_k
            y = self.experts[expert](flat[tokens]) * flat_weights[picks, None]
            out.index_add_(0, tokens, y)
        return out



def named_swiglus(mlp: nn.Module, prefix: str) -> list[tuple[str, SwiGLU]]:
    """The SwiGLU MLPs a layer's `mlp` (named `prefix`) is made of, with their names: itself, or a mixture's
    experts and shared expert (not its router or shared-expert gate)."""
    if not isinstance(mlp, ExpertMixture):
        return [(prefix, mlp)]
    named = [(f"{prefix}.experts.{j}", expert) for j, expert in enumerate(mlp.experts)]
    return named + ([(f"{prefix}.shared_expert", mlp.shared_expert)] if mlp.shared_expert is not None else [])


def swiglus(mlp: nn.Module) -> list[SwiGLU]:
    """The SwiGLU MLPs a layer's `mlp` is made of: itself, or a mixture's experts and shared expert."""
    return [swiglu for _, swiglu in named_swiglus(mlp, "mlp")]
