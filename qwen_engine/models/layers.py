"""Building blocks shared by the Qwen decoders: RMSNorm, rotary tables, the SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            native = kernels.native() if x.device.type == "cpu" else None
            if native is not None:  # one pass over x (F.rms_norm dispatches ~6 ops on the CPU)
                return native.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in float32 whatever the weights' dtype: bf16/fp16 variance loses too much precision. The
        # weight multiplies after the cast back, as in the reference.
        dtype = x.dtype
        native = kernels.native() if x.device.type == "cpu" else None
        if native is not None and dtype == self.weight.dtype == torch.bfloat16 and native.bf16_kernels():
            return native.rms_norm_bf16(x, self.weight, self.eps)  # the same roundings, one pass, no copies
        x = x.float()
        if native is not None:  # one pass instead of pow, mean, rsqrt and a product over float32 copies
            x = native.rms_norm(x, torch.ones(x.shape[-1]), self.eps)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class ZeroCenteredRMSNorm(nn.Module):
    """Qwen3.5's RMSNorm: the checkpoint stores w with the scale being 1 + w, applied in float32 before the
    cast back (not after it, as RMSNorm does for bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.weight.float()
        native = kernels.native() if x.device.type == "cpu" else None
        if native is not None:
            return native.rms_norm(x.float(), scale, self.eps).to(x.dtype)
        return F.rms_norm(x.float(), scale.shape, scale, self.eps).to(x.dtype)


def make_norm(dim: int, eps: float, zero_centered: bool) -> nn.Module:
    return ZeroCenteredRMSNorm(dim, eps) if zero_centered else RMSNorm(dim, eps)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up stacked (set by weights/quantized.py)
        self.intermediate = intermediate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
            native = kernels.native() if gate_up.device.type == "cpu" and gate_up.dtype == torch.float32 else None
            if native is not None:
                return self.down_proj(native.silu_mul(gate_up.view(-1, 2 * self.intermediate)).view(*x.shape[:-1], -1))
            gate, up = gate_up.split(self.intermediate, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for each rotated pair, and the factor cos/sin are scaled by (YaRN's attention factor)."""
    # Always on the CPU (also inside the loader's meta-device context, where these ops would import torch._dynamo).
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    base_freqs = rope.theta**exponents
    if rope.kind == "default":
        return 1.0 / base_freqs, 1.0
    # YaRN: keep high-frequency pairs (short wavelengths) as trained, divide low-frequency ones by `factor`,
    # and blend linearly in between; the band edges are the pairs that turn beta_fast / beta_slow times
    # over the original context.
    factor, original = rope.factor, rope.original_max_position or 32768

    def pair_for_rotations(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = pair_for_rotations(rope.beta_fast), pair_for_rotations(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the trained frequency is kept (extrapolation), 0 where it is interpolated
    inv_freq = (1.0 / (factor * base_freqs)) * (1 - keep) + (1.0 / base_freqs) * keep

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attention = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
        attention = mscale(factor)
    return inv_freq, attention


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, computed once up to a length and extended on demand."""

    def __init__(self, rope: RopeConfig, head_dim: int, initial_length: int = 4096):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inverse_frequencies(rope, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.initial_length = initial_length
        # M-RoPE: which position axis (0 time, 1 height, 2 width) drives each of the head_dim angles.
        axis = mrope_axes(rope, head_dim)
        self.register_buffer("axis", axis, persistent=False)

    def _build(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(positions, self.inv_freq.float())
        angles = torch.cat([freqs, freqs], dim=-1)
        self.cos = angles.cos() * self.attention_scaling
        self.sin = angles.sin() * self.attention_scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [tokens, head_dim] for positions [tokens], or [3, tokens] (time, height, width) with M-RoPE."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if self.cos.shape[0] < needed:
            self._build(max(needed, self.initial_length, 2 * self.cos.shape[0]))
        if positions.dim() == 1:  # text: all three axes equal, which is plain rotary
            return self.cos[positions].to(dtype), self.sin[positions].to(dtype)
        if self.axis.numel() == 0:
            raise ValueError("3-D positions given to a model without M-RoPE")
        # Look up each axis' table, then take each angle from the axis it belongs to.
        select = self.axis[None, None, :].expand(1, positions.shape[1], -1)
        cos = self.cos[positions].gather(0, select)[0]
        sin = self.sin[positions].gather(0, select)[0]
        return cos.to(dtype), sin.to(dtype)


def mrope_axes(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """The position axis of each rotary angle ([head_dim] int64; empty without M-RoPE).

    Contiguous (Qwen2-VL, 2.5-VL): the first sections[0] frequency pairs follow time, the next sections[1]
    height, the rest width. Interleaved (Qwen3-VL): pairs cycle t, h, w, t, h, w… while each axis has pairs
    left, and the tail goes to time. The angle table is [freqs, freqs], so the pattern repeats once.
    """
    if rope.mrope_section is None:
        return torch.empty(0, dtype=torch.long)
    t, h, w = rope.mrope_section
    half = head_dim // 2
    if rope.mrope_interleaved:
        axis = torch.zeros(half, dtype=torch.long)
        index = torch.arange(half)
        axis[(index % 3 == 1) & (index < 3 * h)] = 1
        axis[(index % 3 == 2) & (index < 3 * w)] = 2
    else:
        axis = torch.cat([torch.full((n,), a, dtype=torch.long) for a, n in enumerate((t, h, w))])
    return torch.cat([axis, axis])


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary, done in place by the native kernel when it can (x is then modified: pass a tensor you own)."""
    native = kernels.native() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if native is None or x.stride(-1) != 1 or cos.dtype != torch.float32:
        return apply_rotary(x, cos, sin)
    native.rotary_(x, cos, sin)
    return x


def rotate_in_float32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x rotated in float32 and returned in its own dtype, as the vision reference does for bf16 towers; in place
    by a native kernel where there is one (x is then modified: pass a tensor you own)."""
    native = kernels.native() if x.device.type == "cpu" else None
    if native is not None and x.dtype == torch.bfloat16 and x.stride(-1) == 1 and cos.dtype == torch.float32:
        native.rotary_(x, cos, sin)
        return x
    return rotate(x.float(), cos, sin).to(x.dtype)


def rotate_partly(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotate` where the tables may cover only the first values of each head (Qwen3.5 rotates a quarter of
    them); the rest pass through unchanged."""
    width = cos.shape[-1]
    if width == x.shape[-1]:
        return rotate(x, cos, sin)
    out = x.clone()
    out[..., :width] = rotate(out[..., :width], cos, sin)  # (in place where the native kernel takes it)
    return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [tokens, heads, head_dim] by per-token angles; pairs are (i, i + head_dim/2) as in Qwen."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
