"""The optional a8 mode (models/a8.py): a GGUF's own weights, exactly, with int8 activations.

- The re-encoding is exact: every block type's int8 values, scales and offsets give back gguf's dequantised
  floats bit for bit.
- The only loss is the activations' rounding: a layer equals x rounded to int8 per group (in float64 here)
  times the dequantised weight; the kernels equal models/w8a8.py's PyTorch reference of the same arithmetic.
- On the demo model: a bound on the mean KL divergence from the float model and on greedy agreement (compare.py
  --quality prints both beside llama.cpp's own), the native decode step against the PyTorch layers, and the
  layers kept on disk mapped back bit for bit.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize
from gguf_files import write_gguf
from test_decode_step import PROMPTS, assert_same_steps
from test_quant_kernels import random_blocks
from test_w8a8 import distance_on_demo_text
from tiny_models import build_tiny

from qwen_engine import LLM, SamplingParams, kernels
from qwen_engine.errors import InputError
from qwen_engine.models import a8, w8a8

Q = gguf.GGMLQuantizationType
TYPES = list(a8.GROUPS)
# every product of a tiny Qwen3.5 in a type a8 converts (the test writer's default mix keeps some in F16/BF16)
HYBRID_TYPES = {"attn_q": Q.Q8_0, "attn_k": Q.Q5_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0, "ffn_gate": Q.Q8_0,
                "ffn_up": Q.Q5_0, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_qkv": Q.Q8_0,
                "attn_gate": Q.Q5_0, "ssm_alpha": Q.Q8_0, "ssm_beta": Q.Q8_0, "ssm_out": Q.Q4_0, "ssm_ba": Q.Q8_0}


@pytest.fixture(autouse=True)
def no_store(monkeypatch):
    monkeypatch.setenv("QWEN_ENGINE_W8A8_CACHE", "0")


def blocks_of(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    if qtype != Q.Q5_K:
        return random_blocks(qtype, rows, cols, seed)
    rng = np.random.default_rng(seed)  # (test_quant_kernels has no Q5_K: random quants, sane d and dmin)
    values, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // values, size), dtype=np.uint8)
    raw[:, 0:4] = (rng.random((raw.shape[0], 2)) * 0.01 + 1e-3).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def dequantized(raw: np.ndarray, qtype: Q, cols: int) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, qtype).reshape(raw.shape[0], cols).astype(np.float32))


def rounded_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x rounded to int8 per group of `group` values (max |x| / 127, half to even), as float64."""
    q, scales = w8a8.quantize_activations(x, group)
    return (q.double().view(x.shape[0], -1, group) * scales.double()[:, :, None]).view(x.shape)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_exact_re_encoding(qtype):
    rows, cols = 37, 512
    raw = blocks_of(qtype, rows, cols)
    for group in {a8.GROUPS[qtype], 16}:  # a stacked layer may take a finer group than the type's own
        u8, scales, offsets = a8.int8_form(torch.from_numpy(raw), qtype, cols, group)
        assert u8.dtype == torch.uint8 and scales.shape == (rows, cols // group)
        assert (offsets is not None) == (qtype in (Q.Q4_K, Q.Q5_K))
        w = (u8.to(torch.int16) - 128).float().view(rows, -1, group) * scales[:, :, None]
        if offsets is not None:
            w = w + offsets[:, :, None]
        assert torch.equal(w.view(rows, cols), dequantized(raw, qtype, cols))


def test_a_group_coarser_than_the_scales_is_refused():
    raw = torch.from_numpy(blocks_of(Q.Q6_K, 2, 256))
    with pytest.raises(ValueError, match="every 16"):
        a8.int8_form(raw, Q.Q6_K, 256, 32)


SEGMENTS = {  # (types stacked side by side, K): the demo's mixes, K-quant offsets, a group of 16 forced by Q6_K,
    "q5_0": ([Q.Q5_0], 896),  # and inputs padded to a multiple of 64
    "q4_k+q6_k": ([Q.Q4_K, Q.Q6_K], 512),
    "q5_0+q8_0": ([Q.Q5_0, Q.Q5_0, Q.Q8_0], 96),
    "q4_0+q5_k": ([Q.Q4_0, Q.Q5_K], 256),
}


@pytest.mark.parametrize("case", SEGMENTS)
@pytest.mark.parametrize("M", [1, 3, 8, 17, 70])
def test_only_the_activations_are_rounded(case, M):
    types, K = SEGMENTS[case]
    raws = [blocks_of(t, 19 + 3 * i, K, seed=i) for i, t in enumerate(types)]
    bias = torch.randn(sum(r.shape[0] for r in raws))
    layer = a8.A8Linear([(torch.from_numpy(r), t) for r, t in zip(raws, types, strict=True)], K, bias)
    assert layer.group == min(a8.GROUPS[t] for t in types)
    w = torch.cat([dequantized(r, t, K) for r, t in zip(raws, types, strict=True)])
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    padded = F.pad(x, (0, layer.padded - K))
    exact = (rounded_activations(padded, layer.group)[:, :K] @ w.double().T + bias.double()).float()
    y = layer(x)
    assert (y - exact).norm() <= 1e-6 * exact.norm(), (y - exact).norm() / exact.norm()
    # ... and the kernels are the PyTorch reference's arithmetic (int8 values identical; float sums reordered)
    ref = w8a8.reference_linear(padded, layer.weight_rows(), layer.weight_scales, layer.bias, layer.group, None,
                                layer.weight_offsets)
    assert (y - ref).norm() <= 1e-6 * ref.norm()
    assert torch.equal(layer.weight_float(), w)


def test_nibble_packing_round_trip():
    """pack_nibbles16 keeps every code: 4 bits and a plane for the fifth, rows padded to a unit of 16."""
    g = torch.Generator().manual_seed(5)
    for planes, group, K in ((0, 32, 256), (1, 32, 512), (1, 16, 128)):
        codes = torch.randint(0, 16 << planes, (37, K), generator=g, dtype=torch.uint8)
        packed = a8.pack_nibbles16(codes, group, planes, zero=8)
        assert packed.numel() == 48 * K * (4 + planes) // 8
        assert torch.equal(a8.unpack_nibbles16(packed, 37, K, group, planes), codes)


NIBBLE_SHAPES = {Q.Q4_0: 896, Q.Q5_0: 896, Q.Q4_K: 512, Q.Q5_K: 256}  # 896: inputs padded to 960


@pytest.mark.parametrize("qtype", list(a8.NIBBLES), ids=lambda t: t.name)
@pytest.mark.parametrize("M,N", [(1, 37), (3, 37), (6, 37), (8, 37), (17, 37), (17, 200), (6, 200)])
def test_nibble_units_equal_byte_units(qtype, M, N):
    """With AVX-512 a single 4-5-bit type is kept in nibble units; its products are the byte units' bit for bit,
    from one row (nibble tiles of 1-4 rows, then 5-8 rows a unit wide) to many (units expanded to bytes, the first
    ones before their products, each next ones beside the products of those before: N = 200 gives each thread
    several passes, then the byte tiles)."""
    if a8.layout() != "units16":
        pytest.skip("nibble units are AVX-512 VNNI's")
    K = NIBBLE_SHAPES[qtype]
    raw = torch.from_numpy(blocks_of(qtype, N, K, seed=3))
    bias = torch.randn(N)
    layer = a8.A8Linear([(raw, qtype)], K, bias)
    assert layer.layout == "nibbles16" and (layer.planes, layer.zero) == a8.NIBBLES[qtype]
    assert layer.packed.numel() == 16 * -(-N // 16) * layer.padded * (4 + layer.planes) // 8
    u8, _, _ = a8.int8_form(raw, qtype, K, layer.group)
    assert torch.equal(layer.weight_rows()[:, :K], u8)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    as_bytes = kernels.native().int8_linear_units(x, w8a8.pack_units16(layer.weight_rows()), N, layer.weight_scales,
                                                  bias, layer.group, None, layer.weight_offsets)
    assert torch.equal(layer(x), as_bytes)


@pytest.mark.parametrize("M", [6, 9])
def test_nibble_units_streaming_large_outputs(M):
    """Over 4 MiB of y (a tied LM head of 4-5-bit quants) the nibble tiles, of 5-8 rows a unit wide or of the
    expanded units, store y to memory directly: the same numbers as the weight taken in slices."""
    if a8.layout() != "units16":
        pytest.skip("nibble units are AVX-512 VNNI's")
    K, N = 64, (4 << 20) // (4 * M) + 21
    raw = torch.from_numpy(blocks_of(Q.Q4_0, N, K, seed=M))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    whole = a8.A8Linear([(raw, Q.Q4_0)], K, None)
    assert whole.layout == "nibbles16"
    cut = 16 * 1024
    sliced = torch.cat([a8.A8Linear([(raw[a : a + cut], Q.Q4_0)], K, None)(x) for a in range(0, N, cut)], dim=1)
    assert torch.equal(whole(x), sliced)


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K, Q.Q8_0, Q.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("M", [7, 8, 16, 23, 40])
def test_amx_tiles_equal_vector_tiles(qtype, M):
    """Where AMX tiles are granted, 8 or more rows of x take the units on the tiles (int8_matmul.cpp:
    amx_units_range); the outputs are the vector tiles' bit for bit: nibble and byte units, offsets (Q4_K), a bias,
    a partial last unit and a last pass of fewer than three units (N = 37 and 165), Q6_K's groups of 16 (left on
    the vectors), and w8a8's groups of 128 (two 64-byte pieces a group)."""
    native = kernels.native()
    if native is None or not hasattr(native, "int8_has_amx") or not native.int8_has_amx():
        pytest.skip("no AMX tiles here")
    K = 512
    cases = []
    for N in (37, 165):
        raw = torch.from_numpy(blocks_of(qtype, N, K, seed=N))
        layer = a8.A8Linear([(raw, qtype)], K, torch.randn(N))
        cases.append(lambda x, layer=layer: layer(x))
    u8, scales = native.int8_quantize_weight(torch.randn(45, K), 128)
    packed = w8a8.pack_units16(u8)
    cases.append(lambda x: native.int8_linear_units(x, packed, 45, scales.T.contiguous(), None, 128, None, None))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    try:
        for product in cases:
            native.set_int8_amx_units(False)
            vectors = product(x)
            native.set_int8_amx_units(True)
            assert torch.equal(product(x), vectors)
    finally:
        native.set_int8_amx_units(True)


def test_mixed_types_stay_in_byte_units():
    types, K = SEGMENTS["q5_0+q8_0"]
    layer = a8.A8Linear([(torch.from_numpy(blocks_of(t, 19, K, seed=i)), t) for i, t in enumerate(types)], K)
    assert layer.planes == -1 and layer.layout in ("units", "units16", "rows")


def test_pytorch_fallback_gives_the_kernel_numbers(monkeypatch):
    """Without the native kernels the layer keeps its rows unpacked and runs w8a8.reference_linear."""
    types, K = SEGMENTS["q4_k+q6_k"]
    segments = [(torch.from_numpy(blocks_of(t, 21, K, seed=i)), t) for i, t in enumerate(types)]
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(2))
    with_kernels = a8.A8Linear(segments, K)(x)
    monkeypatch.setattr(kernels, "native", lambda: None)
    fallback = a8.A8Linear(segments, K)
    assert fallback.layout == "rows" and fallback.packed is None
    assert (fallback(x) - with_kernels).norm() <= 1e-6 * with_kernels.norm()


def test_kernel_packs_units_where_amx_runs_too():
    if not hasattr(kernels.native() or object(), "int8_units_layout"):
        pytest.skip("no int8 kernels in this build")
    # (w8a8's AMX layout takes groups of 64 or more: a8's are 16-32; on AMX hosts its units reach the tiles too)
    assert a8.layout() in ("units", "units16")


def products(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The products a8 made, by name: A8Linear layers and A8Parts (not the parts inside those)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (a8.A8Linear, a8.A8Parts)) and ".parts." not in name}


