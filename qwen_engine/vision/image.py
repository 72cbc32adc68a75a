"""Image preprocessing for Qwen2-VL, Qwen2.5-VL and Qwen3-VL, equal to transformers' PIL image processor.

The reference is transformers 5.23 ``Qwen2VLImageProcessorPil`` (the class every Qwen VL family maps to,
with different settings): smart_resize, ``PIL.Image.resize`` on the uint8 RGB image (BICUBIC), rescale
(uint8 -> float64 * 1/255 -> float32), normalise ((x - mean) / std in float32) and patchify. Doing the
same IEEE operations in the same order gives bit-identical ``pixel_values``, not merely close ones.
(The torchvision backend, transformers' default when torchvision is installed, resizes differently and
differs by up to ~2 grey levels; qwen-vl-utils and the original releases resize with PIL, as here.)

Patch rows come in the order the vision tower's 2x2 merger expects: merge blocks in row-major order,
inside each block its merge_size x merge_size patches row-major; each row is (C, T, P, P) flattened,
where a still image is its one frame repeated temporal_patch_size times.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import InputError, ModelLoadError
from .fetch import ImageSource, load_image, to_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200

# Model types that share a preprocessing recipe (transformers maps all of them to Qwen2VLImageProcessor).
_FAMILY_ALIASES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl",
    "qwen3_5": "qwen3_vl",
    "qwen3_5_moe": "qwen3_vl",
}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) the reference resizes an image to: both multiples of `factor`, the area brought
    into [min_pixels, max_pixels] keeping the aspect ratio. Raises InputError for a side of 0 or an aspect
    ratio over 200.

    This is transformers 5.23's smart_resize, edge cases included: a side shorter than factor/2 first
    rounds to 0, which always lands in the min_pixels branch (qwen-vl-utils instead clamps to `factor`
    first, so it can answer differently for tiny sides), and the float expressions are evaluated in the
    same order so the floors and ceils agree.
    """
    if height <= 0 or width <= 0:
        raise InputError(f"image has a side of 0 pixels ({width}x{height}); it has nothing to show")
    if factor <= 0:
        raise InputError(f"resize factor must be positive, got {factor}")
    if min_pixels < 1:
        raise InputError(f"min_pixels must be at least 1, got {min_pixels}", param="min_pixels")
    if max_pixels < min_pixels:
        # the reference does not check this and returns sizes outside both bounds; refuse instead
        raise InputError(f"max_pixels ({max_pixels}) is below min_pixels ({min_pixels})", param="max_pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"image is {width}x{height}, an aspect ratio of {ratio:.4g}; the most the vision models take "
            f"is {MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor  # Python's round: ties go to even, as in the reference
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def shared_settings(data: dict[str, Any], int_keys: tuple[str, ...]) -> dict[str, Any]:
    """The settings image and video processor configs spell alike: `int_keys`, the pixel budget (top-level
    min_pixels / max_pixels win over size.shortest_edge / size.longest_edge, as in transformers; the old
    size.min_pixels / size.max_pixels spelling is read too), mean, std and rescale factor. Raises ValueError."""
    changes: dict[str, Any] = {}
    for key in int_keys:
        if data.get(key) is not None:
            changes[key] = _config_int(data[key], key)
    size = data.get("size") or {}
    if not isinstance(size, dict):
        raise ValueError(f"size must be an object, got {size!r}")
    for key, size_keys in (("min_pixels", ("shortest_edge", "min_pixels")), ("max_pixels", ("longest_edge", "max_pixels"))):
        value = data.get(key)
        for size_key in size_keys:
            if value is None:
                value = size.get(size_key)
        if value is not None:
            changes[key] = _config_int(value, key)
    for key in ("image_mean", "image_std"):
        if data.get(key) is not None:
            changes[key] = _three_floats(data[key], key)
    if data.get("rescale_factor") is not None:
        changes["rescale_factor"] = float(data["rescale_factor"])
    return changes


def _from_first_file(cls, folder: Path, family: str, candidates: tuple[tuple[str, str | None], ...]):
    """cls.from_dict of the first candidate (file name, key of the part to read or None) the folder holds; the
    family defaults without any. Errors name the file."""
    for name, key in candidates:
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"could not read {file}: {exc}") from exc
        if key is not None:
            data = data.get(key) if isinstance(data, dict) else None
            if data is None:
                continue
        if not isinstance(data, dict):
            raise ModelLoadError(f"{file} does not hold a JSON object")
        try:
            return cls.from_dict(data, family)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{file}: {exc}") from exc
    return cls.for_family(family)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What a model folder's preprocessor_config.json says about images (defaults: Qwen2-VL's class)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    family: str = field(default="qwen2_vl", compare=False)

    @property
    def factor(self) -> int:
        """Sides of a resized image are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def for_family(cls, family: str) -> ImageProcessorConfig:
        """The defaults of a family: "qwen2_vl", "qwen2_5_vl" or "qwen3_vl" (also "qwen3_vl_moe", "qwen3_5",
        "qwen3_5_moe", which preprocess like Qwen3-VL)."""
        canonical = _FAMILY_ALIASES.get(family)
        if canonical is None:
            raise ModelLoadError(
                f"no image preprocessing is known for model family {family!r}; "
                f"known: {', '.join(sorted(_FAMILY_ALIASES))}"
            )
        if canonical == "qwen3_vl":
            # transformers has no Qwen3-VL image processor class of its own (it reuses Qwen2-VL's, whose
            # class defaults are Qwen2-VL's); these are the values every released Qwen3-VL and Qwen3.5
            # checkpoint ships in preprocessor_config.json: 256x256 .. 4096x4096 pixels.
            return cls(
                patch_size=16,
                min_pixels=65536,
                max_pixels=16777216,
                image_mean=(0.5, 0.5, 0.5),
                image_std=(0.5, 0.5, 0.5),
                family=family,
            )
        # Qwen2.5-VL's processor is Qwen2-VL's; these are transformers' class defaults. Released
        # checkpoints raise max_pixels to 16384*28*28 in their preprocessor_config.json.
        return cls(family=family)

    @classmethod
    def from_dict(cls, data: dict[str, Any], family: str) -> ImageProcessorConfig:
        """Lay the image settings of a preprocessor config over the family defaults.

        Precedence for the pixel budget follows transformers: top-level min_pixels / max_pixels win over
        size.shortest_edge / size.longest_edge. Unlike transformers, a size dict holding only one bound, or
        the old size.min_pixels / size.max_pixels spelling, is accepted (the other bound from the family).
        """
        base = cls.for_family(family)
        try:
            changes = shared_settings(data, ("patch_size", "temporal_patch_size", "merge_size"))
            if data.get("resample") is not None:
                changes["resample"] = int(Image.Resampling(int(data["resample"])))
            # Switched-off steps are the identity: scale 1 and (x - 0) / 1 are exact in float32.
            if data.get("do_rescale") is False:
                changes["rescale_factor"] = 1.0
            if data.get("do_normalize") is False:
                changes["image_mean"], changes["image_std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
            config = replace(base, **changes)
            config._check()
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"bad image preprocessing config: {exc}") from exc
        return config

    @classmethod
    def from_dir(cls, path: str | Path, family: str) -> ImageProcessorConfig:
        """Read a model folder's preprocessor_config.json, or the "image_processor" part of the
        processor_config.json that transformers 5 writes; without either, the family defaults."""
        return _from_first_file(cls, Path(path), family, (("preprocessor_config.json", None),
                                                           ("processor_config.json", "image_processor")))

    def _check(self) -> None:
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            _config_int(getattr(self, key), key)
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"max_pixels ({self.max_pixels}) is below min_pixels ({self.min_pixels})")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std has a zero: {self.image_std}")


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # float32 [num_patches, 3 * temporal_patch_size * patch_size**2]
    grid_thw: tuple[int, int, int]  # (1, resized height / patch_size, resized width / patch_size)
    num_tokens: int  # image pad tokens in the prompt: num_patches / merge_size**2
    resized_size: tuple[int, int]  # (height, width) after smart_resize
    original_size: tuple[int, int]  # (height, width) as given


def preprocess_image(
    image: Image.Image | ImageSource,
    config: ImageProcessorConfig,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    resized_height: int | None = None,
    resized_width: int | None = None,
) -> ProcessedImage:
    """Turn one image into the vision tower's input, exactly as transformers' PIL image processor does.

    A PIL image is used as given (converted to RGB by the processor's rule, no EXIF rotation, like the
    reference); any other source goes through load_image first. `min_pixels` / `max_pixels` replace the
    config's pixel budget for this image (transformers: size={"shortest_edge", "longest_edge"}).
    `resized_height` / `resized_width` (both or neither) ask for a size, which, as in qwen-vl-utils, still
    goes through smart_resize (with this image's pixel budget) so it fits the patch grid.
    """
    if not isinstance(image, Image.Image):
        image = load_image(image)
    width, height = image.size
    if width == 0 or height == 0:
        raise InputError(f"image has a side of 0 pixels ({width}x{height}); it has nothing to show")
    low = config.min_pixels if min_pixels is None else _positive_int(min_pixels, "min_pixels")
    high = config.max_pixels if max_pixels is None else _positive_int(max_pixels, "max_pixels")
    if (resized_height is None) != (resized_width is None):
        missing = "resized_width" if resized_width is None else "resized_height"
        raise InputError("resized_height and resized_width go together; pass both or neither", param=missing)
    if resized_height is not None and resized_width is not None:
        target = (
            _positive_int(resized_height, "resized_height"),
            _positive_int(resized_width, "resized_width"),
        )
    else:
        target = (height, width)
    new_height, new_width = smart_resize(*target, factor=config.factor, min_pixels=low, max_pixels=high)

    rgb = to_rgb(image)
    if rgb.size != (new_width, new_height):
        rgb = rgb.resize((new_width, new_height), resample=Image.Resampling(config.resample))
    pixels = np.asarray(rgb, dtype=np.uint8)  # (h, w, 3)
    patches = _patchify(_normalise(pixels, config), config)

    grid_h, grid_w = new_height // config.patch_size, new_width // config.patch_size
    return ProcessedImage(
        pixel_values=torch.from_numpy(patches),
        grid_thw=(1, grid_h, grid_w),
        num_tokens=grid_h * grid_w // config.merge_size**2,
        resized_size=(new_height, new_width),
        original_size=(height, width),
    )


def _normalise(pixels: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """uint8 (h, w, 3) -> float32 (h, w, 3), rescaled and normalised with the reference's exact arithmetic.

    Every output value depends only on (byte, channel), so the 256 x 3 possible results are computed once
    with the reference's operations (float64 product rounded to float32, then float32 subtract and divide)
    and looked up: the same bits, several times faster than arithmetic over the whole image.
    """
    scaled = (np.arange(256, dtype=np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    table = (scaled[:, None] - mean) / std  # (256, 3) float32
    return table[pixels, np.arange(3)]


def _patchify(values: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """float32 (h, w, C) -> [num_patches, C * T * P * P] rows in merge-block order."""
    height, width, channels = values.shape
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    blocks = values.reshape(grid_h // m, m, p, grid_w // m, m, p, channels)
    # -> (block row, block col, row in block, col in block, channel, pixel row, pixel col)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
    # a still image is one frame repeated over the temporal patch (T sits between channel and pixels)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
    return np.ascontiguousarray(frames).reshape(grid_h * grid_w, channels * t * p * p)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}", param=name)
    return int(value)


def _config_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _three_floats(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3  # transformers accepts one number for all channels
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    raise ValueError(f"{name} must be a number or a list of 3 numbers, got {value!r}")
