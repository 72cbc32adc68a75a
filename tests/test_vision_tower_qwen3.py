"""Qwen3-VL vision tower against transformers 5.23's `model.visual` (Qwen3VLVisionModel).

A tiny Qwen3-VL (shared/design/oracle.md §1: patch 16, the real 48x48 learned position table, gelu-tanh,
DeepStack after blocks 1, 2, 3; text head_dim 32 with interleaved M-RoPE [6, 5, 5]) is built by transformers,
its weights perturbed (§9: N(0, 0.1), norm weights 1 + N(0, 0.1)) and saved; our tower loads the saved
`model.visual.*` tensors and runs on pixel_values from our own preprocessing. The merged tokens and every
DeepStack feature must agree within 1e-4 (fp32); the integer layout (cu_seqlens, position-table taps) must be
equal.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from vl_models import perturb

from qwen_engine.errors import ModelLoadError
from qwen_engine.models.vision import VisionConfig, VisionTransformer, load_vision_weights
from qwen_engine.models.vision_layout import pos_embed_taps
from qwen_engine.vision import ImageProcessorConfig, preprocess_image

TEXT = dict(
    vocab_size=512,  # only the vision tower is tested; the real special-token ids need not fit
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [6, 5, 5],
        "mrope_interleaved": True,
    },
)
VISION = dict(
    depth=4,
    hidden_size=64,
    intermediate_size=96,
    num_heads=4,
    out_hidden_size=64,
    patch_size=16,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[1, 2, 3],
)
TOLERANCE = 1e-4
PATCH_DIM = 3 * 2 * 16 * 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The reference is bit-reproducible run to run at 1 thread (oracle.md §9); restore for other modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    import transformers

    cfg = transformers.Qwen3VLConfig(text_config=TEXT, vision_config=VISION)
    torch.manual_seed(0)
    ref = transformers.Qwen3VLForConditionalGeneration._from_config(
        cfg, attn_implementation="eager", dtype=torch.float32
    )
    perturb(ref, seed=1)
    ref.eval()
    folder = tmp_path_factory.mktemp("qwen3_vl")
    ref.save_pretrained(folder)
    ours = VisionTransformer(VisionConfig.from_dir(folder))
    load_vision_weights(ours, folder)
    ours.eval()
    return ref, ours, folder


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    pixels = np.repeat(np.repeat(blocks, 16, 0), 16, 1)[:height, :width]
    noise = rng.integers(-20, 21, pixels.shape)
    return Image.fromarray(np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8))


def _images(sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    # A small pixel budget keeps the test fast; 211x97 and 333x177 fall below min_pixels and are scaled up.
    config = dataclasses.replace(ImageProcessorConfig.for_family("qwen3_vl"), max_pixels=160_000)
    processed = [preprocess_image(_image(w, h, seed=i), config) for i, (w, h) in enumerate(sizes)]
    pixels = torch.cat([p.pixel_values for p in processed])
    grid = torch.tensor([p.grid_thw for p in processed], dtype=torch.long)
    return pixels, grid


def _video_and_image() -> tuple[torch.Tensor, torch.Tensor]:
    # Two temporal patches of a clip (each its own attention segment) plus an image.
    grid = torch.tensor([[2, 12, 16], [1, 8, 10]])
    pixels = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=torch.Generator().manual_seed(3))
    return pixels, grid


BATCHES = {
    "one 320x240": lambda: _images([(320, 240)]),
    "two odd sizes": lambda: _images([(211, 97), (333, 177)]),
    "t=2 grid + image": _video_and_image,
}


def _reference(ref, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        out = ref.model.visual(pixels, grid_thw=grid)
    return out.pooler_output, list(out.deepstack_features)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_outputs_match_reference(tiny, batch: str) -> None:
    ref, ours, _ = tiny
    pixels, grid = BATCHES[batch]()
    expected, expected_deep = _reference(ref, pixels, grid)
    with torch.no_grad():
        merged, deep = ours.encode(pixels, grid)
        assert torch.equal(ours(pixels, grid), merged)
    assert merged.shape == (pixels.shape[0] // 4, 64)
    assert len(deep) == len(expected_deep) == 3
    # measured: ≤ 8.4e-6 with max|output| ≈ 6–9 (transformers eager vs its own sdpa: 3.8e-6)
    for name, got, want in [("merged", merged, expected)] + [
        (f"deepstack {k}", d, e) for k, (d, e) in enumerate(zip(deep, expected_deep, strict=True))
    ]:
        assert got.shape == want.shape
        diff = (got - want).abs().max().item()
        assert diff <= TOLERANCE, f"{batch} {name}: max|Δ| = {diff:.2e}"
        assert want.abs().max().item() > 0.1


GRIDS = torch.tensor([[1, 16, 20], [2, 12, 16], [1, 64, 100], [1, 2, 2], [3, 48, 48], [1, 30, 10]])


def test_integer_layout_matches_reference(tiny) -> None:
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_interpolation_indices_and_weights

    _, ours, _ = tiny
    layout = ours.layout(GRIDS)
    assert torch.equal(layout.cu_seqlens, get_vision_cu_seqlens(GRIDS))
    assert torch.equal(layout.window_index, torch.arange(int(GRIDS.prod(-1).sum()) // 4))
    index, weight = get_vision_interpolation_indices_and_weights(
        GRIDS, num_grid_per_side=48, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    assert torch.equal(layout.pos_index, index)
    torch.testing.assert_close(layout.pos_weight, weight, atol=1e-6, rtol=0)
    assert ours.layout(GRIDS) is layout  # cached per grid_thw


@pytest.mark.parametrize("align_corners", [True, False])
def test_position_taps_are_bilinear_interpolation(align_corners: bool) -> None:
    # Independent of transformers: the 4-tap sums equal F.interpolate of the table, reordered to merge blocks.
    table = torch.randn(48 * 48, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for h, w in [(16, 20), (64, 100), (2, 2), (48, 48), (30, 10)]:
        index, weight = pos_embed_taps(h, w, 2, 48, align_corners)
        got = F.embedding_bag(index, table, per_sample_weights=weight.double(), mode="sum")
        grid = table.T.reshape(1, 8, 48, 48)
        full = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=align_corners)[0]
        blocks = full.reshape(8, h // 2, 2, w // 2, 2).permute(1, 3, 2, 4, 0).reshape(h * w, 8)
        # The weights are float32 as in the reference (source coordinates up to 47 carry ~3e-6 of rounding);
        # measured ≤ 8.2e-6 on this N(0, 1) table. A wrong tap or corner convention moves it by ~0.1–1.
        torch.testing.assert_close(got, blocks, atol=3e-5, rtol=0)


def test_interpolation_and_deepstack_are_observable(tiny) -> None:
    ref, ours, folder = tiny
    pixels, grid = _images([(320, 240)])
    expected, expected_deep = _reference(ref, pixels, grid)

    half_pixel = VisionTransformer(ours.config)
    load_vision_weights(half_pixel, folder)
    half_pixel.interpolation_align_corners = False
    shifted = VisionTransformer(dataclasses.replace(ours.config, deepstack_visual_indexes=(0, 1, 2)))
    load_vision_weights(shifted, folder)
    with torch.no_grad():
        merged, deep = half_pixel.encode(pixels, grid)
        shifted_merged, shifted_deep = shifted.encode(pixels, grid)
    # measured: 0.73 (merged, half-pixel resampling), ≥ 1.5 (DeepStack features from the wrong blocks)
    assert (merged - expected).abs().max().item() > 100 * TOLERANCE
    assert min((d - e).abs().max().item() for d, e in zip(shifted_deep, expected_deep, strict=True)) > 0.1
    # DeepStack taps the blocks without feeding back: the final merged tokens do not move.
    assert (shifted_merged - expected).abs().max().item() <= TOLERANCE


def test_bfloat16_runs_close_to_float32(tiny) -> None:
    _, ours, _ = tiny
    pixels, grid = _images([(320, 240)])
    half = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.no_grad():
        want, want_deep = ours.encode(pixels, grid)
        got, got_deep = half.encode(pixels, grid)
    assert got.dtype == torch.bfloat16 and len(got_deep) == 3
    for g, w in [(got, want)] + list(zip(got_deep, want_deep, strict=True)):
        relative = (g.float() - w).norm() / w.norm()  # measured: 0.0075
        assert relative < 0.05, f"bf16 relative error {relative:.3f}"


@pytest.mark.parametrize("products", ["bf16", "int8"])
def test_lossy_attention_stays_close_to_float32(tiny, products: str) -> None:
    """VisionTransformer.lossy_attention (q, k, v and the softmax weights in bf16, q·k in int8 for "int8") moves
    a float32 tower's outputs by about that rounding, not more; turned off, the tower is float32 again, bit for
    bit."""
    from qwen_engine import kernels

    native = kernels.native()
    if native is None or not native.segment_attention_supports(VISION["hidden_size"] // VISION["num_heads"], True):
        pytest.skip("this build has no AVX512-BF16 and VNNI kernels")
    _, ours, _ = tiny
    pixels, grid = _images([(320, 240), (211, 97)])
    lossy = copy.deepcopy(ours)
    lossy.lossy_attention(products)
    with torch.no_grad():
        want, want_deep = ours.encode(pixels, grid)
        got, got_deep = lossy.encode(pixels, grid)
        lossy.lossy_attention(None)
        assert torch.equal(lossy(pixels, grid), want)
    assert got.dtype == torch.float32
    for g, w in [(got, want)] + list(zip(got_deep, want_deep, strict=True)):
        relative = (g - w).norm() / w.norm()  # measured: bf16 1.8e-4 to 2.4e-4, int8 4.8e-4 to 6.4e-4
        assert 0 < relative < 2e-3, f"relative error {relative:.4f}"


def test_config_from_hub_and_aliases(tiny, tmp_path: Path) -> None:
    # Qwen3-VL-2B-Instruct's vision_config as released (Hub spelling: no rope entry).
    hub = {"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
           "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
           "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048,
           "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
    two_b = VisionConfig.from_dict(hub, "qwen3_vl")
    assert (two_b.family, two_b.embed_dim, two_b.head_dim, two_b.out_hidden_size) == (
        "qwen3_vl",
        1024,
        64,
        2048,
    )
    assert two_b.deepstack_visual_indexes == (5, 11, 17) and two_b.pos_side == 48
    assert two_b.window_tokens is None and two_b.rope_theta == 10000.0
    assert VisionConfig.from_dict(hub, "qwen3_vl_moe") == two_b

    _, ours, folder = tiny
    config = json.loads((folder / "config.json").read_text())
    for model_type in ("qwen3_vl_moe", "something_new"):
        (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        assert VisionConfig.from_dir(tmp_path) == ours.config

    with pytest.raises(ModelLoadError, match="deepstack_visual_indexes"):
        VisionConfig.from_dict({**hub, "deepstack_visual_indexes": [5, 24]}, "qwen3_vl")
    with pytest.raises(ModelLoadError, match="square"):
        VisionConfig.from_dict({**hub, "num_position_embeddings": 2300}, "qwen3_vl")


def test_loader_is_strict(tiny, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _, ours, folder = tiny
    tensors = load_file(str(folder / "model.safetensors"))
    dropped = {k: v for k, v in tensors.items() if k != "model.visual.pos_embed.weight"}
    (tmp_path / "missing").mkdir()
    save_file(dropped, str(tmp_path / "missing" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing.*pos_embed.weight"):
        load_vision_weights(ours, tmp_path / "missing")
    # A config with two DeepStack taps against a checkpoint holding three mergers.
    fewer = VisionTransformer(dataclasses.replace(ours.config, deepstack_visual_indexes=(1, 2)))
    with pytest.raises(ModelLoadError, match="unexpected.*deepstack_merger_list.2"):
        load_vision_weights(fewer, folder)
