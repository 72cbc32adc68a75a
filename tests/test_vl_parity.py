"""Vision-language models end to end against transformers 5.23 on tiny random checkpoints of each family.

`llm.encode_chat` builds the prompt (ids, pixels, grids, M-RoPE positions); `llm.logits(prompt)` must be within
1e-4 of the reference model given the same ids, pixels and positions. Positions are checked separately: for
images they must equal transformers' own `get_rope_index`; for videos, where transformers 5 departs from the
original Qwen behaviour (oracle.md §6), they must equal the original rule, written out in fixtures below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from vl_models import IDS, build_vl

from qwen_engine import LLM
from qwen_engine.errors import InputError

TOLERANCE = 1e-4
# Qwen3-VL-MoE in the Hub's fused-expert layout; Qwen3.5 (hybrid decoder, Qwen3-VL's tower and prompts) as
# transformers 5 saves it.
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"]
QWEN3_STYLE = ("qwen3_vl", "qwen3_5")  # 16-pixel patches, timestamped video frames


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 4, height // 4, width // 2, height // 2), fill=(250, 30, 30))
    return image


@pytest.fixture(scope="module", params=FAMILIES)
def vl(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, qwen3_tokenizer_dir):
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    ref = build_vl(family, folder, qwen3_tokenizer_dir, hub_config=family not in ("qwen2_vl", "qwen3_5"))
    llm = LLM(folder, progress=False, max_model_len=4096, kv_cache_memory=64 << 20)
    return family, ref, llm


def reference_logits(ref, prompt) -> torch.Tensor:
    ids = torch.tensor([prompt.token_ids])
    kwargs = {}
    if prompt.images:
        kwargs["pixel_values"] = torch.cat([i.pixel_values for i in prompt.images])
        kwargs["image_grid_thw"] = torch.tensor([i.grid_thw for i in prompt.images])
    if prompt.videos:
        kwargs["pixel_values_videos"] = torch.cat([v.pixel_values for v in prompt.videos])
        kwargs["video_grid_thw"] = torch.tensor([v.grid_thw for v in prompt.videos])
    mm = (ids == IDS["image_token_id"]).int() + 2 * (ids == IDS["video_token_id"]).int()
    with torch.no_grad():
        out = ref(input_ids=ids, mm_token_type_ids=mm, position_ids=prompt.positions[:, None, :], **kwargs)
    return out.logits[0].float()


def reference_positions(ref, prompt) -> torch.Tensor:
    ids = torch.tensor([prompt.token_ids])
    mm = (ids == IDS["image_token_id"]).int() + 2 * (ids == IDS["video_token_id"]).int()
    grids = torch.tensor([i.grid_thw for i in prompt.images]) if prompt.images else None
    positions, deltas = ref.model.get_rope_index(ids, mm, image_grid_thw=grids)
    return positions[:, 0], int(deltas[0, 0])


def one_image():
    return [{"role": "user", "content": [{"type": "image", "image": picture(320, 240, 0)},
                                         {"type": "text", "text": "What is in the picture?"}]}]


def two_images():
    return [
        {"role": "system", "content": "You look at pictures."},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare "},
            {"image": picture(200, 150, 1)},
            {"type": "text", "text": " with "},
            {"type": "image_url", "image_url": {"url": picture_data_url(333, 217, 2)}},
            {"type": "text", "text": "."},
        ]},
    ]


def picture_data_url(width: int, height: int, seed: int) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    picture(width, height, seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def make_video(path, frames: int = 16, fps: int = 8, size: tuple[int, int] = (160, 120)) -> str:
    """An mp4 (mpeg4) of a square moving across a noisy background, written with PyAV."""
    import av

    width, height = size
    rng = np.random.default_rng(7)
    background = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = background.copy()
            x = (i * 7) % (width - 24)
            frame[20:44, x : x + 24] = (255, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def video_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def one_video(video_file: str):
    return [{"role": "user", "content": [{"type": "video", "video": video_file, "fps": 2.0},
                                         {"type": "text", "text": "What moves?"}]}]


def image_video_text(video_file: str):
    return [{"role": "user", "content": [
        {"type": "text", "text": "Look: "},
        {"type": "image", "image": picture(320, 240, 0)},
        {"type": "text", "text": " and "},
        {"type": "video", "video": "file://" + video_file, "fps": 4.0, "max_pixels": 160 * 32 * 32},
        {"type": "text", "text": " What changed?"},
    ]}]


@pytest.mark.parametrize("messages", [one_video, image_video_text], ids=["one_video", "image_video_text"])
def test_video_prompt_logits_match_reference(vl, video_file, messages) -> None:
    """The reference gets our ids and positions (transformers 5 would compute other positions after a video,
    and other ids for a Qwen3-VL video: oracle.md §6); the positions are checked against the original rule."""
    family, ref, llm = vl
    prompt = llm.encode_chat(messages(video_file), add_generation_prompt=True)
    (video,) = prompt.videos
    t, h, w = video.grid_thw
    ids = prompt.token_ids
    merge = 2
    if family.startswith(QWEN3_STYLE):
        # One "<t seconds><|vision_start|>pads<|vision_end|>" per frame group, no outer wrapper.
        assert len(video.timestamps) == t
        text = llm.tokenizer.decode(ids, skip_special_tokens=False)
        stamps = [f"<{stamp:.1f} seconds><|vision_start|>" for stamp in video.timestamps]
        assert all(stamp in text for stamp in stamps)
        assert "<|vision_start|><" not in text.replace("<|vision_start|><|", "")  # no wrapper before the first time
        for g in range(t):  # each frame group's block: time 0 within it, rows and columns from its start
            rows = video.rows[g * (h * w // 4) : (g + 1) * (h * w // 4)]
            block = prompt.positions[:, rows]
            start = int(prompt.positions[0, rows[0] - 1]) + 1
            assert block[0].tolist() == [start] * len(rows)
            assert int(block[1].max()) == start + h // merge - 1
    else:
        rows = video.rows
        block = prompt.positions[:, rows]
        start = int(prompt.positions[0, rows[0] - 1]) + 1
        step = 1 if family == "qwen2_vl" else video.seconds_per_group * 2  # tokens_per_second = 2
        expected_time = [start + int(g * step) for g in range(t)]
        assert block[0].reshape(t, -1)[:, 0].tolist() == expected_time
        after = int(rows[-1]) + 1
        assert int(prompt.positions[0, after]) == int(block.max()) + 1  # the original rule (oracle.md §6 a)
    ours = llm.logits(prompt)
    theirs = reference_logits(ref, prompt)
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOLERANCE, f"{family}: max |Δlogit| {diff:.2e}"
    assert len(ids) == ours.shape[0]


@pytest.mark.parametrize("messages", [one_image, two_images], ids=["one_image", "two_images"])
def test_image_prompt_logits_match_reference(vl, messages) -> None:
    family, ref, llm = vl
    prompt = llm.encode_chat(messages(), add_generation_prompt=True)
    expected_positions, expected_delta = reference_positions(ref, prompt)
    assert torch.equal(prompt.positions, expected_positions)
    assert prompt.rope_delta == expected_delta
    ours = llm.logits(prompt)
    theirs = reference_logits(ref, prompt)
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOLERANCE, f"{family}: max |Δlogit| {diff:.2e}"
    assert theirs.abs().max() > 1.0  # the check has teeth: logits are not near zero


def test_image_tokens_and_grid(vl) -> None:
    family, _, llm = vl
    prompt = llm.encode_chat(one_image())
    (item,) = prompt.items
    factor = 32 if family.startswith(QWEN3_STYLE) else 28
    # 320x240 → smart_resize: 252x308 (factor 28) or 256x320 (factor 32), oracle.md §3
    assert item.resized_size == ((256, 320) if factor == 32 else (252, 308))
    assert item.grid_thw == ((1, 16, 20) if factor == 32 else (1, 18, 22))
    ids = torch.tensor(prompt.token_ids)
    assert int((ids == IDS["image_token_id"]).sum()) == item.num_tokens == (80 if factor == 32 else 99)
    start = int(item.rows[0])
    assert prompt.token_ids[start - 1] == IDS["vision_start_token_id"]
    assert prompt.token_ids[start + item.num_tokens] == IDS["vision_end_token_id"]


def reference_greedy_with_images(ref, llm, messages, tokens: int) -> list[int]:
    """The reference's greedy tokens for a vision prompt, one full forward per token."""
    prompt = llm.encode_chat(messages)
    ids, positions, expected = list(prompt.token_ids), prompt.positions, []
    for _ in range(tokens):
        p = torch.cat(
            [positions, (torch.arange(positions.shape[1], len(ids)) + prompt.rope_delta).expand(3, -1)], dim=1
        )
        tmp = type(prompt)(ids, prompt.items, p, prompt.rope_delta)
        token = int(reference_logits(ref, tmp)[-1].argmax())
        expected.append(token)
        ids.append(token)
    return expected


