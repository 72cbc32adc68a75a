"""The vision MLPs' in-place activations (kernels/activations.cpp) against float64.

gelu_tanh_ computes x·σ(2u), u = √(2/π)(x + 0.044715 x³), which is PyTorch's 0.5·x·(1 + tanh u) without its
cancellation at negative x, so the float64 reference is that form too; where PyTorch's float32 result has no
cancellation (x > -3) it is checked against PyTorch as well.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen_engine import kernels

NATIVE = kernels.native()
pytestmark = pytest.mark.skipif(NATIVE is None, reason="no native kernels in this build")


def _gelu_tanh64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))


def _inputs(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3
    x[:7] = torch.tensor([-100.0, -20.0, -5.0, 0.0, 1e-30, 5.0, 100.0])[: min(7, n)]
    return x


@pytest.mark.parametrize("n", [7, 16, 33, 16384 * 3 + 5])  # tails, whole vectors, several chunks
def test_gelu_tanh_float32(n: int) -> None:
    x = _inputs(n).view(-1, 1) if n % 2 else _inputs(n).view(2, -1)
    got = NATIVE.gelu_tanh_(x.clone())
    want = _gelu_tanh64(x)
    # e^(2u) turns u's float32 rounding (~6e-8 |u|) into a relative error of ~1.2e-7 |u| of the result, in any
    # float32 evaluation. Below x = -10 the true value is under 1e-36 and the kernel's exp clamps its argument:
    # both are ~0.
    u = (math.sqrt(2 / math.pi) * (x.double() + 0.044715 * x.double() ** 3)).abs()
    normal = x > -10
    assert ((got.double() - want).abs() <= (1e-6 + 3e-7 * u) * want.abs())[normal].all()
    assert (got[~normal].abs() < 1e-30).all()
    calm = x > -3  # PyTorch's form is accurate there
    assert torch.allclose(got[calm], F.gelu(x, approximate="tanh")[calm], rtol=1e-6, atol=1e-7)


def test_gelu_tanh_is_in_place() -> None:
    x = _inputs(100)
    out = NATIVE.gelu_tanh_(x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, x)


def test_gelu_tanh_bfloat16_rounds_once() -> None:
    x = _inputs(50_000).bfloat16()
    if not NATIVE.gelu_tanh_supports(x):
        pytest.skip("this build has no AVX512-BF16 kernels")
    got = NATIVE.gelu_tanh_(x.clone())
    want = _gelu_tanh64(x).float()  # the true value in float32, then rounded once to bf16
    rounded = want.bfloat16()
    # Our float32 value may sit on the other side of a bf16 rounding boundary only when the true value is within
    # float32 error of that boundary: rare, and one bf16 step.
    differ = (got != rounded) & (x > -10)
    assert differ.float().mean() < 1e-3 and (got[x <= -10].float().abs() < 1e-30).all()
    assert ((got.float() - want).abs()[differ] <= (want.abs() * 2.0**-8)[differ]).all()


def test_silu_mul_() -> None:
    g = torch.Generator().manual_seed(1)
    gate, up = torch.randn(37, 3420, generator=g) * 4, torch.randn(37, 3420, generator=g)
    want = F.silu(gate.double()) * up.double()
    got = NATIVE.silu_mul_(gate.clone(), up)
    assert ((got.double() - want).abs() <= 5e-7 * want.abs() + 1e-30).all()


def test_refuses_what_it_cannot_run() -> None:
    x = torch.randn(4, 6)
    assert not NATIVE.gelu_tanh_supports(x.t()) and not NATIVE.gelu_tanh_supports(x.double())
    with pytest.raises(RuntimeError, match="contiguous CPU float32"):
        NATIVE.gelu_tanh_(x.t())
    with pytest.raises(RuntimeError, match="one shape"):
        NATIVE.silu_mul_(x.clone(), torch.randn(4, 5))
