"""Grounding: boxes and points in the answers of the Qwen VL models, mapped to image pixels and drawn.

Each family answers in its own format and coordinate system:

- Qwen2-VL: ``<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on a
  0-1000 grid relative to the image. One ``box_start`` may hold several boxes (``(..),(..),(..),(..)``), and
  boxes that directly follow one another share the label before them. The first Qwen-VL's ``<ref>…</ref>``
  and ``<box>…</box>`` spelling is read too. The tags are special tokens: an answer decoded with
  skip_special_tokens has lost them, and then its bare ``(x1,y1),(x2,y2)`` pairs are read as unlabelled boxes.
- Qwen2.5-VL: JSON objects ``{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y], "label": "…"}`` (usually a
  list inside a ```json fence) in absolute pixels of the *resized* image the model saw (after smart_resize).
- Qwen3-VL (and Qwen3.5): the same JSON keys on a 0-1000 grid relative to the image.

`parse_groundings` reads an answer into `Grounding`s in model coordinates, `to_image_pixels` maps them to
pixels of the original image, `ground_answer` does both and keeps the sizes for reporting, and
`draw_groundings` draws them into a PNG.
"""

from __future__ import annotations

import ast
import colorsys
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError
from .fetch import ImageSource, load_image, to_rgb
from .image import _FAMILY_ALIASES

# Families whose coordinates are on a 0..GRID grid relative to the image (the rest: resized-image pixels).
GRID = 1000
_RELATIVE_FAMILIES = frozenset({"qwen2_vl", "qwen3_vl"})

_NUMBER = r"[-+]?\d+(?:\.\d+)?"


@dataclass(frozen=True)
class Grounding:
    """One box and/or point with its label. Coordinates are (x1, y1, x2, y2) and (x, y), in whichever system
    the producing function states: model coordinates from parse_groundings, original-image pixels from
    to_image_pixels."""

    label: str | None = None
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; coordinates rounded to 1/100 (finer is noise for pixels and 0-1000 grids)."""
        return {
            "label": self.label,
            "box": None if self.box is None else [_round(v) for v in self.box],
            "point": None if self.point is None else [_round(v) for v in self.point],
        }


@dataclass(frozen=True)
class GroundingResult:
    """The groundings of one answer about one image, in pixels of the original image.

    `resized_size` is the (height, width) the model saw; Qwen2.5-VL's coordinates refer to it, so it is
    reported alongside. `model_groundings` are the same entries as parsed, in the model's coordinates.
    """

    family: str
    groundings: tuple[Grounding, ...]
    model_groundings: tuple[Grounding, ...]
    original_size: tuple[int, int]  # (height, width)
    resized_size: tuple[int, int] | None  # (height, width)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: sizes as {"height", "width"}, groundings in original-image pixels."""
        return {
            "family": self.family,
            "coordinates": "pixels of the original image",
            "model_coordinates": _model_coordinates(self.family),
            "image_size": _size_dict(self.original_size),
            "resized_size": None if self.resized_size is None else _size_dict(self.resized_size),
            "groundings": [g.to_dict() for g in self.groundings],
            "model_groundings": [g.to_dict() for g in self.model_groundings],
        }


def parse_groundings(text: str, family: str) -> list[Grounding]:
    """Boxes and points in a model's answer, in the model's coordinates, in the order they appear.

    `family` is the model type ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", or an alias such as "qwen3_vl_moe").
    Text around the coordinates, code fences, trailing commas, single quotes and missing labels are
    tolerated; an entry whose coordinates are missing, not numbers or of the wrong count is skipped, and an
    answer without any gives an empty list.
    """
    canonical = _canonical_family(family)
    if canonical == "qwen2_vl":
        return _parse_tagged(text)
    return _parse_json_entries(text)