def test_generation_with_image_matches_greedy_reference(vl) -> None:
    """Greedy decoding through the paged engine equals greedy decoding of the reference with its own cache."""
    from qwen_engine import SamplingParams

    family, ref, llm = vl
    out = llm.chat(one_image(), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out.token_ids == reference_greedy_with_images(ref, llm, one_image(), 8)


@pytest.mark.parametrize("vl", ["qwen3_5"], indirect=True)
def test_hybrid_model_resumes_an_image_prompt_from_its_saved_state(vl) -> None:
    """Qwen3.5 with prefix caching: the same image prompt again resumes from the recurrent state saved at its
    last block boundary; the same text with another picture must not (the image is part of the blocks' names)."""
    from qwen_engine import SamplingParams

    _, ref, llm = vl
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.chat(one_image(), params)
    restored = llm.engine.states.restored
    again = llm.chat(one_image(), params)
    assert llm.engine.states.restored == restored + 1
    assert first.token_ids == again.token_ids == reference_greedy_with_images(ref, llm, one_image(), 6)
    other = [{"role": "user", "content": [{"type": "image", "image": picture(320, 240, 9)},
                                          {"type": "text", "text": "What is in the picture?"}]}]
    llm.chat(other, params)
    assert llm.engine.states.restored == restored + 1


def test_same_image_is_encoded_once(vl) -> None:
    _, _, llm = vl
    from qwen_engine import SamplingParams

    llm.engine.vision_cache.clear()
    calls = []
    visual = llm.model.visual
    original = visual.encode
    visual.encode = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        for _ in range(2):
            llm.chat(one_image(), SamplingParams(temperature=0, max_tokens=2))
    finally:
        del visual.encode
    assert len(calls) == 1


def test_text_only_model_rejects_images(tmp_path, qwen3_tokenizer_dir) -> None:
    from tiny_models import build_tiny

    build_tiny("qwen2", tmp_path, tokenizer_dir=qwen3_tokenizer_dir)
    llm = LLM(tmp_path, progress=False, kv_cache_memory=16 << 20)
    with pytest.raises(InputError, match="text only"):
        llm.chat(one_image())
