"""Qwen3.5's linear attention: a gated DeltaNet layer and the delta rule it runs.

Instead of keeping every past key and value, each value head keeps one matrix S [key_dim, value_dim] that
every token updates and reads:

    S ← α·S                       decay, α = exp(g) in (0, 1], chosen per token and head
    S ← S + k ⊗ β·(v − Sᵀk)       delta rule: write only what S does not already predict for k, at rate β
    o = Sᵀq

q and k are L2-normalised (q also by 1/√key_dim). Before that, q/k/v pass a causal depthwise convolution of
width `conv_kernel` with SiLU, so a sequence carries two pieces of state between steps: S, and the last
conv_kernel − 1 inputs of the convolution. The output is RMS-normalised per head, multiplied by SiLU(z) of a
gate projection, and projected back to the hidden size.

A prompt runs the same recurrence a chunk of tokens at a time (`chunked_delta_rule`): within a chunk the
updates reduce to one triangular solve and a few products, which is what makes prefill fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig

CHUNK = 64  # tokens per chunk of the chunked form


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, then × SiLU(gate); the weight multiplies in the input's type, as in the
    reference."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed.to(dtype) * F.silu(gate.float())).to(dtype)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def recurrent_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         state: torch.Tensor) -> torch.Tensor:
    """One token per sequence: q, k [B, H, Dk]; v [B, H, Dv]; g, beta [B, H]; state [B, H, Dk, Dv], updated in
    place. Returns o [B, H, Dv]. Everything float32. The native kernel does the same in two passes over S."""
    native = kernels.native() if state.device.type == "cpu" else None
    if native is not None and hasattr(native, "delta_rule_step_") and state.is_contiguous():
        return native.delta_rule_step_(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                       beta.contiguous(), state)
    return reference_delta_rule_step(q, k, v, g, beta, state)


def reference_delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                              beta: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """`recurrent_delta_rule` in PyTorch operations (the reference of the native kernel)."""
    state.mul_(g.exp()[..., None, None])
    predicted = torch.einsum("bhkv,bhk->bhv", state, k)
    state.add_(k[..., :, None] * ((v - predicted) * beta[..., None])[..., None, :])
    return torch.einsum("bhkv,bhk->bhv", state, q)


def chunked_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       state: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """The recurrence over T tokens of one sequence: q, k [H, T, Dk]; v [H, T, Dv]; g, beta [H, T];
    state [H, Dk, Dv], updated in place. Returns o [H, T, Dv]. Everything float32.

    In a chunk starting from state S0, with decay Γi = exp(g1 + … + gi) since the chunk's start, the values the
    rule writes, u, solve a lower-triangular system:  u_i + Σ_{j<i} βi·(Γi/Γj)·(ki·kj)·u_j = βi·(vi − Γi·S0ᵀki).
    Then o_i = Γi·S0ᵀqi + Σ_{j≤i} (Γi/Γj)·(qi·kj)·u_j, and the chunk ends at S = Γc·S0 + Σ_j (Γc/Γj)·kj ⊗ u_j.
    """
    heads, length, _ = q.shape
    out = v.new_empty(heads, length, v.shape[-1])
    native = kernels.native() if q.device.type == "cpu" and q.dtype == torch.float32 else None
    solve = getattr(native, "unit_lower_solve", None)
    # (else each product copies its chunk, and the products' layouts follow these views')
    q, k, v, g, beta = q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous()
    for start in range(0, length, chunk):
        stop = min(length, start + chunk)
        qc, kc, vc, bc = q[:, start:stop], k[:, start:stop], v[:, start:stop], beta[:, start:stop, None]
        log_decay = g[:, start:stop].cumsum(-1)  # [H, C]
        decay = log_decay.exp()
        # (Γi/Γj) for j ≤ i, else 0; the exponent is masked before exp so no entry overflows.
        n = stop - start
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        relative = (log_decay[:, :, None] - log_decay[:, None, :]).masked_fill(~causal, float("-inf")).exp()
        strictly = relative.masked_fill(torch.eye(n, dtype=torch.bool, device=q.device), 0.0)
        lower = bc * (kc @ kc.transpose(1, 2)) * strictly
        known = bc * (vc - decay[..., None] * (kc @ state))
        if solve is not None:
            written = solve(lower.contiguous(), known.contiguous())
        else:
            system = torch.eye(n, device=q.device) + lower
            written = torch.linalg.solve_triangular(system, known, upper=False, unitriangular=True)
        out[:, start:stop] = decay[..., None] * (qc @ state) + ((qc @ kc.transpose(1, 2)) * relative) @ written
        to_end = (log_decay[:, -1:] - log_decay).exp()  # Γc/Γj
        state.mul_(decay[:, -1, None, None]).add_((kc * to_end[..., None]).transpose(1, 2) @ written)
    return out


class GatedDeltaNet(nn.Module):
    """The token mixer of Qwen3.5's linear-attention layers; parameter names follow the checkpoints.
    `index` is this layer's place among the linear-attention layers (its row in the recurrent state pool)."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        lin = cfg.linear_attention
        self.index = index
        self.num_k_heads, self.num_v_heads = lin.num_key_heads, lin.num_value_heads
        self.k_dim, self.v_dim = lin.key_head_dim, lin.value_head_dim
        self.key_size, self.value_size = lin.num_key_heads * lin.key_head_dim, lin.num_value_heads * lin.value_head_dim
        self.kernel = lin.conv_kernel
        self.tiled = lin.tiled_value_heads
        channels = lin.conv_channels
        self.in_proj_qkv = nn.Linear(cfg.hidden_size, channels, bias=False)
        self.in_proj_z = nn.Linear(cfg.hidden_size, self.value_size, bias=False)
        self.in_proj_b = nn.Linear(cfg.hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(cfg.hidden_size, self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(channels, channels, self.kernel, groups=channels, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads), requires_grad=False)
        self.norm = GatedRMSNorm(self.v_dim, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        """x [tokens, hidden], the batch's sequences packed; the cache knows which rows are whose."""
        states = cache.recurrent_for(x.shape[0])
        mixed, z, b, a = self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        conv_state, delta_state = states.layer(self.index)
        gated = x.new_empty(x.shape[0], self.value_size)
        singles = states.single_rows
        native = self._native_kernels(x, conv_state, delta_state)
        if singles is not None:  # sequences adding one token each: one batched update
            rows, slots = singles
            if native is not None:
                gated[rows] = native.deltanet_decode_(
                    mixed[rows].contiguous(), z[rows].contiguous(), b[rows].contiguous(), a[rows].contiguous(),
                    states.single_slots(), conv_state, delta_state,
                    self.conv1d.weight[:, 0].contiguous(), self.A_log.contiguous(), self.dt_bias.contiguous(),
                    self.norm.weight.contiguous(), self.norm.eps, self.num_k_heads, self.tiled)
            else:
                gated[rows] = self._decode_reference(mixed[rows], z[rows], b[rows], a[rows], slots, conv_state,
                                                     delta_state)
        weight = self.conv1d.weight[:, 0]  # [channels, kernel]
        for start, stop, slot in states.runs:  # prompt chunks, one sequence at a time
            beta, g = self._gates(b[start:stop], a[start:stop])
            if native is not None:  # convolution and SiLU in one pass, token-major
                features = native.causal_conv_silu_(mixed[start:stop].contiguous(), conv_state[slot],
                                                    weight.contiguous())
            else:
                piece = mixed[start:stop].T.to(conv_state.dtype)  # [channels, T]
                conv = torch.cat([conv_state[slot], piece], dim=-1)
                conv_state[slot] = conv[:, conv.shape[1] - (self.kernel - 1):]
                features = F.silu(F.conv1d(conv[None], weight[:, None].to(conv.dtype),
                                           groups=weight.shape[0])[0].float()).T
            q, k, v = self._heads(features)
            o = chunked_delta_rule(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), g.T, beta.T,
                                   delta_state[slot])
            gated[start:stop] = self._gated_norm(o.transpose(0, 1), z[start:stop])
        return self.out_proj(gated)

    def _native_kernels(self, x: torch.Tensor, conv_state: torch.Tensor, delta_state: torch.Tensor):
        """The native kernels, where they take this layer's steps (float32 on the CPU), else None."""
        if x.device.type != "cpu" or not all(t.dtype == torch.float32 for t in (x, conv_state, delta_state)):
            return None
        native = kernels.native()
        usable = (native is not None and hasattr(native, "deltanet_decode_") and hasattr(native, "causal_conv_silu_")
                  and conv_state.is_contiguous() and delta_state.is_contiguous()
                  and self.conv1d.weight.dtype == torch.float32)
        return native if usable else None

    def _decode_reference(self, mixed: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                          slots: torch.Tensor | slice, conv_state: torch.Tensor,
                          delta_state: torch.Tensor) -> torch.Tensor:
        """One token of each of B sequences in PyTorch operations: what the native deltanet_decode_ does."""
        beta, g = self._gates(b, a)
        weight = self.conv1d.weight[:, 0]
        conv = torch.cat([conv_state[slots], mixed[:, :, None].to(conv_state.dtype)], dim=-1)
        conv_state[slots] = conv[..., 1:]
        features = F.silu((conv * weight.to(conv.dtype)).sum(-1).float())
        q, k, v = self._heads(features)
        state = delta_state[slots]  # a view of the pool where the slots are consecutive, else a copy
        o = recurrent_delta_rule(q, k, v, g, beta, state)
        if not isinstance(slots, slice):
            delta_state[slots] = state
        return self._gated_norm(o, z)

    def _gates(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """β = σ(b) and the log decay g = −exp(A_log)·softplus(a + dt_bias), in float32."""
        beta = torch.sigmoid(b.float())
        return beta, -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())

    def _gated_norm(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """o [rows, Hv, Dv] float32 → the gated RMSNorm of each head, [rows, Hv·Dv] in z's type."""
        heads = o.reshape(-1, self.num_v_heads, self.v_dim).to(z.dtype)
        return self.norm(heads, z.reshape(-1, self.num_v_heads, self.v_dim)).reshape(o.shape[0], -1)

    def _heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[rows, channels] → q, k [rows, Hv, Dk] (normalised; each key head serves Hv/Hk value heads), v."""
        rows = features.shape[0]
        q, k, v = features.split([self.key_size, self.key_size, self.value_size], dim=-1)
        repeat = self.num_v_heads // self.num_k_heads
        q = l2_normalise(q.reshape(rows, self.num_k_heads, self.k_dim)) * self.k_dim**-0.5
        k = l2_normalise(k.reshape(rows, self.num_k_heads, self.k_dim))
        if repeat > 1 and self.tiled:  # value head j reads key head j mod Hk
            q, k = q.repeat(1, repeat, 1), k.repeat(1, repeat, 1)
        elif repeat > 1:  # value head j reads key head j div (Hv/Hk)
            q, k = q.repeat_interleave(repeat, dim=1), k.repeat_interleave(repeat, dim=1)
        return q, k, v.reshape(rows, self.num_v_heads, self.v_dim)

