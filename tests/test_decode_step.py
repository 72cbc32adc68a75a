"""The native decode step (models/decode_step.py, kernels/decode_step.cpp) against the PyTorch layers.

The same requests run twice through fresh engines on one model: once with decode steps in one native call,
once through the PyTorch modules (the reference path, itself checked against transformers elsewhere). Every
step's logits are compared, for a batch of sequences with different context lengths (the attention kernel's
padding), on float32 Qwen2 (q/k/v biases, tied embeddings), float32 Qwen3 (per-head q/k norms), a Qwen3 GGUF
with mixed block types, and the demo model (Q5_0/Q8_0/Q4_K/Q6_K).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf_files import write_gguf
from tiny_models import build_tiny

from qwen_engine import LLM, SamplingParams, kernels
from qwen_engine.engine.engine import Engine, EngineConfig

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True).with_defaults(SamplingParams())


def run(llm: LLM, native: bool, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """Greedy outputs, the logits of every step, and how many steps ran natively."""
    model = llm.model
    logits: list[torch.Tensor] = []
    native_steps = 0
    compute_logits, decode_step = model.compute_logits, model.decode_step

    def record(hidden):
        out = compute_logits(hidden)
        logits.append(out.clone())
        return out

    def counted():
        nonlocal native_steps
        step = decode_step()
        native_steps += step is not None
        return step

    model.compute_logits, model.decode_step, model.native_decode = record, counted, native
    try:
        engine = Engine(model, llm.tokenizer, llm.eos_token_ids, EngineConfig(max_model_len=llm.max_model_len))
        seqs = [engine.add_request(p, GREEDY) for p in prompts]
        while engine.has_work():
            engine.step()
    finally:
        del model.compute_logits, model.decode_step
        model.native_decode = True
    return [s.output_ids for s in seqs], logits, native_steps


def assert_same_steps(llm: LLM, prompts: list[list[int]], tolerance: float) -> None:
    assert llm.model.decode_step() is not None, "the native decode step does not apply to this model"
    ref_tokens, ref_logits, none = run(llm, False, prompts)
    tokens, logits, native_steps = run(llm, True, prompts)
    assert none == 0
    assert native_steps == GREEDY.max_tokens - 1  # every step after the prefill
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits)
    worst = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits, strict=True))
    scale = max(b.abs().max().item() for b in ref_logits)
    print(f"max|Δlogit| over {len(logits)} steps: {worst:.2e} (logits up to {scale:.1f})")
    assert worst <= tolerance, worst


PROMPTS = [[151644, 872, 198] + [1000 + 37 * i % 9000 for i in range(n)] for n in (5, 40, 17, 90)]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_float32_models(arch, tmp_path, qwen3_tokenizer_dir):
    build_tiny(arch, tmp_path, tokenizer_dir=qwen3_tokenizer_dir, seed=11)
    assert_same_steps(LLM(tmp_path), PROMPTS, 1e-4)


def test_gguf_with_mixed_block_types(tmp_path, qwen3_tokenizer_dir):
    model = build_tiny("qwen3", tmp_path / "hf", tokenizer_dir=qwen3_tokenizer_dir, seed=12)
    write_gguf(model, qwen3_tokenizer_dir, tmp_path / "tiny.gguf")
    llm = LLM(tmp_path / "tiny.gguf")
    assert any("QuantLinear" in type(m).__name__ for m in llm.model.modules())
    assert_same_steps(llm, PROMPTS, 1e-4)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("source", ["float32", "bfloat16", "gguf"])
def test_mixtures_of_experts(arch, source, tmp_path, qwen3_tokenizer_dir):
    """Sparse and dense layers (a dense one in the folders), the router, renormalisation or not, Qwen2-MoE's
    gated shared expert; experts in float32, kept bfloat16 or GGUF blocks. Four sequences decode together, so
    experts see 0 to 4 rows a step."""
    ref = build_tiny(arch, tmp_path / "hf", tokenizer_dir=qwen3_tokenizer_dir, seed=14, bfloat16=source == "bfloat16",
                     dense_layers=() if source == "gguf" else (1,))
    if source == "gguf":
        write_gguf(ref, qwen3_tokenizer_dir, tmp_path / "tiny.gguf")
    llm = LLM(tmp_path / "tiny.gguf" if source == "gguf" else tmp_path / "hf")
    assert_same_steps(llm, PROMPTS, 1e-4)
    assert_same_steps(llm, PROMPTS[1:2], 1e-4)  # one sequence: its experts shared out between the threads


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe", "qwen3_next"])
@pytest.mark.parametrize("source", ["float32", "gguf"])
def test_hybrid_models(arch, source, tmp_path, qwen3_tokenizer_dir):
    """Qwen3.5 (tiny: DeltaNet and gated-attention layers alternating, a quarter of each head rotated, zero-centred
    norms), its mixture of experts and Qwen3-Next: the DeltaNet layers' projections, convolution, gates and delta
    rule and the attention layers' output gates run in the one native call, over the recurrent state pools the
    PyTorch layers use. Sequences of different lengths decode together, so a wrong state slot or KV row shows."""
    ref = build_tiny(arch, tmp_path / "hf", tokenizer_dir=qwen3_tokenizer_dir, seed=16,
                     dense_layers=() if arch == "qwen3_next" else (1,))
    if source == "gguf":
        write_gguf(ref, qwen3_tokenizer_dir, tmp_path / "tiny.gguf")
    llm = LLM(tmp_path / "tiny.gguf" if source == "gguf" else tmp_path / "hf")
    assert llm.model.config.linear_attention is not None
    assert_same_steps(llm, PROMPTS, 1e-4)


def test_demo_model(demo_llm):
    assert_same_steps(demo_llm, PROMPTS[:2], 1e-4)


def test_not_for_bfloat16(tmp_path, qwen3_tokenizer_dir):
    build_tiny("qwen2", tmp_path, tokenizer_dir=qwen3_tokenizer_dir, seed=13)
    llm = LLM(tmp_path, dtype=torch.bfloat16)
    assert llm.model.decode_step() is None
    out = llm.generate("Hello", GREEDY)[0]
    assert len(out.token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize("shape", [(3, 896), (1, 37), (70, 64), (2, 5, 128)])
def test_rms_norm_and_silu_equal_pytorch(shape):
    native = kernels.native()
    if native is None:
        pytest.skip("no C++ compiler: the native kernels cannot be built here")
    gen = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=gen) * 3
    w = 1 + torch.randn(shape[-1], generator=gen) * 0.1
    assert torch.allclose(native.rms_norm(x, w, 1e-6), F.rms_norm(x, (shape[-1],), w, 1e-6), rtol=1e-6, atol=1e-6)
    gate_up = torch.randn(shape[0], 2 * shape[-1], generator=gen) * 4
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, -87.0, 0.0])  # exp's clamped range and its edges
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.allclose(native.silu_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rms_norm_follows_the_reference(dtype, monkeypatch):
    """RMSNorm on bf16/fp16 input normalises in float32 (natively when it can) and multiplies by the weight after
    the cast back, as transformers' Qwen RMSNorm does: the native path equals the PyTorch formula except for
    rare last-bit differences (its sum of squares is more precise)."""
    from qwen_engine.models.layers import RMSNorm

    if kernels.native() is None:
        pytest.skip("no C++ compiler: the native kernels cannot be built here")
    gen = torch.Generator().manual_seed(5)
    norm = RMSNorm(1280, 1e-6)
    norm.weight.copy_(1 + torch.randn(1280, generator=gen) * 0.1)
    norm.to(dtype)
    x = (torch.randn(300, 1280, generator=gen) * 3).to(dtype)
    native = norm(x)
    monkeypatch.setattr(kernels, "native", lambda: None)
    reference = norm(x)
    assert native.dtype == reference.dtype == dtype
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    assert torch.allclose(native.float(), reference.float(), rtol=ulp, atol=0)
    assert (native != reference).float().mean().item() < 0.01


@pytest.mark.parametrize("head_dim", [64, 128, 96, 20])
def test_native_rotary_is_bit_identical(head_dim):
    # 16 pairs at a time while they last (64, 128, 96), then one by one (96's tail is empty; 20 is all tail).
    native = kernels.native()
    if native is None:
        pytest.skip("no C++ compiler: the native kernels cannot be built here")
    from qwen_engine.models.layers import apply_rotary

    gen = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(5, 7 * head_dim, generator=gen)
    angles = torch.randn(5, head_dim // 2, generator=gen) * 40
    # a = -0 against b = +0 with cos, sin > 0: a·cos + (-b)·sin is -0 only if -b is a true negation (not 0 - b).
    qkv[0, 0], qkv[0, head_dim // 2], angles[0, 0] = -0.0, 0.0, 0.5
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q = qkv[:, : 4 * head_dim].view(5, 4, head_dim)  # strided rows, as inside the fused qkv output
    expected = apply_rotary(q.clone(), cos, sin)
    native.rotary_(q, cos, sin)
    assert torch.equal(q, expected)
    assert torch.equal(torch.signbit(q), torch.signbit(expected))


def test_bf16_silu_mul_rounds_as_the_two_pytorch_ops():
    """Qwen2.5-VL's bf16 MLP: silu(gate) * up in one pass equals F.silu(gate) * up, which rounds to bf16 twice.
    Only where silu underflows (gate ≲ -88, result below 1e-30) may ours keep a tiny value PyTorch rounds to 0."""
    native = kernels.native()
    if native is None or not native.bf16_kernels():
        pytest.skip("no bfloat16 kernels in this build")
    gen = torch.Generator().manual_seed(3)
    gate = (torch.randn(37, 3420, generator=gen) * 4).bfloat16()
    up = (torch.randn(37, 3420, generator=gen) * 4).bfloat16()
    gate[0, :5] = torch.tensor([-200.0, 200.0, -87.0, 0.0, -0.0])
    ours, reference = native.silu_mul_bf16(gate, up), F.silu(gate) * up
    differ = ours != reference
    assert differ.sum().item() <= 1
    assert (reference[differ].float().abs() < 1e-30).all() and (ours[differ].float().abs() < 1e-30).all()


@pytest.mark.parametrize("head_dim", [80, 64, 128, 20])
def test_bf16_rotary_in_place_equals_rotating_a_float32_copy(head_dim):
    """The vision towers in bfloat16 rotate q and k in float32 (the reference's x.float() … .to(bf16)); the native
    kernel converts on the fly and rounds once at the end: bit-identical, 80 (Qwen2.5-VL) with a scalar tail."""
    native = kernels.native()
    if native is None or not native.bf16_kernels():
        pytest.skip("no bfloat16 kernels in this build")
    from qwen_engine.models.layers import apply_rotary, rotate_in_float32

    gen = torch.Generator().manual_seed(head_dim)
    qkv = (torch.randn(9, 3 * 4 * head_dim, generator=gen) * 3).bfloat16()
    angles = torch.randn(9, head_dim // 2, generator=gen) * 40
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q = qkv[:, : 4 * head_dim].view(9, 4, head_dim)  # strided rows, as inside the fused qkv output
    expected = apply_rotary(q.float(), cos, sin).to(torch.bfloat16)
    untouched = qkv[:, 4 * head_dim :].clone()
    rotated = rotate_in_float32(q, cos, sin)
    assert rotated.data_ptr() == q.data_ptr()  # in place
    assert torch.equal(rotated, expected)
    assert torch.equal(qkv[:, 4 * head_dim :], untouched)