def to_image_pixels(
    groundings: Iterable[Grounding],
    family: str,
    original_size: tuple[int, int],
    resized_size: tuple[int, int] | None = None,
) -> list[Grounding]:
    """Map groundings from model coordinates to pixels of the original image, (height, width) sizes.

    Qwen2-VL / Qwen3-VL: x * W / 1000, y * H / 1000. Qwen2.5-VL: x * W / W_resized, y * H / H_resized, so it
    needs `resized_size` (ProcessedImage.resized_size). Results are clamped to the image, and boxes are
    ordered so that x1 <= x2 and y1 <= y2.
    """
    canonical = _canonical_family(family)
    height, width = _check_size(original_size, "original_size")
    if canonical in _RELATIVE_FAMILIES:
        x_scale, y_scale = GRID, GRID
    else:
        if resized_size is None:
            raise InputError(
                f"{family} answers in pixels of the resized image; pass resized_size (height, width) to map them",
                param="resized_size",
            )
        resized_h, resized_w = _check_size(resized_size, "resized_size")
        x_scale, y_scale = resized_w, resized_h

    def x_of(v: float) -> float:
        # multiply before dividing: whole results come out exact (126 * 1000 / 1008 == 125.0)
        return min(max(v * width / x_scale, 0.0), float(width))

    def y_of(v: float) -> float:
        return min(max(v * height / y_scale, 0.0), float(height))

    mapped = []
    for g in groundings:
        box = None
        if g.box is not None:
            x1, y1, x2, y2 = x_of(g.box[0]), y_of(g.box[1]), x_of(g.box[2]), y_of(g.box[3])
            box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
        point = None if g.point is None else (x_of(g.point[0]), y_of(g.point[1]))
        mapped.append(Grounding(label=g.label, box=box, point=point))
    return mapped


def ground_answer(
    text: str,
    family: str,
    original_size: tuple[int, int],
    resized_size: tuple[int, int] | None = None,
) -> GroundingResult:
    """parse_groundings + to_image_pixels for one answer about one image; sizes are (height, width), as in
    ProcessedImage.original_size / .resized_size."""
    model = parse_groundings(text, family)
    pixels = to_image_pixels(model, family, original_size, resized_size)
    return GroundingResult(
        family=_canonical_family(family),
        groundings=tuple(pixels),
        model_groundings=tuple(model),
        original_size=_check_size(original_size, "original_size"),
        resized_size=None if resized_size is None else _check_size(resized_size, "resized_size"),
    )


def label_colours(groundings: Iterable[Grounding]) -> dict[str | None, tuple[int, int, int]]:
    """The colour draw_groundings gives each label: distinct colours in order of first appearance."""
    colours: dict[str | None, tuple[int, int, int]] = {}
    for g in groundings:
        if g.label not in colours:
            colours[g.label] = _colour(len(colours))
    return colours


def draw_groundings(
    image: Image.Image | ImageSource,
    groundings: GroundingResult | Sequence[Grounding],
    out_path: str | Path,
    *,
    line_width: int | None = None,
) -> Path:
    """Draw boxes (outlines), points (filled dots) and their labels onto a copy of `image` and save it as a
    PNG at `out_path`; returns the path.

    `groundings` must be in pixels of this image (to_image_pixels / ground_answer). `image` is a PIL image
    or anything load_image takes (path, URL, bytes). Each label gets its own colour (label_colours); text
    uses PIL's default font. `line_width` defaults to about 0.5% of the shorter side, at least 2.
    """
    if isinstance(image, Image.Image):
        canvas = to_rgb(image).copy()  # copy: never draw onto the caller's image
    else:
        canvas = load_image(image)
    width, height = canvas.size
    if isinstance(groundings, GroundingResult):
        if groundings.original_size != (height, width):
            oh, ow = groundings.original_size
            raise InputError(
                f"the groundings were mapped for a {ow}x{oh} image but the image to draw on is {width}x{height}"
            )
        items: Sequence[Grounding] = groundings.groundings
    else:
        items = groundings
    if line_width is None:
        line_width = max(2, round(min(width, height) / 200))
    if line_width < 1:
        raise InputError(f"line_width must be at least 1, got {line_width}", param="line_width")
    colours = label_colours(items)
    font = _font(max(10, round(min(width, height) / 40)))
    draw = ImageDraw.Draw(canvas)

    # Outlines first, then dots, then all labels, so no shape covers another entry's text.
    labels: list[tuple[tuple[float, float], str, tuple[int, int, int], bool]] = []
    for g in items:
        colour = colours[g.label]
        if g.box is not None:
            xa, xb = _pixel(g.box[0], width), _pixel(g.box[2], width)
            ya, yb = _pixel(g.box[1], height), _pixel(g.box[3], height)
            x1, y1, x2, y2 = min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)  # PIL needs them ordered
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=line_width)
            if g.label:
                labels.append(((x1, y1), g.label, colour, True))
    radius = max(3, 2 * line_width)
    for g in items:
        if g.point is None:
            continue
        colour = colours[g.label]
        x, y = _pixel(g.point[0], width), _pixel(g.point[1], height)
        # a white ring keeps the dot visible on a background of its own colour
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour, outline=(255, 255, 255))
        if g.label and g.box is None:
            labels.append(((x + radius + 2, y - radius), g.label, colour, False))
    for (x, y), text, colour, above in labels:
        _draw_label(draw, (x, y), text, colour, font, above, (width, height))

    path = Path(out_path)
    try:
        canvas.save(path, format="PNG")
    except OSError as exc:
        raise InputError(f"could not write {str(path)!r}: {exc}") from exc
    return path


