"""Message forms, per-item options and bad vision input through the Python API (tiny Qwen2.5-VL)."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image
from test_vl_parity import make_video, picture
from vl_models import IDS, build_vl

from qwen_engine import LLM, SamplingParams
from qwen_engine.errors import ContextLengthError, InputError


@pytest.fixture(scope="module")
def llm(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    folder = tmp_path_factory.mktemp("vl-inputs")
    build_vl("qwen2_5_vl", folder, qwen3_tokenizer_dir)
    return LLM(folder, progress=False, kv_cache_memory=16 << 20, max_model_len=2048)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl-input-files")
    picture(320, 240, 0).save(root / "photo.png")
    picture(320, 240, 0).convert("RGBA").save(root / "photo_rgba.png")
    (root / "notes.txt").write_text("not an image")
    (root / "empty.mp4").write_bytes(b"")
    make_video(root / "clip.mp4")
    Image.new("RGB", (1000, 4)).save(root / "strip.png")  # aspect ratio 250
    return root


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def test_every_image_form_gives_the_same_prompt(llm, files):
    path = files / "photo.png"
    data = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    forms = [
        {"type": "image", "image": str(path)},
        {"image": str(path)},
        {"type": "image", "image": f"file://{path}"},
        {"type": "image", "image": Image.open(path)},
        {"type": "image", "image": path.read_bytes()},
        {"type": "image_url", "image_url": {"url": data}},
        {"type": "image_url", "image_url": data},
    ]
    prompts = [llm.encode_chat(user(form, {"type": "text", "text": "What?"})) for form in forms]
    first = prompts[0]
    for prompt in prompts[1:]:
        assert prompt.token_ids == first.token_ids
        assert torch.equal(prompt.items[0].pixel_values, first.items[0].pixel_values)
        assert prompt.items[0].content_hash == first.items[0].content_hash


def test_order_of_parts_and_vision_ids(llm, files):
    prompt = llm.encode_chat(
        user({"type": "text", "text": "A:"}, {"type": "video", "video": str(files / "clip.mp4")},
             {"type": "text", "text": "B:"}, {"type": "image", "image": str(files / "photo.png")}),
        add_vision_id=True,
    )
    assert [item.kind for item in prompt.items] == ["video", "image"]
    assert prompt.items[0].rows[0] < prompt.items[1].rows[0]
    text = llm.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
    assert "A:Video 1: <|vision_start|><|video_pad|>" in text
    assert "B:Picture 1: <|vision_start|><|image_pad|>" in text


def test_item_options_change_the_grid(llm, files):
    image = str(files / "photo.png")
    small = llm.encode_chat(user({"type": "image", "image": image, "max_pixels": 64 * 28 * 28}))
    sized = llm.encode_chat(user({"type": "image", "image": image, "resized_height": 112, "resized_width": 224}))
    assert small.items[0].num_tokens <= 64
    assert sized.items[0].grid_thw == (1, 8, 16) and sized.items[0].resized_size == (112, 224)
    few = llm.encode_chat(user({"type": "video", "video": str(files / "clip.mp4"), "nframes": 4}))
    many = llm.encode_chat(user({"type": "video", "video": str(files / "clip.mp4"), "fps": 8.0}))
    assert few.items[0].grid_thw[0] == 2 and many.items[0].grid_thw[0] == 8
    assert few.items[0].seconds_per_group == pytest.approx(2 / (4 / 16 * 8))  # 4 of 16 frames at 8 fps


def test_a_list_of_frames_is_a_video(llm):
    frames = [picture(160, 120, i) for i in range(6)]
    prompt = llm.encode_chat(user({"type": "video", "video": frames}, {"type": "text", "text": "?"}))
    (video,) = prompt.items
    assert video.kind == "video" and video.grid_thw[0] == 3
    ids = torch.tensor(prompt.token_ids)
    assert int((ids == IDS["video_token_id"]).sum()) == video.num_tokens


def test_rgba_is_composited_on_white_like_the_reference(llm, files):
    plain = llm.encode_chat(user({"image": str(files / "photo.png")}))
    rgba = llm.encode_chat(user({"image": str(files / "photo_rgba.png")}))
    assert torch.equal(plain.items[0].pixel_values, rgba.items[0].pixel_values)  # opaque alpha: same pixels


@pytest.mark.parametrize(
    "part, error, fragment",
    [
        ({"type": "image", "image": "{root}/missing.png"}, InputError, "missing.png"),
        ({"type": "image", "image": "{root}/notes.txt"}, InputError, "notes.txt"),
        ({"type": "image", "image": "{root}/strip.png"}, InputError, "aspect ratio"),
        ({"type": "image", "image": "data:image/png;base64,%%%"}, InputError, "base64"),
        ({"type": "image", "image": "http://127.0.0.1:9/x.png"}, InputError, "could not fetch image"),
        ({"type": "image", "image": "ftp://host/x.png"}, InputError, "ftp"),
        ({"type": "image", "image": 42}, InputError, "int"),
        ({"type": "image"}, InputError, "without an 'image'"),
        ({"type": "image", "image": "{root}/photo.png", "resized_height": 100}, InputError, "resized_width"),
        ({"type": "video", "video": "{root}/empty.mp4"}, InputError, "empty.mp4"),
        ({"type": "video", "video": "{root}/notes.txt"}, InputError, "notes.txt"),
        ({"type": "video", "video": "{root}/clip.mp4", "fps": 0}, InputError, "fps"),
        ({"type": "video", "video": "{root}/clip.mp4", "fps": 8.0, "resized_height": 1120, "resized_width": 1120},
         ContextLengthError, "budget of 2047 tokens"),
        ({"type": "sound", "sound": "x"}, InputError, "sound"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_part(llm, files, part, error, fragment):
    part = {k: v.format(root=files) if isinstance(v, str) else v for k, v in part.items()}
    with pytest.raises(error) as caught:
        llm.chat(user({"type": "text", "text": "x"}, part), SamplingParams(max_tokens=1))
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert fragment in message, message
    assert "messages[0].content[1]" in message or isinstance(caught.value, ContextLengthError), message


def test_huge_image_is_resized_down_not_refused(llm):
    big = picture(6000, 4000, 3)
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    llm.vision.limits.max_pixels = 256 * 28 * 28
    try:
        prompt = llm.encode_chat(user({"type": "image", "image": buffer.getvalue()}))
    finally:
        llm.vision.limits.max_pixels = None
    assert prompt.items[0].num_tokens <= 256
