"""Qwen2-VL and Qwen2.5-VL vision towers against transformers 5.23's `visual` module.

Tiny random models (shared/design/oracle.md §1) with strongly perturbed weights (§9: N(0, 0.1), norm weights
1 + N(0, 0.1)) are saved by transformers; our tower loads the saved `visual.*` tensors and runs on pixel_values
from our own preprocessing. Merged outputs must agree within 1e-4 (fp32); the integer layout (cu_seqlens,
window index, cu_window_seqlens) must be equal. 320x240 gives a 9x11 merged grid, i.e. 3x3 windows of 4x4
merged tokens with ragged edges; 448x448 (16x16 merged) is divisible by the window, where the reference pads a
whole empty window that it later drops.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from vl_models import perturb

from qwen_engine.errors import ModelLoadError
from qwen_engine.models.vision import VisionConfig, VisionTransformer, load_vision_weights
from qwen_engine.vision import ImageProcessorConfig, preprocess_image

TEXT = dict(
    vocab_size=512,  # only the vision tower is tested; the real special-token ids need not fit
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
)
VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=64, hidden_size=64, mlp_ratio=2, num_heads=4),
    "qwen2_5_vl": dict(
        depth=4,
        hidden_size=64,
        intermediate_size=96,
        out_hidden_size=64,
        num_heads=4,
        window_size=112,
        fullatt_block_indexes=[1, 3],
        tokens_per_second=2,
    ),
}
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    import transformers

    family = request.param
    if family == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(text_config=TEXT, vision_config=VISION[family])
        cls = transformers.Qwen2VLForConditionalGeneration
    else:
        cfg = transformers.Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION[family])
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    ref = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    perturb(ref, seed=1)
    ref.eval()
    folder = tmp_path_factory.mktemp(family)
    ref.save_pretrained(folder)
    ours = VisionTransformer(VisionConfig.from_dir(folder))
    load_vision_weights(ours, folder)
    ours.eval()
    return family, ref, ours, folder


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    pixels = np.repeat(np.repeat(blocks, 16, 0), 16, 1)[:height, :width]
    noise = rng.integers(-20, 21, pixels.shape)
    return Image.fromarray(np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8))


def _inputs(family: str, sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    config = ImageProcessorConfig.for_family(family)
    processed = [preprocess_image(_image(w, h, seed=i), config) for i, (w, h) in enumerate(sizes)]
    pixels = torch.cat([p.pixel_values for p in processed])
    grid = torch.tensor([p.grid_thw for p in processed], dtype=torch.long)
    return pixels, grid


BATCHES = {
    "one 320x240": [(320, 240)],
    "odd 211x97": [(211, 97)],
    "two images": [(320, 240), (448, 448)],
}


@pytest.mark.parametrize("batch", list(BATCHES))
def test_merged_outputs_match_reference(tiny, batch: str) -> None:
    family, ref, ours, _ = tiny
    pixels, grid = _inputs(family, BATCHES[batch])
    with torch.no_grad():
        expected = ref.model.visual(pixels, grid_thw=grid).pooler_output
        got = ours(pixels, grid)
    assert got.shape == (pixels.shape[0] // 4, 64)
    diff = (got - expected).abs().max().item()
    # measured: ≤ 6.5e-6 with max|output| ≈ 6–8
    assert diff <= TOLERANCE, f"{family} {batch}: max|Δ| = {diff:.2e}"
    assert expected.abs().max().item() > 0.1


def test_encode_has_no_deepstack_features(tiny) -> None:
    family, _, ours, _ = tiny
    pixels, grid = _inputs(family, BATCHES["one 320x240"])
    with torch.no_grad():
        merged, deepstack = ours.encode(pixels, grid)
        assert torch.equal(merged, ours(pixels, grid))
    assert deepstack == []


def test_video_grid_matches_reference(tiny) -> None:
    # Two temporal patches of one clip plus an image: frames are separate attention segments.
    family, ref, ours, _ = tiny
    grid = torch.tensor([[2, 10, 14], [1, 4, 6]])
    pixels = torch.randn(
        int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        diff = (ours(pixels, grid) - ref.model.visual(pixels, grid_thw=grid).pooler_output).abs().max().item()
    assert diff <= TOLERANCE, f"{family} video grid: max|Δ| = {diff:.2e}"


def test_integer_layout_matches_reference(tiny) -> None:
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    family, _, ours, _ = tiny
    # a video-like grid (t=2) as well as images, to check frames stay separate segments
    grid = torch.tensor([[1, 18, 22], [2, 10, 14], [1, 32, 32], [1, 4, 6]])
    layout = ours.layout(grid)
    assert torch.equal(layout.cu_seqlens, get_vision_cu_seqlens(grid))
    if family == "qwen2_5_vl":
        window_index, cu_window = get_vision_window_index(
            grid, spatial_merge_size=2, window_size=112, patch_size=14
        )
        assert torch.equal(layout.window_index, window_index)
        assert torch.equal(layout.cu_window_seqlens, cu_window)
    else:
        assert torch.equal(layout.window_index, torch.arange(int(grid.prod(-1).sum()) // 4))
    assert ours.layout(grid) is layout  # cached per grid_thw


def test_window_attention_is_observable(tiny) -> None:
    family, _, ours, folder = tiny
    if family != "qwen2_5_vl":
        pytest.skip("only Qwen2.5-VL has window attention")
    pixels, grid = _inputs(family, BATCHES["one 320x240"])
    every_block_full = dataclasses.replace(ours.config, fullatt_block_indexes=tuple(range(ours.config.depth)))
    unwindowed = VisionTransformer(every_block_full)
    load_vision_weights(unwindowed, folder)
    with torch.no_grad():
        diff = (ours(pixels, grid) - unwindowed(pixels, grid)).abs().max().item()
    # measured: 0.63
    assert diff > 1e-2, f"window attention changes the output by only {diff:.2e}"


def test_config_from_hub_spelling() -> None:
    # Released configs: Qwen2-VL with in_chans and no hidden_act; Qwen2.5-VL with in_chans, no rope entry.
    two = VisionConfig.from_dict(
        {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 1536,
         "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "qwen2_vl",
    )  # fmt: skip
    assert (two.embed_dim, two.intermediate_size, two.out_hidden_size) == (1280, 5120, 1536)
    assert two.hidden_act == "quick_gelu"
    assert two.window_tokens is None and two.head_dim == 80
    five = VisionConfig.from_dict(
        {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
         "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "window_size": 112,
         "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
        "qwen2_5_vl",
    )  # fmt: skip
    assert (five.embed_dim, five.out_hidden_size, five.window_tokens) == (1280, 3584, 4)
    assert five.fullatt_block_indexes == (7, 15, 23, 31)
    with pytest.raises(ModelLoadError):
        VisionConfig.from_dict({"depth": 2}, "qwen2_5_vl")


def test_loader_is_strict(tiny, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _, _, ours, folder = tiny
    tensors = load_file(str(folder / "model.safetensors"))
    dropped = dict(tensors)
    dropped.pop("visual.merger.ln_q.weight")
    (tmp_path / "missing").mkdir()
    save_file(dropped, str(tmp_path / "missing" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing.*merger.ln_q.weight"):
        load_vision_weights(ours, tmp_path / "missing")
    extra = dict(tensors)
    extra["visual.blocks.99.attn.qkv.weight"] = torch.zeros(1)
    (tmp_path / "extra").mkdir()
    save_file(extra, str(tmp_path / "extra" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="unexpected.*blocks.99"):
        load_vision_weights(ours, tmp_path / "extra")
    load_vision_weights(ours, folder)  # leave the shared model as loaded