# --- Qwen2-VL tags ----------------------------------------------------------------------------------------

# [^<]* rather than .*?: a tag left open (max_tokens) then costs a scan to the next "<", not to the end.
_TAG = re.compile(
    r"<\|object_ref_start\|>(?P<ref>[^<]*)<\|object_ref_end\|>"
    r"|<\|box_start\|>(?P<box>[^<]*)<\|box_end\|>"
    r"|<ref>(?P<ref1>[^<]*)</ref>"
    r"|<box>(?P<box1>[^<]*)</box>"
)
_PAIR = re.compile(rf"[(\[]\s*({_NUMBER})\s*,\s*({_NUMBER})\s*[)\]]")
# The answer decoded with skip_special_tokens loses the tags but keeps "(x1,y1),(x2,y2)".
_BARE_BOX = re.compile(
    rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*,\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)"
)
# What may separate a box from the label (or box) before it and still let the label carry over.
_JOINER = re.compile(r"[\s,;:，、]*(?:and|和)?[\s,;:，、]*", re.I)


def _parse_tagged(text: str) -> list[Grounding]:
    found: list[Grounding] = []
    label: str | None = None
    last_end = 0
    any_tag = False
    for match in _TAG.finditer(text):
        any_tag = True
        ref = match.group("ref") if match.group("ref") is not None else match.group("ref1")
        if ref is not None:
            label = ref.strip() or None
        else:
            gap = text[last_end : match.start()]
            if len(gap) > 16 or not _JOINER.fullmatch(gap):
                label = None  # other words came between: the earlier label is about something else
            content = match.group("box") if match.group("box") is not None else match.group("box1")
            pairs = [(float(a), float(b)) for a, b in _PAIR.findall(content)]
            # a box is two corners; an odd corner left over is an incomplete box and is dropped
            for i in range(0, len(pairs) - 1, 2):
                (x1, y1), (x2, y2) = pairs[i], pairs[i + 1]
                found.append(Grounding(label=label, box=(x1, y1, x2, y2)))
        last_end = match.end()
    if not any_tag:
        for m in _BARE_BOX.finditer(text):
            x1, y1, x2, y2 = (float(v) for v in m.groups())
            found.append(Grounding(box=(x1, y1, x2, y2)))
    return found


# --- Qwen2.5-VL / Qwen3-VL JSON ------------------------------------------------------------------------------


def _parse_json_entries(text: str) -> list[Grounding]:
    found: list[Grounding] = []
    # Every balanced {...} is tried on its own, wherever it sits: inside or outside fences, in a list or
    # alone, and the complete entries of a list cut off by max_tokens still count.
    i = text.find("{")
    while i != -1:
        end = _matching_brace(text, i)
        value = None if end is None else _loads(text[i : end + 1])
        if end is not None and isinstance(value, dict):
            _collect(value, found)
            i = text.find("{", end + 1)
        else:
            i = text.find("{", i + 1)  # unparsable, unclosed or too big: look for entries inside it
    return found


# Bounds on one candidate object. An entry is a few hundred characters at most; a bigger or deeper object
# (a wrapper, or a model looping) is not parsed whole but entered, where its entries are found one by one.
# The bounds keep parsing linear: unbounded, a long unclosed answer costs a scan to its end per brace.
_MAX_OBJECT_CHARS = 4096
_MAX_DEPTH = 32
_MAX_STRING_CHARS = 512