def layer_errors(llm: LLM, layers: dict[str, torch.nn.Module], ids: list[int]) -> tuple[dict, torch.Tensor]:
    """Each A8Linear's relative error against the float product with its own weights, on the activations it meets
    in a forward over `ids` (the layers no token reached are absent); and that forward's log-probabilities."""
    errors = {}

    def compare(name):
        def hook(layer, args, out):
            x = args[0].reshape(-1, layer.in_features).float()
            ref = F.linear(x, layer.weight_float(), layer.bias)
            errors[name] = ((out.reshape(ref.shape) - ref).norm() / ref.norm()).item()
        return hook

    hooks = [m.register_forward_hook(compare(name)) for name, m in layers.items()]
    try:
        return errors, F.log_softmax(llm.logits(ids), -1)
    finally:
        for h in hooks:
            h.remove()


def test_demo_model(demo_gguf, demo_llm, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_ENGINE_W8A8_CACHE", "1")
    monkeypatch.setenv("QWEN_ENGINE_HOME", str(tmp_path))
    lossy = LLM(demo_gguf, progress=False, quantization="a8")
    made = [m for m in lossy.model.modules() if isinstance(m, a8.A8Linear)]
    # q/k/v, o, gate/up, down per layer, and the LM head; half the layers' q/k/v are Q5_0 q and k beside a Q8_0 v,
    # which A8Parts keeps as two products where the Q5_0 pair goes in nibbles (AVX-512 VNNI; one group of 32 for all)
    split = [layer.self_attn.qkv_proj for layer in lossy.model.model.layers
             if isinstance(layer.self_attn.qkv_proj, a8.A8Parts)]
    assert len(split) == (12 if a8.layout() == "units16" else 0) and all(len(p.parts) == 2 for p in split)
    assert len(made) == 4 * lossy.config.num_layers + 1 + len(split)
    if a8.layout() == "units16":  # Q5_0 (o, gate/up, q/k/v), Q4_K (half the down) in nibble units
        nibbles = sum(m.layout == "nibbles16" for m in made)
        assert nibbles == 2 * lossy.config.num_layers + 12 + 12 + 12, nibbles
    ids, _, kl, agreement = distance_on_demo_text(demo_llm, lossy)
    print(f"a8 on the demo: mean KL {kl.mean():.5f}, max {kl.max():.4f}, greedy agreement {agreement:.3f}")
    # measured 0.00011 nats here, 100 % agreement; compare.py --quality's corpus: docs/benchmarks.md
    assert 0 < kl.mean() < 0.002 and agreement > 0.97

    if hasattr(kernels.native() or object(), "int8_linear_units"):
        assert_same_steps(lossy, PROMPTS[:2], 1e-3)  # the native step's int8 products = the PyTorch layers'

    # A second load maps the layers the first kept: the same numbers, bit for bit, with no conversion.
    (kept,) = (tmp_path / "a8").glob("*.safetensors")
    monkeypatch.setattr(a8, "int8_form", None)
    mapped = LLM(demo_gguf, progress=False, quantization="a8")
    assert torch.equal(mapped.logits(ids[:64]), lossy.logits(ids[:64]))
    assert [m.layout for m in mapped.model.modules() if isinstance(m, a8.A8Linear)] == [m.layout for m in made]
    del mapped
    kept.unlink()


def test_gguf_with_types_a8_leaves_alone(tmp_path, qwen3_tokenizer_dir):
    """The test GGUF's mix: q Q8_0 with k F16 and v BF16 (the stacked q/k/v stays on the default kernels), o Q4_0,
    gate Q8_0 with up Q5_0 (int8), down and the LM head F16 (default kernels): both kinds in one decode step."""
    model = build_tiny("qwen3", tmp_path / "hf", tokenizer_dir=qwen3_tokenizer_dir, seed=12)
    write_gguf(model, qwen3_tokenizer_dir, tmp_path / "tiny.gguf")
    exact = LLM(tmp_path / "tiny.gguf", progress=False)
    lossy = LLM(tmp_path / "tiny.gguf", progress=False, quantization="a8")
    layer = lossy.model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, a8.A8Linear)
    if a8.layout() == "units16":  # Q8_0 gate in bytes beside the Q5_0 up in nibbles: A8Parts
        assert [type(p) for p in layer.mlp.gate_up_proj.parts] == [a8.A8Linear] * 2
    else:  # the same group of 32, in bytes: one product
        assert isinstance(layer.mlp.gate_up_proj, a8.A8Linear)
    assert not isinstance(layer.self_attn.qkv_proj, a8.A8Linear) and not isinstance(layer.mlp.down_proj, a8.A8Linear)
    if hasattr(kernels.native() or object(), "int8_linear_units"):
        assert_same_steps(lossy, PROMPTS, 1e-4)
    ids = PROMPTS[3]
    p, q = F.log_softmax(exact.logits(ids), -1), F.log_softmax(lossy.logits(ids), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    print(f"a8 on the tiny GGUF: mean KL {kl:.2e}")
    assert 0 < kl < 1e-3


def test_hybrid_model(tmp_path, qwen3_tokenizer_dir):
    """Qwen3.5: the linear-attention layers' projections are converted one by one, the attention layers' and the
    MLPs' as in the dense models. Each converted layer, on the activations it meets, is within the rounding of
    int8 activations of the float product with the file's weights; decoding (recurrent state, paged cache) gives
    the tokens the same mode's full forward picks. (Greedy agreement with the default path is no measure on a
    random model: its next-token logits lie within ~0.02 of each other.)"""
    model = build_tiny("qwen3_5", tmp_path / "hf", tokenizer_dir=qwen3_tokenizer_dir, seed=21)
    write_gguf(model, qwen3_tokenizer_dir, tmp_path / "tiny.gguf", types=HYBRID_TYPES)
    exact = LLM(tmp_path / "tiny.gguf", progress=False)
    lossy = LLM(tmp_path / "tiny.gguf", progress=False, quantization="a8")
    converted = {name: m for name, m in lossy.model.named_modules() if isinstance(m, a8.A8Linear)}
    assert {name.rsplit(".", 1)[-1] for name in products(lossy.model)} == {
        "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "qkv_proj", "o_proj", "gate_up_proj",
        "down_proj", "lm_head"}
    ids = PROMPTS[3]
    errors, q = layer_errors(lossy, converted, ids)
    assert len(errors) == len(converted) and max(errors.values()) < 0.02, errors  # measured 0.4-1 %
    p = F.log_softmax(exact.logits(ids), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    print(f"a8 on the tiny Qwen3.5 GGUF: mean KL {kl:.2e}")
    assert 0 < kl < 5e-3
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = lossy.tokenizer.encode("def add(a, b):")
    tokens = lossy.generate("def add(a, b):", params)[0].token_ids
    assert tokens == lossy.logits(prompt + tokens[:-1])[len(prompt) - 1 :].argmax(-1).tolist()


def test_float_checkpoints_are_refused(tmp_path, qwen3_tokenizer_dir):
    build_tiny("qwen3", tmp_path, tokenizer_dir=qwen3_tokenizer_dir, seed=3)
    with pytest.raises(InputError, match="w8a8"):
        LLM(tmp_path, progress=False, quantization="a8")


# every expert product in a type a8 converts: gate and up of different types (byte units), down in nibble units
MOE_TYPES = {**HYBRID_TYPES, "ffn_gate_exps": Q.Q8_0, "ffn_up_exps": Q.Q4_0, "ffn_down_exps": Q.Q5_0,
             "ffn_gate_inp": Q.Q8_0, "ffn_gate_shexp": Q.Q5_0, "ffn_up_shexp": Q.Q8_0, "ffn_down_shexp": Q.Q4_0}


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "qwen3_5_moe"])
def test_mixture_of_experts(arch, tmp_path, qwen3_tokenizer_dir):
    """Every expert's gate/up and down (and Qwen2-MoE's and Qwen3.5-MoE's shared expert) become a8 products, the
    router and the shared expert's gate stay as they are. Each converted layer, on the activations it meets, is
    within the rounding of int8 activations of the float product with the file's weights; the native decode step
    (its experts on the int8 kernels, the widths 96 and 160 padded to 128 and 192) gives the PyTorch layers'
    logits."""
    model = build_tiny(arch, tmp_path / "hf", tokenizer_dir=qwen3_tokenizer_dir, seed=23, expert_widths=(96, 160))
    write_gguf(model, qwen3_tokenizer_dir, tmp_path / "tiny.gguf", types=MOE_TYPES)
    exact = LLM(tmp_path / "tiny.gguf", progress=False)
    lossy = LLM(tmp_path / "tiny.gguf", progress=False, quantization="a8")
    cfg = lossy.config.moe
    converted = {name: m for name, m in lossy.model.named_modules() if isinstance(m, a8.A8Linear)}
    made = products(lossy.model)
    sparse = sorted(cfg.sparse_layers)
    shared = 1 if cfg.shared_expert_intermediate_size else 0
    for i in sparse:
        mixture = lossy.model.model.layers[i].mlp
        assert not isinstance(mixture.gate, a8.A8Linear)
        for owner in [f"experts.{j}" for j in range(cfg.num_experts)] + ["shared_expert"] * shared:
            for kind in ("gate_up_proj", "down_proj"):
                assert f"model.layers.{i}.mlp.{owner}.{kind}" in made, (i, owner, kind)
    expert = lossy.model.model.layers[sparse[0]].mlp.experts[0]
    if a8.layout() == "units16":  # gate Q8_0 in bytes beside up Q4_0 in nibbles (A8Parts); down Q5_0 in nibbles
        assert [p.layout for p in expert.gate_up_proj.parts] == ["units16", "nibbles16"]
        assert expert.down_proj.layout == "nibbles16"
    ids = PROMPTS[3]
    errors, q = layer_errors(lossy, converted, ids)
    idle = set(converted) - set(errors)  # experts no token of the 93 chose (2 of 6 chosen per token)
    assert all(".experts." in name for name in idle) and len(idle) <= len(converted) // 8, idle
    assert max(errors.values()) < 0.02, errors  # measured 0.4-1 %
    p = F.log_softmax(exact.logits(ids), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    print(f"a8 on the tiny {arch} GGUF: mean KL {kl:.2e}, worst layer {max(errors.values()):.4f}")
    # measured 4.4e-4 (qwen2_moe, qwen3_moe) and 5.4e-3 (qwen3_5_moe): on a random model the rounding changes a
    # router's choice for 2-7 % of the token-layers, and the tokens downstream of one carry 30-60x the KL of the
    # rest (measured apart; the dense tiny models stay below 1e-3)
    assert 0 < kl < 1.5e-2
    if hasattr(kernels.native() or object(), "int8_linear_units"):
        assert_same_steps(lossy, PROMPTS, 1e-3)
        assert_same_steps(lossy, PROMPTS[1:2], 1e-3)  # one sequence: its experts shared out between the threads


def test_memory_estimate_and_refusal(tmp_path, qwen3_tokenizer_dir, monkeypatch):
    """The converted layers' size is known before converting (within 1 % of what is made), and a machine without
    that much memory available gets a clear refusal instead of the out-of-memory killer."""
    model = build_tiny("qwen3_moe", tmp_path / "hf", tokenizer_dir=qwen3_tokenizer_dir, seed=24, expert_widths=(96, 160))
    write_gguf(model, qwen3_tokenizer_dir, tmp_path / "tiny.gguf", types=MOE_TYPES)
    estimates = []
    estimate = a8.converted_bytes

    def recorded(products):
        estimates.append(estimate(products))
        return estimates[-1]

    monkeypatch.setattr(a8, "converted_bytes", recorded)
    lossy = LLM(tmp_path / "tiny.gguf", progress=False, quantization="a8")
    made = sum(t.numel() * t.element_size() for m in products(lossy.model).values() for t in m.tensors().values())
    assert abs(estimates[0] - made) < 0.01 * made, (estimates, made)
    monkeypatch.setattr(a8, "available_memory", lambda: estimates[0] - 1)
    with pytest.raises(InputError, match=r"would take ~.* GiB of memory and .* GiB are available"):
        LLM(tmp_path / "tiny.gguf", progress=False, quantization="a8")
