"""bfloat16 checkpoints run in float32: the linear weights stay in bfloat16 for the native kernels.

Qwen's Hugging Face checkpoints are published in bfloat16. Run in float32 (the default on CPU), every weight
widens to float32 exactly: a bfloat16 value is the top half of a float32. So the kernels can read the
bfloat16 weight itself as a ggml BF16 tensor (a QuantLinear) and compute the same numbers, up to the order of
the sums, from half the bytes: decode steps read half as much memory, and prefill and the vision towers run
their products on AMX tiles where the CPU has them (kernels/amx_linear.cpp, ~2x MKL's float32 here).

Only the text model's linear layers, its token embedding (and the output projection tied to it) and the
vision towers' linear layers are kept; norms, biases, convolutions and position tables become float32 as
before. In a vision tower, a linear layer whose input width the kernels cannot read (not a multiple of 16:
Qwen2.5-VL's 3420-wide MLP) gets zero columns up to a multiple of 32, and its input the same zeros
(PaddedLinear): the sums are unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import GGMLQuantizationType
from torch import nn

from ..models.quant import QuantEmbedding, QuantLinear, has_kernel
from .quantized import linear_bias, replace_module

BF16 = GGMLQuantizationType.BF16
PAD_TO = 32  # the AMX tiles' block (the kernels' BF16 rows need 16)


class PaddedLinear(QuantLinear):
    """A QuantLinear whose weight got zero columns up to a multiple of PAD_TO: x gets the same zeros. Only
    vision towers get these (the text model's layers are stacked and read by the native decode step as they are).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.unpadded = weight.shape[1]
        padded = torch.nn.functional.pad(weight, (0, -self.unpadded % PAD_TO))
        super().__init__([(padded.view(torch.uint8), BF16)], padded.shape[1], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.nn.functional.pad(x, (0, self.in_features - self.unpadded)))

    def dequantized(self) -> torch.Tensor:
        return super().dequantized()[:, : self.unpadded]


def can_keep(module_name: str, module: nn.Module, weight: torch.Tensor, pad: bool = False) -> bool:
    """Whether `weight` (as read from the checkpoint) of `module` can stay in bfloat16; `pad`: a width the
    kernels cannot read may be padded (PaddedLinear)."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return False
    readable = has_kernel(BF16, weight.shape[1])
    if isinstance(module, nn.Linear):
        return readable or pad
    return isinstance(module, nn.Embedding) and module_name == "model.embed_tokens" and readable


def keep(model: nn.Module, weights: dict[str, torch.Tensor], path: Path | None = None) -> None:
    """Put QuantLinear / QuantEmbedding over the kept bfloat16 `weights` (module name → weight) in `model`."""
    for module_name, weight in weights.items():
        old = model.get_submodule(module_name)
        weight = weight.contiguous()
        if isinstance(old, nn.Embedding):
            new: nn.Module = QuantEmbedding(weight.view(torch.uint8), BF16, weight.shape[1])
        elif has_kernel(BF16, weight.shape[1]):
            new = QuantLinear([(weight.view(torch.uint8), BF16)], weight.shape[1], linear_bias(old, module_name, path))
        else:
            new = PaddedLinear(weight, linear_bias(old, module_name, path))
        replace_module(model, module_name, new)


def keep_linears(model: nn.Module) -> int:
    """Every float32 nn.Linear of `model` whose weight is exactly bfloat16 (a bfloat16 checkpoint widened) becomes
    a QuantLinear over that bfloat16 weight; returns how many did."""
    kept = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.dtype == torch.float32:
            weight = module.weight.detach().bfloat16()
            if torch.equal(weight.float(), module.weight) and can_keep(name, module, weight, pad=True):
                kept[name] = weight
    keep(model, kept)
    return len(kept)
