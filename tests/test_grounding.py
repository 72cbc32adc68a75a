"""Grounding: parsing each family's answer format, mapping to original-image pixels, and the drawn PNG.

Answers are written the way the models write them (Qwen2-VL's tags from its grounding captions and
multi-box outputs, Qwen2.5-VL's fenced JSON lists from the spatial-understanding cookbook, Qwen3-VL's
0-1000 JSON), including the untidy parts: prose around the coordinates, trailing commas, single quotes,
answers cut off by max_tokens. Expected mapped numbers are worked out by hand in the comments.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from qwen_engine.errors import InputError
from qwen_engine.vision import (
    Grounding,
    GroundingResult,
    draw_groundings,
    ground_answer,
    label_colours,
    parse_groundings,
    to_image_pixels,
)

FENCE = "`" * 3  # built, so this file's own fences cannot confuse anything that scans for them

# --- Qwen2-VL tags -------------------------------------------------------------------------------------------


def test_qwen2_vl_caption_with_grounding():
    answer = (
        "<|object_ref_start|>A woman<|object_ref_end|><|box_start|>(451,381),(733,803)<|box_end|> sits on the "
        "beach with <|object_ref_start|>her dog<|object_ref_end|><|box_start|>(216,425),(426,864)<|box_end|>."
    )
    assert parse_groundings(answer, "qwen2_vl") == [
        Grounding("A woman", (451, 381, 733, 803)),
        Grounding("her dog", (216, 425, 426, 864)),
    ]


def test_qwen2_vl_several_boxes_share_the_label_before_them():
    # several boxes in one box_start, and box after box: all apples
    answer = (
        "<|object_ref_start|>apple<|object_ref_end|><|box_start|>(475,318),(492,337), (620,279),(631,301)"
        "<|box_end|><|box_start|>(351,275),(367,292)<|box_end|>"
    )
    assert parse_groundings(answer, "qwen2_vl") == [
        Grounding("apple", (475, 318, 492, 337)),
        Grounding("apple", (620, 279, 631, 301)),
        Grounding("apple", (351, 275, 367, 292)),
    ]


def test_qwen2_vl_label_does_not_carry_across_other_words():
    answer = (
        "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|> is asleep; "
        "something else is at <|box_start|>(500,500),(600,600)<|box_end|>"
    )
    assert parse_groundings(answer, "qwen2_vl") == [
        Grounding("the cat", (10, 20, 30, 40)),
        Grounding(None, (500, 500, 600, 600)),
    ]


def test_qwen2_vl_box_without_label_and_old_qwen_vl_tags():
    assert parse_groundings("<|box_start|>(0,0),(999,999)<|box_end|>", "qwen2_vl") == [
        Grounding(None, (0, 0, 999, 999))
    ]
    assert parse_groundings("<ref>击掌</ref><box>(536,509),(588,602)</box>", "qwen2_vl") == [
        Grounding("击掌", (536, 509, 588, 602))
    ]


def test_qwen2_vl_malformed_boxes_are_skipped():
    answer = (
        "<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2)<|box_end|>"  # one corner only
        "<|object_ref_start|>b<|object_ref_end|><|box_start|>(1,2),(x,4)<|box_end|>"  # not a number
        "<|object_ref_start|>c<|object_ref_end|><|box_start|>(1,2),(3,4),(5,6)<|box_end|>"  # 1.5 boxes
        "<|object_ref_start|>d<|object_ref_end|><|box_start|>(7,8),(9,1"  # cut off by max_tokens
    )
    assert parse_groundings(answer, "qwen2_vl") == [Grounding("c", (1, 2, 3, 4))]


def test_qwen2_vl_answer_decoded_without_its_special_tokens():
    # skip_special_tokens drops the tags; the coordinate pairs are still there (labels are not recoverable)
    answer = "A woman(451,381),(733,803) sits on the beach with her dog(216,425),(426,864)."
    assert parse_groundings(answer, "qwen2_vl") == [
        Grounding(None, (451, 381, 733, 803)),
        Grounding(None, (216, 425, 426, 864)),
    ]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_no_groundings_give_an_empty_list(family):
    for answer in ("", "A cat is sleeping on a red sofa.", "I cannot find any dog in this image {sorry}."):
        assert parse_groundings(answer, family) == []


# --- Qwen2.5-VL / Qwen3-VL JSON ------------------------------------------------------------------------------


def test_json_fenced_list_with_boxes_and_points():
    answer = (
        f'Sure, here are the small cakes:\n{FENCE}json\n[\n  {{"bbox_2d": [56, 118, 259, 326], "label": "cake"}},\n'
        f'  {{"bbox_2d": [297, 121, 503, 327], "label": "cake"}},\n  {{"point_2d": [640, 230], "label": "candle"}}\n'
        f"]\n{FENCE}\nLet me know if you need anything else."
    )
    for family in ("qwen2_5_vl", "qwen3_vl"):
        assert parse_groundings(answer, family) == [
            Grounding("cake", (56, 118, 259, 326)),
            Grounding("cake", (297, 121, 503, 327)),
            Grounding("candle", None, (640, 230)),
        ]


def test_json_unfenced_single_object_and_box_with_point():
    assert parse_groundings('The dog is at {"bbox_2d": [10, 20, 30, 40], "label": "dog"}.', "qwen3_vl") == [
        Grounding("dog", (10, 20, 30, 40))
    ]
    both = '[{"bbox_2d": [1.5, 2, 3, 4.25], "point_2d": [2, 3], "label": "button"}]'
    assert parse_groundings(both, "qwen2_5_vl") == [Grounding("button", (1.5, 2, 3, 4.25), (2, 3))]


def test_json_loose_syntax_missing_labels_and_wrappers():
    answer = (
        f"{FENCE}json\n[\n  {{'bbox_2d': [5, 6, 7, 8], 'label': 'single quoted',}},\n"
        f'  {{"bbox_2d": [9, 10, 11, 12],}},\n  {{"point_2d": ["13", "14"], "label": ""}},\n]\n{FENCE}\n'
        '{"objects": [{"bbox_2d": [15, 16, 17, 18], "label": "wrapped"}]}'
    )
    assert parse_groundings(answer, "qwen2_5_vl") == [
        Grounding("single quoted", (5, 6, 7, 8)),
        Grounding(None, (9, 10, 11, 12)),
        Grounding(None, None, (13, 14)),
        Grounding("wrapped", (15, 16, 17, 18)),
    ]


def test_json_malformed_entries_are_skipped_and_truncated_answers_keep_complete_entries():
    answer = (
        f"{FENCE}json\n[\n"
        '  {"bbox_2d": [1, 2, 3], "label": "three numbers"},\n'
        '  {"bbox_2d": [1, 2, 3, 4, 5], "label": "five numbers"},\n'
        '  {"bbox_2d": "1, 2, 3, 4", "label": "a string"},\n'
        '  {"bbox_2d": [1, 2, null, 4], "label": "null"},\n'
        '  {"bbox_2d": [1, 2, 3, 4], "point_2d": [5], "label": "bad point spoils the entry"},\n'
        '  {"point_2d": [true, 7], "label": "boolean"},\n'
        '  {"box": [1, 2, 3, 4], "label": "not our key"},\n'
        '  {"bbox_2d": [100, 200, 300, 400], "label": "good"},\n'
        '  {"bbox_2d": [500, 600, 7'  # cut off by max_tokens
    )
    assert parse_groundings(answer, "qwen2_5_vl") == [Grounding("good", (100, 200, 300, 400))]


def test_json_label_with_braces_and_quotes_in_it():
    answer = '[{"bbox_2d": [1, 2, 3, 4], "label": "sign saying \\"{open}\\""}]'
    assert parse_groundings(answer, "qwen3_vl") == [Grounding('sign saying "{open}"', (1, 2, 3, 4))]


def test_json_apostrophes_in_prose_and_big_or_looping_answers():
    # an apostrophe in prose, even after an unclosed brace, must not hide the entries that follow
    answer = 'Here\'s what I found {I\'ll list them: {"bbox_2d": [1, 2, 3, 4], "label": "cat"}'
    assert parse_groundings(answer, "qwen3_vl") == [Grounding("cat", (1, 2, 3, 4))]
    # a wrapper too big to parse whole still gives all its entries, in order
    many = '{"objects": [' + ", ".join(f'{{"bbox_2d": [{i}, 0, {i + 1}, 1]}}' for i in range(1500)) + "]}"
    parsed = parse_groundings(many, "qwen2_5_vl")
    assert [g.box[0] for g in parsed if g.box] == list(range(1500))
    # a model looping into ever deeper unclosed objects: nothing, and (bounded scans) quickly
    assert parse_groundings('{"a": [' * 4000, "qwen3_vl") == []
    assert parse_groundings("{" * 30000, "qwen3_vl") == []


def test_unknown_family_is_refused():
    with pytest.raises(InputError, match="qwen2_vl"):
        parse_groundings("{}", "llava")
    assert parse_groundings('{"bbox_2d": [1, 2, 3, 4]}', "qwen3_vl_moe") == [Grounding(None, (1, 2, 3, 4))]


# --- mapping -------------------------------------------------------------------------------------------------


def test_mapping_qwen2_vl_and_qwen3_vl_use_the_1000_grid():
    # image 640 wide, 480 high: x * 640 / 1000, y * 480 / 1000
    model = [Grounding("a", (250, 500, 750, 1000)), Grounding("p", None, (100, 125))]
    for family in ("qwen2_vl", "qwen3_vl"):
        assert to_image_pixels(model, family, original_size=(480, 640)) == [
            Grounding("a", (160.0, 240.0, 480.0, 480.0)),
            Grounding("p", None, (64.0, 60.0)),
        ]


def test_mapping_qwen2_5_vl_uses_the_resized_image():
    # original 1000 wide x 750 high, the model saw 1008 x 756 (smart_resize with factor 28):
    # x * 1000 / 1008, y * 750 / 756; 126 -> 125, 252 -> 250, 504 -> 500 (x) and 500 (y), 756 -> 750, 378 -> 375
    model = [Grounding("cake", (126, 252, 504, 504)), Grounding("candle", None, (756, 378))]
    assert to_image_pixels(model, "qwen2_5_vl", (750, 1000), (756, 1008)) == [
        Grounding("cake", (125.0, 250.0, 500.0, 500.0)),
        Grounding("candle", None, (750.0, 375.0)),
    ]
    # a non-integer case: 100 * 1000 / 1008 = 99.2063..., 100 * 750 / 756 = 99.2063...
    (g,) = to_image_pixels([Grounding(None, None, (100, 100))], "qwen2_5_vl", (750, 1000), (756, 1008))
    assert g.point == pytest.approx((99.20635, 99.20635), abs=1e-5)
    with pytest.raises(InputError, match="resized_size"):
        to_image_pixels(model, "qwen2_5_vl", (750, 1000))


def test_mapping_clamps_to_the_image_and_orders_corners():
    # 200 wide x 100 high, 0-1000 grid: (-50, 1200) clamp to 0 and 100; x2 < x1 swapped
    model = [Grounding("x", (900, -50, 100, 1200)), Grounding("p", None, (1500, -3))]
    assert to_image_pixels(model, "qwen3_vl", (100, 200)) == [
        Grounding("x", (20.0, 0.0, 180.0, 100.0)),
        Grounding("p", None, (200.0, 0.0)),
    ]
    # Qwen2.5-VL pixels beyond the resized image: 300 on a 280-wide resized image of width 140 -> 150 -> 140
    (g,) = to_image_pixels([Grounding(None, (-10, 0, 300, 56))], "qwen2_5_vl", (28, 140), (56, 280))
    assert g.box == (0.0, 0.0, 140.0, 28.0)


def test_mapping_rejects_bad_sizes():
    with pytest.raises(InputError):
        to_image_pixels([], "qwen3_vl", (0, 100))
    with pytest.raises(InputError):
        to_image_pixels([], "qwen2_5_vl", (100, 100), (100,))  # type: ignore[arg-type]


def test_ground_answer_and_json_report():
    answer = f'{FENCE}json\n[{{"bbox_2d": [100, 200, 300, 400], "label": "dog"}}]\n{FENCE}'
    result = ground_answer(answer, "qwen2_5_vl", original_size=(600, 800), resized_size=(588, 784))
    # x * 800 / 784, y * 600 / 588: 100 -> 102.04, 200 -> 204.08, 300 -> 306.12, 400 -> 408.16
    assert result.model_groundings == (Grounding("dog", (100, 200, 300, 400)),)
    report = json.loads(json.dumps(result.to_dict()))
    assert report == {
        "family": "qwen2_5_vl",
        "coordinates": "pixels of the original image",
        "model_coordinates": "pixels of the resized image",
        "image_size": {"height": 600, "width": 800},
        "resized_size": {"height": 588, "width": 784},
        "groundings": [{"label": "dog", "box": [102.04, 204.08, 306.12, 408.16], "point": None}],
        "model_groundings": [{"label": "dog", "box": [100, 200, 300, 400], "point": None}],
    }
    relative = ground_answer('{"point_2d": [500, 500]}', "qwen3_vl", (10, 20)).to_dict()
    assert relative["resized_size"] is None
    assert relative["model_coordinates"] == "0-1000 grid relative to the image"
    assert relative["groundings"] == [{"label": None, "box": None, "point": [10, 5]}]


# --- drawing -------------------------------------------------------------------------------------------------

WHITE = (255, 255, 255)


def _white(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), WHITE)


def test_drawn_box_outline_lies_on_the_mapped_edges(tmp_path):
    # 400 wide x 300 high; Qwen3-VL box [250, 200, 750, 800] -> x 100..300, y 60..240
    result = ground_answer('[{"bbox_2d": [250, 200, 750, 800], "label": "box"}]', "qwen3_vl", (300, 400))
    assert result.groundings[0].box == (100.0, 60.0, 300.0, 240.0)
    image = _white(400, 300)
    out = draw_groundings(image, result, tmp_path / "box.png", line_width=3)
    assert out == tmp_path / "box.png"
    drawn = Image.open(out)
    assert drawn.format == "PNG" and drawn.size == (400, 300)
    drawn = drawn.convert("RGB")
    colour = label_colours(result.groundings)["box"]
    assert colour != WHITE
    # PIL's outline grows inward from the edges: columns 100..102 and 298..300, rows 60..62 and 238..240
    for x in range(110, 291, 10):
        for y in (60, 62, 238, 240):
            assert drawn.getpixel((x, y)) == colour, (x, y)
    for y in range(70, 231, 10):
        for x in (100, 102, 298, 300):
            assert drawn.getpixel((x, y)) == colour, (x, y)
    # well inside and well outside (away from the label tag above the top-left corner) stay white
    for xy in [(200, 150), (150, 100), (250, 200), (104, 150), (200, 64), (50, 150), (350, 150), (200, 280)]:
        assert drawn.getpixel(xy) == WHITE, xy
    assert image.getpixel((100, 150)) == WHITE  # the caller's image is not drawn on


def test_drawn_point_marker_and_distinct_colours(tmp_path):
    # Qwen2.5-VL on a 200x100 image the model saw as 400x200: point (100, 50) -> (50, 25);
    # box (200, 100, 360, 180) -> (100, 50, 180, 90)
    answer = '[{"point_2d": [100, 50], "label": "eye"}, {"bbox_2d": [200, 100, 360, 180], "label": "nose"}]'
    result = ground_answer(answer, "qwen2_5_vl", (100, 200), (200, 400))
    colours = label_colours(result.groundings)
    assert colours["eye"] != colours["nose"]
    drawn = Image.open(draw_groundings(_white(200, 100), result, tmp_path / "p.png", line_width=2)).convert(
        "RGB"
    )
    # default marker radius is 2 * line_width = 4 around (50, 25)
    for xy in [(50, 25), (48, 25), (52, 25), (50, 23), (50, 27)]:
        assert drawn.getpixel(xy) == colours["eye"], xy
    for xy in [(38, 25), (50, 40), (30, 10)]:
        assert drawn.getpixel(xy) == WHITE, xy
    assert drawn.getpixel((140, 90)) == colours["nose"]  # bottom edge of the box
    assert drawn.getpixel((180, 70)) == colours["nose"]  # right edge
    assert drawn.getpixel((140, 70)) == WHITE


def test_draw_from_a_path_source_with_labels_and_plain_lists(tmp_path):
    source = tmp_path / "in.png"
    _white(120, 80).save(source)
    groundings = [
        Grounding("a very long label that does not fit", (0.0, 0.0, 120.0, 80.0)),  # label drawn inside
        Grounding("狗", (30.0, 30.0, 60.0, 60.0), (45.0, 45.0)),  # non-Latin text must not crash
        Grounding(None, (90.0, 10.0, 100.0, 20.0)),
    ]
    out = draw_groundings(str(source), groundings, tmp_path / "out.png", line_width=1)
    drawn = Image.open(out).convert("RGB")
    colours = label_colours(groundings)
    assert len(set(colours.values())) == 3
    assert (
        drawn.getpixel((60, 79)) == colours["a very long label that does not fit"]
    )  # clamped to the last row
    assert drawn.getpixel((45, 60)) == colours["狗"]
    assert drawn.getpixel((95, 20)) == colours[None]


def test_draw_refuses_groundings_mapped_for_another_size(tmp_path):
    result = ground_answer('{"bbox_2d": [0, 0, 10, 10]}', "qwen2_5_vl", (300, 400), (308, 420))
    with pytest.raises(InputError, match="400x300"):
        draw_groundings(_white(420, 308), result, tmp_path / "x.png")
    with pytest.raises(InputError, match="could not write"):
        draw_groundings(_white(400, 300), result, tmp_path / "missing-dir" / "x.png")


# --- docs ----------------------------------------------------------------------------------------------------


def test_docs_grounding_example_runs(monkeypatch, tmp_path):
    """The python blocks of the Grounding section of docs/vision.md run (tests/test_docs.py covers usage.md)."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "vision.md").read_text(encoding="utf-8")
    section = re.search(r"^## Grounding\n(.*?)(?=^## |\Z)", doc, flags=re.S | re.M)
    assert section is not None
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/vision.md", "exec"), namespace)
    assert isinstance(namespace["result"], GroundingResult)
    assert Image.open(namespace["png"]).size == (1000, 750)