def _matching_brace(text: str, start: int) -> int | None:
    """Index of the "}" closing the "{" at `start`, skipping quoted strings; None if it does not close
    within the bounds above."""
    depth = 0
    quote: str | None = None
    quote_start = 0
    escaped = False
    for j in range(start, min(len(text), start + _MAX_OBJECT_CHARS)):
        c = text[j]
        if quote is not None:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = None
            elif j - quote_start > _MAX_STRING_CHARS:
                return None  # not a label: likely an apostrophe in prose
        elif c in "\"'":
            quote, quote_start = c, j
        elif c == "{":
            depth += 1
            if depth > _MAX_DEPTH:
                return None
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _loads(snippet: str) -> Any:
    """JSON, or the loose JSON models write (trailing commas, single quotes); None if neither reads."""
    try:
        return json.loads(snippet)
    except ValueError:
        pass
    fixed = _TRAILING_COMMA.sub(r"\1", snippet)
    try:
        return json.loads(fixed)
    except ValueError:
        pass
    try:
        # Python literal syntax covers single-quoted strings; it only builds literals, never runs code
        return ast.literal_eval(fixed)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _collect(value: Any, found: list[Grounding]) -> None:
    """Append the grounding entries in a parsed JSON value (an entry, a list of them, or a wrapper)."""
    if isinstance(value, dict):
        if "bbox_2d" in value or "point_2d" in value:
            entry = _entry(value)
            if entry is not None:
                found.append(entry)
            return
        for v in value.values():
            _collect(v, found)
    elif isinstance(value, list):
        for v in value:
            _collect(v, found)


def _entry(obj: dict[str, Any]) -> Grounding | None:
    """The grounding in one JSON entry, or None if a coordinate key it has is malformed."""
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    if "bbox_2d" in obj:
        numbers = _numbers(obj["bbox_2d"], 4)
        if numbers is None:
            return None
        box = (numbers[0], numbers[1], numbers[2], numbers[3])
    if "point_2d" in obj:
        numbers = _numbers(obj["point_2d"], 2)
        if numbers is None:
            return None
        point = (numbers[0], numbers[1])
    label = obj.get("label")
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        label = str(label)  # e.g. "label": 3 for a numbered item
    text = label.strip() if isinstance(label, str) else ""
    return Grounding(label=text or None, box=box, point=point)


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        return None
    out = []
    for v in value:
        if isinstance(v, bool):
            return None
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                return None
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        out.append(float(v))
    return tuple(out)


# --- helpers -----------------------------------------------------------------------------------------------


def _canonical_family(family: str) -> str:
    canonical = _FAMILY_ALIASES.get(family)
    if canonical is None:
        raise InputError(
            f"no grounding format is known for model family {family!r}; known: {', '.join(sorted(_FAMILY_ALIASES))}",
            param="family",
        )
    return canonical


def _model_coordinates(family: str) -> str:
    if _canonical_family(family) in _RELATIVE_FAMILIES:
        return f"0-{GRID} grid relative to the image"
    return "pixels of the resized image"


def _check_size(size: tuple[int, int], name: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be (height, width), got {size!r}", param=name) from None
    if height <= 0 or width <= 0:
        raise InputError(f"{name} must be positive, got {size!r}", param=name)
    return height, width


def _size_dict(size: tuple[int, int]) -> dict[str, int]:
    return {"height": size[0], "width": size[1]}


def _round(v: float) -> float | int:
    r = round(v, 2)
    return int(r) if r == int(r) else r


def _pixel(v: float, limit: int) -> int:
    # continuous coordinate (0..limit) -> index of a pixel that exists
    return min(max(int(round(v)), 0), limit - 1)


# Twelve well-separated colours; past them, hues spaced by the golden ratio stay distinct.
_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 200, 220),
    (240, 50, 230),
    (150, 150, 0),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (0, 0, 128),
)


def _colour(index: int) -> tuple[int, int, int]:
    if index < len(_PALETTE):
        return _PALETTE[index]
    r, g, b = colorsys.hsv_to_rgb((index * 0.6180339887) % 1.0, 0.85, 0.85)
    return round(r * 255), round(g * 255), round(b * 255)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _draw_label(
    draw: ImageDraw.ImageDraw,
    anchor: tuple[float, float],
    text: str,
    colour: tuple[int, int, int],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    above: bool,
    image_size: tuple[int, int],
) -> None:
    """White text on a tag of the label's colour: above the box corner, or inside it at the top edge."""
    width, height = image_size
    try:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    except UnicodeEncodeError:  # the bitmap fallback font is Latin-1 only
        text = text.encode("ascii", "backslashreplace").decode("ascii")
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    x, y = anchor
    if above and y - tag_h >= 0:
        y -= tag_h
    x = min(max(x, 0), max(width - tag_w, 0))
    y = min(max(y, 0), max(height - tag_h, 0))
    draw.rectangle((x, y, x + tag_w - 1, y + tag_h - 1), fill=colour)
    draw.text((x + pad - left, y + pad - top), text, fill=(255, 255, 255), font=font)
