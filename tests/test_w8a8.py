"""The optional lossy w8a8 mode (models/w8a8.py, kernels/int8_matmul.cpp).

The kernel is checked against the PyTorch reference of the same arithmetic (the int8 values must be identical,
the outputs equal up to the order of float sums; AVX2 on units of 8 rows, VNNI on units of 16, and AMX tiles where
the CPU has them);
the smoothing factors (x times 1/s as it is quantised, the weight's columns times s) in the kernel and the reference;
the mode as a whole is checked against the float model on the demo: a bound on the mean KL divergence of next-token
distributions and on greedy agreement (benchmarks/compare.py --quality prints them: ~0.0011 nats and ~98.5 % on
its corpus), smoothing lowering the KL, plus the native decode step against the PyTorch layers on the converted
model; weight scales per group against one per row.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from test_decode_step import PROMPTS, assert_same_steps
from tiny_models import build_tiny

from qwen_engine import LLM, kernels
from qwen_engine.errors import InputError
from qwen_engine.models import w8a8


@pytest.fixture(autouse=True)
def no_store(monkeypatch):
    """Converted layers are kept on disk only where a test asks for it (and then under its own tmp_path)."""
    monkeypatch.setenv("QWEN_ENGINE_W8A8_CACHE", "0")


def keep_layers_in(monkeypatch, home) -> None:
    monkeypatch.setenv("QWEN_ENGINE_W8A8_CACHE", "1")
    monkeypatch.setenv("QWEN_ENGINE_HOME", str(home))


def resident_bytes_of_mapping(address: int) -> int | None:
    """Bytes of the memory mapping holding `address` that are in this process's page tables (Linux), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                start, end = (int(a, 16) for a in line.split()[0].split("-"))
                if start <= address < end:
                    break
            else:
                return None
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(start // 4096 * 8)
            entries = torch.frombuffer(bytearray(pagemap.read((end - start) // 4096 * 8)), dtype=torch.int64)
    except OSError:
        return None
    return int((entries < 0).sum()) * 4096  # bit 63: page present


def int8_native():
    native = kernels.native()
    if native is None or not hasattr(native, "int8_linear_units"):
        pytest.skip("no int8 kernels (AVX2 or AVX-512 VNNI) in this build: w8a8 runs its PyTorch reference")
    return native


@pytest.mark.parametrize("M,K,N", [(1, 896, 1152), (3, 128, 10), (5, 4864, 67), (8, 192, 7), (16, 128, 32),
                                   (17, 256, 33), (67, 896, 100), (130, 256, 50), (300, 128, 26)])
def test_kernel_equals_reference(M, K, N):
    native = int8_native()
    gen = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=gen) * 3
    x[0, 5] = 40.0  # an outlier: its group gets a coarser scale than the others
    x[-1, :64] = 0.0  # an all-zero group (scale 0)
    layer = w8a8.W8A8Linear(torch.randn(N, K, generator=gen) * 0.05, torch.randn(N, generator=gen))

    q, scales, _ = native.int8_quantize(x, layer.group)
    q_ref, scales_ref = w8a8.quantize_activations(x, layer.group)
    assert torch.equal(q, q_ref) and torch.equal(scales, scales_ref)

    rows = layer.weight_rows()
    ref = w8a8.reference_linear(x, rows, layer.weight_scales, layer.bias, layer.group)
    # The layout this CPU keeps (the layer's own packing), and the units kernel of this build even where AMX tiles
    # are preferred (an AMX host still runs the VNNI kernel if a process may not use the tiles).
    layouts = {w8a8.weight_layout(), native.int8_units_layout() or "rows"}
    y = None
    for layout, packed_linear in (("amx", "int8_linear_amx"), ("units", "int8_linear_units"),
                                  ("units16", "int8_linear_units")):
        if layout not in layouts:
            continue
        pack, unpack = w8a8.PACK[layout]
        packed = pack(rows)
        assert torch.equal(unpack(packed, N, K), rows)
        out = getattr(native, packed_linear)(x, packed, N, layer.weight_scales, layer.bias, layer.group)
        assert (out - ref).abs().max() <= 1e-6 * ref.abs().max(), layout
        if layout == w8a8.weight_layout():
            assert layer.packed is not None and torch.equal(layer.packed, packed)
            y = out
            assert torch.equal(layer(x), y)
    assert y is not None, f"no packed kernel for the layout {w8a8.weight_layout()}"
    # and it is a product: within int8 rounding of the float one
    exact = x @ layer.weight_float().t() + layer.bias
    assert (y - exact).abs().max() <= 0.05 * exact.abs().max()


def test_rows_apart_are_read_in_place():
    """x may be the first columns of a wider tensor (the decode step's down projection reads the first half of
    gate/up's rows): quantised where it lies, the same numbers as a contiguous copy."""
    native = int8_native()
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(9, 2 * 320, generator=gen)
    x = wide[:, :320]
    assert not x.is_contiguous()
    got, want = native.int8_quantize(x, 32, None), native.int8_quantize(x.contiguous(), 32, None)
    assert len(got) == len(want) == 3 and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    layer = w8a8.W8A8Linear(torch.randn(40, 320, generator=gen) * 0.05, None)
    if native.int8_units_layout() == w8a8.weight_layout():
        assert torch.equal(layer(x), layer(x.contiguous()))


@pytest.mark.parametrize("M", [7, 32])
def test_large_outputs_streamed_to_memory_are_the_same_numbers(M):
    """From 4 MiB of y (the LM head over 7 rows or more) the units tiles store y with non-temporal stores: the
    outputs equal the same product taken in slices of the weight (stored as usual) bit for bit, the last unit's
    partial line included, and the reference's within float rounding."""
    native = int8_native()
    if native.int8_units_layout() is None:
        pytest.skip("no units layout in this build")
    K, N = 64, (4 << 20) // (4 * M) + 37  # just over 4 MiB of y; N % 16 = 5 or 1: a partial last unit
    gen = torch.Generator().manual_seed(M)
    x, rows = torch.randn(M, K, generator=gen), torch.randint(0, 256, (N, K), generator=gen, dtype=torch.uint8)
    scales = torch.rand(K // 32, N, generator=gen) * 0.01
    layout = native.int8_units_layout()
    pack = w8a8.PACK[layout][0]
    whole = native.int8_linear_units(x, pack(rows), N, scales, None, 32)
    cut = 16 * 1024  # slices of whole units, each far below 4 MiB of y
    sliced = torch.cat([native.int8_linear_units(x, pack(rows[a : a + cut]), min(cut, N - a),
                                                 scales[:, a : a + cut].contiguous(), None, 32)
                        for a in range(0, N, cut)], dim=1)
    assert torch.equal(whole, sliced)
    ref = w8a8.reference_linear(x, rows, scales, None, 32)
    assert (whole - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("M,K,N", [(1, 896, 40), (7, 256, 33), (20, 100, 9), (130, 4864, 24)])
def test_smoothing_factors_in_the_kernel(M, K, N):
    """A smoothed layer (weight columns times s, x times 1/s as it is quantised): the kernel's quantisation of x
    equals the reference's of x / s bit for bit, the layer equals reference_linear with the same factors (and the
    PyTorch fallback), and the product stays x @ W^T within int8 rounding (weight_float undoes s)."""
    native = int8_native()
    gen = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=gen)
    w = torch.randn(N, K, generator=gen) * 0.05
    smooth = torch.rand(K, generator=gen) * 4 + 0.25
    layer = w8a8.W8A8Linear(w, torch.randn(N, generator=gen), smooth)
    assert torch.equal(layer.input_factors, 1 / smooth)
    if K % layer.group == 0:
        q, scales, _ = native.int8_quantize(x, layer.group, layer.input_factors)
        q_ref, scales_ref = w8a8.quantize_activations(x * layer.input_factors, layer.group)
        assert torch.equal(q, q_ref) and torch.equal(scales, scales_ref)
    padded = F.pad(x, (0, layer.padded - K))
    ref = w8a8.reference_linear(padded, layer.weight_rows(), layer.weight_scales, layer.bias, layer.group,
                                layer.input_factors)
    y = layer(x)
    # The same int8 values; the float sums of the groups in another order (their terms are larger here than
    # unsmoothed, so the bound is 1e-5 of the output range rather than 1e-6).
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (y - w8a8.W8A8Linear(w, layer.bias)(x)).abs().max() > 0  # the factors are used, not dropped
    # W * s rounded to int8 per group (scale r), then divided by s again: each weight is off by at most r / 2 / s.
    r = layer.weight_scales.t().repeat_interleave(layer.group, dim=1)[:, :K]
    bound = r / 2 * layer.input_factors[None, :]
    assert ((layer.weight_float() - w).abs() <= bound * (1 + 1e-5) + 1e-9).all()
    exact = x @ w.t() + layer.bias
    assert (y - exact).abs().max() <= 0.1 * exact.abs().max()
    with pytest.raises(RuntimeError, match="input factors"):
        packed_linear = native.int8_linear_amx if layer.layout == "amx" else native.int8_linear_units
        packed_linear(x, layer.packed, N, layer.weight_scales, layer.bias, layer.group, layer.input_factors[:-1])


def test_smoothing_shrinks_the_error_of_outlier_columns():
    """Activations whose few large columns set their groups' scales (as a decoder's do): smoothed by the maxima of
    another sample of the same kind, the product's error against float is a fraction of the unsmoothed one's."""
    gen = torch.Generator().manual_seed(11)
    K, N = 896, 256
    outliers = torch.randperm(K, generator=gen)[:6]

    def sample(rows: int) -> torch.Tensor:
        x = torch.randn(rows, K, generator=gen)
        x[:, outliers] *= 60
        return x

    w = torch.randn(N, K, generator=gen) * 0.05
    x = sample(64)
    exact = x @ w.t()
    smooth = w8a8.smoothing(sample(128).abs().amax(0), w.abs().amax(0))
    plain_error = (w8a8.W8A8Linear(w)(x) - exact).pow(2).mean()
    smoothed_error = (w8a8.W8A8Linear(w, None, smooth)(x) - exact).pow(2).mean()
    print(f"mean squared error: {plain_error:.3e} unsmoothed, {smoothed_error:.3e} smoothed")
    assert smoothed_error < 0.25 * plain_error


@pytest.mark.parametrize("M,K,N", [(3, 100, 9), (40, 3420, 24), (9, 1000, 17)])
def test_kernel_pads_x_itself(M, K, N):
    """A width that is not a multiple of 64 (the Qwen2.5-VL tower's 3420): the kernel quantises the unpadded x as
    if padded with zeros, and the layer equals the reference on x padded in PyTorch."""
    native = int8_native()
    gen = torch.Generator().manual_seed(K)
    x = torch.randn(M, K, generator=gen)
    layer = w8a8.W8A8Linear(torch.randn(N, K, generator=gen) * 0.05, torch.randn(N, generator=gen))
    assert layer.padded > K and layer.packed is not None
    padded = torch.nn.functional.pad(x, (0, layer.padded - K))
    ref = w8a8.reference_linear(padded, layer.weight_rows(), layer.weight_scales, layer.bias, layer.group)
    y = layer(x)
    assert (y - ref).abs().max() <= 1e-6 * ref.abs().max()
    packed_linear = native.int8_linear_amx if layer.layout == "amx" else native.int8_linear_units
    assert torch.equal(packed_linear(padded, layer.packed, N, layer.weight_scales, layer.bias, layer.group), y)
    with pytest.raises(RuntimeError, match="only the padding"):
        packed_linear(x[:, : K - 70] if K > 70 else x[:, :0], layer.packed, N, layer.weight_scales, layer.bias,
                      layer.group)


def test_units_layout():
    """pack_units (the AVX2 kernel's layout), checked in PyTorch on every host: unit u, 4-value step t, row r,
    byte c holds weight row 8u + r, column 4t + c, as its int8 value; rows are padded to 8 with zero weights."""
    gen = torch.Generator().manual_seed(8)
    rows = torch.randint(1, 256, (13, 128), generator=gen, dtype=torch.uint8)  # int8 values + 128
    packed = w8a8.pack_units(rows)
    assert packed.numel() == 16 * 128
    units = packed.view(torch.int8).view(2, 32, 8, 4)
    for u, t, r, c in [(0, 0, 0, 0), (0, 5, 3, 2), (1, 31, 4, 3), (1, 7, 0, 1)]:
        assert int(units[u, t, r, c]) == int(rows[8 * u + r, 4 * t + c]) - 128
    assert torch.equal(units[1, :, 5:], torch.zeros(32, 3, 4, dtype=torch.int8))  # padding rows 13-15
    assert torch.equal(w8a8.unpack_units(packed, 13, 128), rows)


def test_units16_layout():
    """pack_units16 (the AVX-512 VNNI kernel's layout), checked in PyTorch on every host: unit u, 4-value step t,
    row r, byte c holds weight row 16u + r, column 4t + c, as int8 + 128; rows are padded to 16 with zero
    weights."""
    gen = torch.Generator().manual_seed(9)
    rows = torch.randint(1, 256, (21, 128), generator=gen, dtype=torch.uint8)
    packed = w8a8.pack_units16(rows)
    assert packed.numel() == 32 * 128
    units = packed.view(2, 32, 16, 4)
    for u, t, r, c in [(0, 0, 0, 0), (0, 5, 3, 2), (1, 31, 4, 3), (1, 7, 0, 1), (0, 17, 15, 3)]:
        assert int(units[u, t, r, c]) == int(rows[16 * u + r, 4 * t + c])
    assert torch.equal(units[1, :, 5:], torch.full((32, 11, 4), 128, dtype=torch.uint8))  # padding rows 21-31
    assert torch.equal(w8a8.unpack_units16(packed, 21, 128), rows)


@pytest.mark.parametrize("group", [64, 128])
def test_weight_quantisation_equals_reference(group):
    native = int8_native()
    w = torch.randn(300, 896, generator=torch.Generator().manual_seed(3)) * 0.05
    w[3] = 0.0
    w[5, 7] = 2.5
    u8, scales = native.int8_quantize_weight(w, group)
    u8_ref, scales_ref = w8a8.quantize_weight(w, group)
    assert scales.shape == (300, 896 // group)
    assert torch.equal(u8, u8_ref) and torch.equal(scales, scales_ref)
    assert torch.equal(u8[3], torch.full((896,), 128, dtype=torch.uint8))
    # the outlier sets its own group's scale only
    assert scales[5, 0] == pytest.approx(2.5 / 127) and scales[5, 1:].max() < 0.3 / 127


def test_weight_scales_per_group_keep_the_small_columns():
    """A weight whose columns differ in size by stretches (as a smoothed one's do): rounded with a scale per group
    of the layer's width, its error against float is a fraction of that of one scale per row (the same reference
    with the group as wide as the row)."""
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(64, 896, generator=gen) * 0.02
    w[:, 128:256] *= 40
    layer = w8a8.W8A8Linear(w)
    per_group = (layer.weight_float() - w).pow(2).mean()
    u8, scales = w8a8.quantize_weight(w, 896)
    per_row = ((u8.to(torch.int16) - 128).float() * scales - w).pow(2).mean()
    print(f"weight mean squared error: {per_row:.3e} one scale per row, {per_group:.3e} per group of {layer.group}")
    assert per_group < 0.2 * per_row


@pytest.mark.parametrize("smoothed", [False, True])
def test_pytorch_fallback_gives_the_kernel_numbers(monkeypatch, smoothed):
    int8_native()
    gen = torch.Generator().manual_seed(5)
    smooth = torch.rand(256, generator=gen) + 0.5 if smoothed else None
    layer = w8a8.W8A8Linear(torch.randn(40, 256, generator=gen), None, smooth)
    x = torch.randn(2, 3, 256, generator=gen)
    native = layer(x)
    monkeypatch.setattr(kernels, "native", lambda: None)
    assert torch.allclose(layer(x), native, rtol=1e-5, atol=1e-5)


def test_stacked_rows_equal_separate_layers():
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(24, 128, generator=gen), torch.randn(8, 128, generator=gen)
    stacked = w8a8.W8A8Linear([a, b])
    x = torch.randn(4, 128, generator=gen)
    assert torch.equal(stacked(x), torch.cat([w8a8.W8A8Linear(a)(x), w8a8.W8A8Linear(b)(x)], dim=1))


def distance_on_demo_text(exact: LLM, lossy: LLM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(token ids, the exact model's log-probabilities, the KL of `lossy`'s at each position, greedy agreement)
    over 256 tokens of a fixed piece of code."""
    text = "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n" * 3 + \
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    ids = exact.tokenizer.encode(text * 2)[:256]
    p = F.log_softmax(exact.logits(ids), -1)
    q = F.log_softmax(lossy.logits(ids), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return ids, p, kl, (p.argmax(-1) == q.argmax(-1)).float().mean().item()


def test_demo_model_quality(demo_gguf, demo_llm, tmp_path, monkeypatch):
    keep_layers_in(monkeypatch, tmp_path)
    lossy = LLM(demo_gguf, progress=False, quantization="w8a8")
    assert all(not isinstance(m, torch.nn.Linear) for m in lossy.model.model.layers.modules())
    ids, p, kl, agreement = distance_on_demo_text(demo_llm, lossy)
    print(f"w8a8 on the demo: mean KL {kl.mean():.5f}, max {kl.max():.4f}, greedy agreement {agreement:.3f}")
    assert kl.mean() < 0.01 and agreement > 0.95
    assert kl.mean() > 0  # it is lossy: a mode that silently ran the float path would show 0

    if hasattr(kernels.native() or object(), "int8_linear_units"):
        assert_same_steps(lossy, PROMPTS[:2], 1e-3)  # the native step's int8 products = the PyTorch layers'

    # A second load maps the layers the first one kept (weights/w8a8_store.py): the same numbers, bit for bit.
    (kept,) = (tmp_path / "w8a8").glob("*.safetensors")
    convert_one = w8a8._int8
    monkeypatch.setattr(w8a8, "_int8", None)  # converting again would fail
    mapped = LLM(demo_gguf, progress=False, quantization="w8a8")
    assert torch.equal(mapped.logits(ids[:64]), lossy.logits(ids[:64]))
    # ... and the GGUF's own copies of those weights are never brought into this process's memory (where the
    # model keeps the file's blocks mapped: without the native kernels a GGUF loads dequantised)
    embed = mapped.model.model.embed_tokens
    resident = resident_bytes_of_mapping(embed.blocks.data_ptr()) if hasattr(embed, "blocks") else None
    if resident is not None:
        assert resident < 32 << 20, f"{resident >> 20} MiB of the GGUF mapped in (its weights are ~470 MiB)"
    del mapped
    kept.unlink()  # ~500 MB

    # Without smoothing (QWEN_ENGINE_W8A8_SMOOTHING=0) the same text moves further: measured 0.00077 nats
    # against 0.00050 (compare.py --quality's corpus: 0.00159 against 0.00106).
    del lossy
    monkeypatch.setattr(w8a8, "_int8", convert_one)
    monkeypatch.setenv("QWEN_ENGINE_W8A8_CACHE", "0")
    monkeypatch.setenv("QWEN_ENGINE_W8A8_SMOOTHING", "0")
    plain = LLM(demo_gguf, progress=False, quantization="w8a8")
    kl_plain = (p.exp() * (p - F.log_softmax(plain.logits(ids), -1))).sum(-1)
    print(f"w8a8 unsmoothed: mean KL {kl_plain.mean():.5f}")
    assert kl_plain.mean() > 1.5 * kl.mean()


def test_float_checkpoint_converts(tmp_path, qwen3_tokenizer_dir):
    build_tiny("qwen2", tmp_path, tokenizer_dir=qwen3_tokenizer_dir, seed=21)  # q/k/v biases, separate q/k/v
    exact, lossy = LLM(tmp_path), LLM(tmp_path, quantization="w8a8")
    attn = lossy.model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, w8a8.W8A8Linear) and attn.qkv_proj.bias is not None
    ids = [151644, 872, 198] + [1000 + 37 * i % 9000 for i in range(40)]
    a, b = exact.logits(ids), lossy.logits(ids)
    assert 0 < (a - b).abs().max() <= 0.1 * a.abs().max()  # random weights: no structure to keep the error small


def test_converted_layers_are_kept_and_mapped(tmp_path, qwen3_tokenizer_dir, monkeypatch):
    model, home = tmp_path / "model", tmp_path / "home"
    build_tiny("qwen2", model, tokenizer_dir=qwen3_tokenizer_dir, seed=22)
    keep_layers_in(monkeypatch, home)
    made = []
    convert_one = w8a8._int8
    monkeypatch.setattr(w8a8, "_int8", lambda layers, x_absmax=None: made.append(1) or convert_one(layers, x_absmax))
    ids = [151644, 872, 198] + [1000 + 37 * i % 9000 for i in range(40)]

    lossy = LLM(model, quantization="w8a8")
    first = lossy.logits(ids)
    (kept,) = (home / "w8a8").glob("*.safetensors")
    n = 4 * len(lossy.model.model.layers) + 1  # four products a layer, and the LM head
    assert len(made) == n
    # smoothed (models/calibration.py), all but down_proj, and the factors kept with the layers
    names = set(safe_open(str(kept), "pt").keys())
    assert {"lm_head.factors", "model.layers.1.self_attn.qkv_proj.factors", "model.layers.1.mlp.gate_up_proj.factors",
            "model.layers.1.self_attn.o_proj.factors"} <= names and "model.layers.1.mlp.down_proj.factors" not in names
    again = LLM(model, quantization="w8a8")
    assert len(made) == n and torch.equal(again.logits(ids), first)  # mapped, not converted
    assert isinstance(again.model.lm_head, w8a8.W8A8Linear) and again.model.model.layers[1].self_attn.q_proj is None
    # every mapped int8 weight starts on a cache line (the kernels' 64-byte loads lose 8-13 % across two)
    mapped = [m for m in again.model.modules() if isinstance(m, w8a8.W8A8Linear)]
    assert len(mapped) == n and all(m.tensors()["weight"].data_ptr() % 64 == 0 for m in mapped)

    # a changed model is converted again, and its stale layers removed
    st = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert torch.equal(LLM(model, quantization="w8a8").logits(ids), first) and len(made) == 2 * n
    (renewed,) = (home / "w8a8").glob("*.safetensors")
    assert renewed != kept

    # a file cut short is not read: the layers are converted again
    data = renewed.read_bytes()
    renewed.write_bytes(data[: len(data) // 2])
    assert torch.equal(LLM(model, quantization="w8a8").logits(ids), first) and len(made) == 3 * n
    assert renewed.stat().st_size == len(data)
    renewed.write_bytes((2).to_bytes(8, "little") + b"[]")  # a header of the wrong shape
    assert torch.equal(LLM(model, quantization="w8a8").logits(ids), first) and len(made) == 4 * n

    # QWEN_ENGINE_W8A8_SMOOTHING=0: converted without smoothing, kept under another name (the old one removed)
    monkeypatch.setenv("QWEN_ENGINE_W8A8_SMOOTHING", "0")
    plain = LLM(model, quantization="w8a8")
    assert len(made) == 5 * n and plain.model.lm_head.input_factors is None
    assert not torch.equal(plain.logits(ids), first)
    (renewed,) = (home / "w8a8").glob("*.safetensors")
    assert not any(name.endswith(".factors") for name in safe_open(str(renewed), "pt").keys())
    monkeypatch.delenv("QWEN_ENGINE_W8A8_SMOOTHING")

    # and with QWEN_ENGINE_W8A8_CACHE=0 nothing is read or written
    monkeypatch.setenv("QWEN_ENGINE_W8A8_CACHE", "0")
    assert torch.equal(LLM(model, quantization="w8a8").logits(ids), first)
    assert len(made) == 6 * n and list((home / "w8a8").iterdir()) == [renewed]

    # a folder that cannot be written costs the next load its speed, nothing else
    keep_layers_in(monkeypatch, tmp_path / "model" / "model.safetensors")  # a file, not a folder
    with pytest.warns(UserWarning, match="could not keep the w8a8 layers"):
        assert torch.equal(LLM(model, quantization="w8a8").logits(ids), first)


@pytest.mark.parametrize("huge_pages", ["0", "1"])
def test_store_puts_weights_on_cache_lines(tmp_path, monkeypatch, huge_pages):
    """Small float tensors (scales, factors) next to the int8 weights, named to sort before them: read back (mapped,
    or read whole into huge pages), every tensor of whole cache lines starts on one, the values are unchanged, and
    safetensors itself reads the file."""
    from test_weight_arena import huge_pages_of, thp_mode

    from qwen_engine.weights import w8a8_store

    monkeypatch.setenv("QWEN_ENGINE_HUGE_PAGES", huge_pages)

    gen = torch.Generator().manual_seed(13)
    tensors = {"a.factors": torch.randn(3, generator=gen), "a.scales": torch.randn(7, 5, generator=gen),
               "a.weight": torch.randint(0, 256, (8, 128), generator=gen, dtype=torch.uint8),
               "b.weight": torch.randint(0, 256, (24, 64), generator=gen, dtype=torch.uint8),
               "c.weight": torch.randint(0, 256, (4096, 1024), generator=gen, dtype=torch.uint8)}  # 4 MiB
    path = tmp_path / "layers.safetensors"
    w8a8_store.write(path, tensors)
    back = w8a8_store.read(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], t) for k, t in tensors.items())
    assert back["a.weight"].data_ptr() % 64 == 0 and back["b.weight"].data_ptr() % 64 == 0
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("a.scales"), tensors["a.scales"])
    if huge_pages == "1" and "[always]" not in thp_mode():
        assert huge_pages_of(back["c.weight"].data_ptr()) >= 2048  # at least one 2 MiB page of the 4 MiB
    back["b.weight"].zero_()  # a private copy either way: the file keeps its bytes
    assert torch.equal(w8a8_store.read(path)["b.weight"], tensors["b.weight"])
    path.write_bytes(path.read_bytes()[:-100])
    assert w8a8_store.read(path) is None  # cut short


def test_bad_settings_are_input_errors(demo_gguf):
    with pytest.raises(InputError, match="unknown quantization 'int3'"):
        LLM(demo_gguf, progress=False, quantization="int3")
    with pytest.raises(InputError, match="CPU in float32"):
        LLM(demo_gguf, progress=False, quantization="w8a8", dtype="bfloat16")


def test_inputs_not_a_multiple_of_64_are_padded():
    gen = torch.Generator().manual_seed(7)
    w, bias = torch.randn(33, 100, generator=gen), torch.randn(33, generator=gen)
    layer = w8a8.W8A8Linear(w, bias)
    assert layer.padded == 128 and layer.weight_rows().shape == (33, 128)
    assert torch.equal(layer.weight_rows()[:, 100:], torch.full((33, 28), 128, dtype=torch.uint8))  # zeros
    x = torch.randn(5, 100, generator=gen)
    ref = w8a8.reference_linear(F.pad(x, (0, 28)), layer.weight_rows(), layer.weight_scales, bias, layer.group)
    assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert (layer(x) - (x @ w.t() + bias)).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_vision_language_model(family, tmp_path, qwen3_tokenizer_dir):
    from test_vl_engine import ask
    from test_vl_parity import picture
    from vl_models import build_vl

    build_vl(family, tmp_path, qwen3_tokenizer_dir)
    exact = LLM(tmp_path, progress=False, kv_cache_memory=32 << 20)
    lossy = LLM(tmp_path, progress=False, kv_cache_memory=32 << 20, quantization="w8a8")
    assert isinstance(lossy.model.lm_head, w8a8.W8A8Linear)
    assert all(not isinstance(m, w8a8.W8A8Linear) for m in lossy.model.visual.modules())  # the tower stays float
    prompt = exact.encode_chat(ask(picture(200, 150, 3)))
    a, b = exact.logits(prompt), lossy.logits(prompt)
    assert 0 < (a - b).abs().max() <= 0.1 * a.abs().max()  # random weights: no structure to keep the error small

    # "w8a8-vision" converts the tower too (its MLP inputs of 96 are padded to 128; attention in bf16 where the
    # build can): close to the float tower.
    towered = LLM(tmp_path, progress=False, kv_cache_memory=32 << 20, quantization="w8a8-vision")
    tower = towered.model.visual
    assert all(block.attn.products == "int8" for block in tower.blocks)
    assert tower.reuse_freed_memory and not lossy.model.visual.reuse_freed_memory  # models/heap.py
    assert sum(isinstance(m, w8a8.W8A8Linear) for m in tower.modules()) == sum(
        isinstance(m, torch.nn.Linear) for m in lossy.model.visual.modules())
    pixels, grid = prompt.items[0].pixel_values, torch.tensor([prompt.items[0].grid_thw])
    with torch.inference_mode():
        ref, out = lossy.model.visual(pixels, grid), tower(pixels, grid)
    assert 0 < (out - ref).abs().max() <= 0.1 * ref.abs().max()
    c = towered.logits(prompt)
    assert 0 < (a - c).abs().max() <= 0.1 * a.abs().max()
