"""`qwen-engine generate --image/--video/--draw-boxes` on a tiny Qwen2.5-VL checkpoint, and its bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_cli import GREEDY, assert_usage_error, run

from qwen_engine import LLM


def test_image_and_video_answer_matches_the_api(qwen2_5_vl_folder, vision_files):
    image, video = str(vision_files / "photo.png"), str(vision_files / "clip.mp4")
    result = run("generate", "-m", str(qwen2_5_vl_folder), "--json", "--max-tokens", "5", *GREEDY,
                 "--image", image, "--video", video, "--fps", "4", "What is shown?")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    llm = LLM(qwen2_5_vl_folder, progress=False, kv_cache_memory=16 << 20)
    from qwen_engine import SamplingParams

    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "video", "video": video, "fps": 4.0},
                                             {"type": "text", "text": "What is shown?"}]}]
    expected = llm.chat(messages, SamplingParams(max_tokens=5, temperature=0, repetition_penalty=1))
    assert data["token_ids"] == expected.token_ids
    assert data["usage"]["prompt_tokens"] == len(llm.encode_chat(messages).token_ids)


def test_draw_boxes_writes_the_png(qwen2_5_vl_folder, vision_files, tmp_path):
    out = tmp_path / "boxes.png"
    result = run("generate", "-m", str(qwen2_5_vl_folder), "--json", "--max-tokens", "4", *GREEDY,
                 "--image", str(vision_files / "photo.png"), "--draw-boxes", str(out), "Find the red circle.")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    grounding = data["grounding"]
    assert grounding["image_size"] == {"height": 240, "width": 320}
    assert grounding["resized_size"] == {"height": 252, "width": 308}
    drawn = Image.open(out)
    assert drawn.size == (320, 240)
    if not grounding["groundings"]:  # a random model rarely writes a box: then the picture is unchanged
        assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(Image.open(vision_files / "photo.png")))


def test_draw_boxes_maps_and_draws_the_answer(qwen2_5_vl_folder, vision_files, tmp_path, monkeypatch, capsys):
    """The CLI's wiring: a Qwen2.5-VL answer in resized-image pixels lands on the original image's pixels."""
    from qwen_engine import cli
    from qwen_engine.api import LLM as RealLLM

    answer = '```json\n[{"bbox_2d": [77, 63, 154, 126], "label": "circle"}]\n```'
    real_chat = RealLLM.chat

    def scripted_chat(self, messages, params=None, **kwargs):
        out = real_chat(self, messages, params, **kwargs)
        out.text = answer
        return out

    monkeypatch.setattr(RealLLM, "chat", scripted_chat)
    out = tmp_path / "boxes.png"
    code = cli.main(["generate", "-m", str(qwen2_5_vl_folder), "--json", "--max-tokens", "1", "--temperature", "0",
                     "--image", str(vision_files / "photo.png"), "--draw-boxes", str(out), "Where is the circle?"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    (box,) = data["grounding"]["groundings"]
    # resized 308x252 → original 320x240: x * 320/308, y * 240/252
    assert box["box"] == pytest.approx([77 * 320 / 308, 63 * 240 / 252, 154 * 320 / 308, 126 * 240 / 252], abs=0.01)
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)
    original = np.asarray(Image.open(vision_files / "photo.png").convert("RGB")).astype(int)
    x1, y1, x2, y2 = (round(v) for v in box["box"])
    changed = np.abs(pixels - original).sum(-1) > 0
    assert changed[(y1 + y2) // 2, x1 - 1 : x1 + 2].any() and changed[(y1 + y2) // 2, x2 - 2 : x2 + 1].any()
    assert changed[y1 - 1 : y1 + 2, (x1 + x2) // 2].any() and changed[y2 - 2 : y2 + 1, (x1 + x2) // 2].any()
    assert not changed[(y1 + y2) // 2 + 5, (x1 + x2) // 2]  # inside the outline: untouched
    assert not changed[5:20, 290:315].any()  # far away: untouched


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--image", "{vision_files}/missing.png"], ["missing.png"]),
        (["--image", "{vision_files}/notes.txt"], ["notes.txt"]),
        (["--image", "data:image/png;base64,@@@not-base64"], ["base64"]),
        (["--video", "{vision_files}/fake.mp4"], ["fake.mp4"]),
        (["--video", "{vision_files}/none.mp4"], ["none.mp4"]),
        (["--image", "{vision_files}/photo.png", "--draw-boxes", "{vision_files}/out.jpg"], ["PNG"]),
        (["--video", "{vision_files}/clip.mp4", "--draw-boxes", "{vision_files}/out.png"], ["exactly one --image"]),
        (["--image", "{vision_files}/photo.png", "--raw"], ["--raw"]),
        (["--video", "{vision_files}/clip.mp4", "--fps", "-1"], ["fps"]),
    ],
)
def test_bad_vision_input_is_one_line_exit_2(qwen2_5_vl_folder, vision_files, args, fragments, capsys):
    # In-process (the same main() the command runs) to spare a interpreter start per case; one case below
    # goes through a real subprocess.
    from qwen_engine import cli

    code = cli.main(["generate", "-m", str(qwen2_5_vl_folder), "--max-tokens", "2",
                     *[a.format(vision_files=vision_files) for a in args], "Describe."])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("qwen-engine: error:"), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_bad_video_through_the_command(qwen2_5_vl_folder, vision_files):
    result = run("generate", "-m", str(qwen2_5_vl_folder), "--video", str(vision_files / "fake.mp4"), "Describe.")
    assert_usage_error(result, "fake.mp4")


def test_text_only_model_refuses_images(vision_files, tmp_path, qwen3_tokenizer_dir):
    from tiny_models import build_tiny

    build_tiny("qwen2", tmp_path, tokenizer_dir=qwen3_tokenizer_dir)
    result = run("generate", "-m", str(tmp_path), "--image", str(vision_files / "photo.png"), "Describe.")
    assert_usage_error(result, "text only")


def test_chat_attaches_the_image_to_the_first_message(qwen2_5_vl_folder, vision_files):
    from qwen_engine import SamplingParams

    image = str(vision_files / "photo.png")
    result = run("chat", "-m", str(qwen2_5_vl_folder), "--max-tokens", "4", *GREEDY, "--image", image,
                 stdin="What is it?\nAnd now?\n")
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    llm = LLM(qwen2_5_vl_folder, progress=False, kv_cache_memory=16 << 20)
    params = SamplingParams(max_tokens=4, temperature=0, repetition_penalty=1)
    turn = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    answer = llm.chat(turn, params).text
    assert first == answer
    follow = llm.chat([*turn, {"role": "assistant", "content": answer}, {"role": "user", "content": "And now?"}],
                      params).text
    assert second == follow


def test_gguf_with_its_vision_projector(qwen2_5_vl_folder, vision_files, qwen3_tokenizer_dir, tmp_path):
    """`--mmproj`: a vision-language GGUF answers about an image as the same files through the API do; a projector
    that is missing or is not one gets one line on stderr and exit code 2."""
    import transformers
    from gguf_files import write_gguf, write_mmproj
    from test_gguf_vision import norms

    from qwen_engine import SamplingParams
    from qwen_engine.text.vl_template import VL_TEMPLATES

    ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen2_5_vl_folder)
    write_gguf(ref, qwen3_tokenizer_dir, tmp_path / "model.gguf", chat_template=VL_TEMPLATES["qwen2_5_vl"])
    write_mmproj(ref, tmp_path / "vision.gguf", **norms("qwen2_5_vl"))
    image = str(vision_files / "photo.png")
    result = run("generate", "-m", str(tmp_path / "model.gguf"), "--mmproj", str(tmp_path / "vision.gguf"), "--json",
                 "--max-tokens", "5", *GREEDY, "--image", image, "What is shown?")
    assert result.returncode == 0, result.stderr
    llm = LLM(tmp_path / "model.gguf", mmproj=tmp_path / "vision.gguf", progress=False, kv_cache_memory=16 << 20)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is shown?"}]}]
    expected = llm.chat(messages, SamplingParams(max_tokens=5, temperature=0, repetition_penalty=1))
    assert json.loads(result.stdout)["token_ids"] == expected.token_ids

    missing = run("generate", "-m", str(tmp_path / "model.gguf"), "--mmproj", str(tmp_path / "nope.gguf"), "hi")
    assert_usage_error(missing, "nope.gguf", "does not exist")
    wrong = run("generate", "-m", str(tmp_path / "model.gguf"), "--mmproj", str(tmp_path / "model.gguf"), "hi")
    assert_usage_error(wrong, "not a vision projector")
