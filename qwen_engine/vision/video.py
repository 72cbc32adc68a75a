"""Video input for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: probe, frame sampling, decoding and preprocessing.

A video is a file FFmpeg can read (mp4, webm, mov, mkv, ...; a path or a ``file://`` URL), decoded with
PyAV, or a list of frames (PIL images, or anything ``load_image`` reads). Work happens in two steps so that
a caller can refuse an expensive video before paying for it:

* ``plan_video`` reads only the container header (frame count, frame rate, size) and works out which frames
  are sampled, their timestamps, the resized size, ``grid_thw`` and the number of placeholder tokens; with
  ``max_tokens`` it raises before any frame is decoded.
* ``process_video_plan`` (or ``preprocess_video``, both steps at once) decodes only the sampled frames
  (sequentially, converting just the frames it keeps and stopping after the last one), resizes them and
  produces the vision tower's input.

Two sampling rules are provided, because the reference pipelines disagree:

``"qwen-vl-utils"`` (the default) is what the released models are run with: Qwen's ``qwen_vl_utils``
``fetch_video`` samples and resizes the frames, and transformers' processor is then called with
``do_sample_frames=False`` (and, in Qwen3-VL's README, ``do_resize=False``). Frames: ``nframes`` (rounded
to an even count), or ``duration * fps`` (fps 2) clamped to [min_frames 4, max_frames 768] and to the frame
count, floored to even; indices ``torch.linspace(0, total - 1, n).round()``. Per-frame pixel budget:
``min_pixels`` 128 tokens, ``max_pixels = max(min(768 tokens, total_pixels / n * 2), 1.05 * min_pixels)``
with ``total_pixels`` 0.9 * 128000 tokens' worth, an explicit ``max_pixels`` only lowering it (one token
is factor x factor pixels, factor 28 for Qwen2/2.5-VL and 32 for Qwen3-VL). ``sample_fps = n / total *
video_fps``.

``"transformers"`` is what transformers 5.23's video processors do on their own (``do_sample_frames=True``):
Qwen2-VL / 2.5-VL ``sample_frames`` (``torch.arange(0, total, total / n).int()``, n floored to a multiple
of temporal_patch_size) and a per-frame ``smart_resize`` within the processor's ``size``; Qwen3-VL
``sample_frames`` (``int(duration * fps)`` clamped to [min_frames, max_frames], ``np.linspace(...).round()``,
odd counts allowed: the last frame is repeated to fill the temporal patch) and a ``smart_resize`` whose
budget covers all frames (t * h * w). Settings come from ``video_preprocessor_config.json``.

Resizing follows the rule's reference, because the two resize differently: qwen-vl-utils calls
torchvision's v1 ``transforms.functional.resize`` (bicubic, antialias) on the uint8 frames, which works in
float32 and rounds back to uint8; transformers' video processors call the v2 ``resize``, which on CPU runs
torch's native uint8 kernel. Both are torch's ``F.interpolate`` underneath (no torchvision needed here),
neither is PIL, and they differ by up to ~14 grey levels at hard edges. Rescale and normalise are
transformers' fused form ``(x - 255 * mean) / (255 * std)`` in float32 in both rules. Given the same
decoded frames the result equals the reference bit for bit.

Frame lists take all their frames (qwen-vl-utils: padded to an even count by repeating the last one,
played at ``fps``, default 2), must share one size, and are resized once by the rule's budget.
(qwen-vl-utils first resizes each listed frame with PIL to an image grid, then again for the video; the
PIL step is left out here.)
"""

from __future__ import annotations

import math
import os
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ContextLengthError, InputError, ModelLoadError
from .fetch import ImageSource, load_image, to_rgb
from .image import (
    _FAMILY_ALIASES,
    MAX_ASPECT_RATIO,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    _config_int,
    _from_first_file,
    shared_settings,
    smart_resize,
)

VideoSource = str | os.PathLike | Sequence[ImageSource]

SAMPLING_RULES = ("qwen-vl-utils", "transformers")
DEFAULT_SAMPLING = "qwen-vl-utils"

# Per-item options a message part may carry for a video (the names qwen-vl-utils reads).
VIDEO_OPTION_KEYS = (
    "fps",
    "nframes",
    "min_frames",
    "max_frames",
    "total_pixels",
    "min_pixels",
    "max_pixels",
    "resized_height",
    "resized_width",
)

# qwen-vl-utils' constants, in tokens of factor x factor pixels.
QVU_VIDEO_MIN_TOKENS = 128
QVU_VIDEO_MAX_TOKENS = 768
QVU_MODEL_SEQ_LEN = 128000  # its MODEL_SEQ_LEN; the default total budget is 90% of it
QVU_IMAGE_MIN_TOKENS = 4
QVU_IMAGE_MAX_TOKENS = 16384
QVU_FPS = 2.0
FRAME_LIST_FPS = 2.0  # qwen-vl-utils' default sample_fps for a list of frames

# PIL resample codes -> the torch interpolation transformers' torchvision backend ends up calling.
_RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


# --------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class VideoProcessorConfig:
    """What a model folder's video processor config says (defaults: the family's, see for_family).

    min_pixels / max_pixels are the processor's ``size`` bounds: per frame for Qwen2-VL / 2.5-VL, over all
    frames (t * h * w) for Qwen3-VL. They are used by the "transformers" rule; the default "qwen-vl-utils"
    rule has its own per-frame budget (module docstring) and takes only patch sizes, normalisation and the
    fps / min_frames / max_frames defaults from here.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    fps: float | None = None  # None: transformers' Qwen2-VL processor, which samples every frame
    min_frames: int = 4
    max_frames: int = 768
    family: str = field(default="qwen2_vl", compare=False)

    @property
    def factor(self) -> int:
        """Frame sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @property
    def budget_over_frames(self) -> bool:
        """True for Qwen3-VL, whose processor's pixel bounds cover t * h * w rather than one frame."""
        return _FAMILY_ALIASES.get(self.family) == "qwen3_vl"

    @classmethod
    def for_family(cls, family: str) -> VideoProcessorConfig:
        """Defaults of "qwen2_vl", "qwen2_5_vl" or "qwen3_vl" (and "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")."""
        canonical = _FAMILY_ALIASES.get(family)
        if canonical is None:
            raise ModelLoadError(
                f"no video preprocessing is known for model family {family!r}; "
                f"known: {', '.join(sorted(_FAMILY_ALIASES))}"
            )
        if canonical == "qwen3_vl":
            # What every released Qwen3-VL checkpoint ships in video_preprocessor_config.json (the class
            # defaults of Qwen3VLVideoProcessor are smaller: 128..768 tokens in total).
            return cls(
                patch_size=16,
                fps=2.0,
                min_pixels=4096,
                max_pixels=25165824,
                image_mean=(0.5, 0.5, 0.5),
                image_std=(0.5, 0.5, 0.5),
                family=family,
            )
        # transformers' Qwen2VLVideoProcessor class defaults (Qwen2.5-VL uses the same class).
        return cls(family=family)

    @classmethod
    def from_dict(cls, data: dict[str, Any], family: str) -> VideoProcessorConfig:
        """Lay a video (or image) processor config over the family defaults; as in transformers, top-level
        min_pixels / max_pixels win over size.shortest_edge / size.longest_edge."""
        base = cls.for_family(family)
        try:
            changes = shared_settings(
                data, ("patch_size", "temporal_patch_size", "merge_size", "min_frames", "max_frames"))
            for key in ("do_rescale", "do_normalize"):
                if data.get(key) is not None:
                    changes[key] = bool(data[key])
            if data.get("resample") is not None:
                changes["resample"] = int(data["resample"])
            if data.get("fps") is not None:
                changes["fps"] = _config_number(data["fps"], "fps")
            config = replace(base, **changes)
            config._check()
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"bad video preprocessing config: {exc}") from exc
        return config

    @classmethod
    def from_dir(cls, path: str | Path, family: str) -> VideoProcessorConfig:
        """Read a model folder the way transformers' AutoVideoProcessor does: the "video_processor" part of
        processor_config.json, else video_preprocessor_config.json, else preprocessor_config.json (the
        image settings, which is what Qwen2-VL / 2.5-VL checkpoints ship); without any, the family defaults."""
        return _from_first_file(cls, Path(path), family, (("processor_config.json", "video_processor"),
                                                           ("video_preprocessor_config.json", None),
                                                           ("preprocessor_config.json", None)))

    def _check(self) -> None:
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            _config_int(getattr(self, key), key)
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"max_pixels ({self.max_pixels}) is below min_pixels ({self.min_pixels})")
        if self.max_frames < self.min_frames:
            raise ValueError(f"max_frames ({self.max_frames}) is below min_frames ({self.min_frames})")
        if self.do_normalize and any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std has a zero: {self.image_std}")
        if self.resample not in _RESAMPLE_MODES:
            raise ValueError(
                f"resample {self.resample} is not supported for videos; use 0 (nearest), 2 (bilinear) or "
                "3 (bicubic)"
            )


# --------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class VideoProbe:
    """What the container header says about a video file (no frame decoded)."""

    path: Path
    num_frames: int  # frames in the video stream (header count, else counted from packets)
    fps: float  # average frame rate
    duration: float  # seconds: num_frames / fps, the duration the sampling rules use
    height: int
    width: int
    codec: str


@dataclass(frozen=True)
class VideoPlan:
    """Everything about a video's input that is known before decoding: enough to budget its tokens."""

    config: VideoProcessorConfig
    sampling: str
    path: Path | None  # the file, or None for a list of frames
    num_frames_total: int  # frames in the video (for a list: the frames given)
    video_fps: float  # frame rate of the source (for a list: the fps it is played at)
    original_size: tuple[int, int]  # (height, width)
    frame_indices: tuple[int, ...]  # the sampled frames, in order (one entry per frame fed to the model)
    sample_fps: float  # sampled frames per second of video
    resized_size: tuple[int, int]  # (height, width) every frame is resized to
    grid_thw: tuple[int, int, int]
    num_tokens: int  # video pad tokens in the prompt
    frame_timestamps: tuple[float, ...]  # seconds, one per sampled frame: index / video_fps
    grid_timestamps: tuple[float, ...]  # seconds, one per temporal patch (Qwen3-VL's "<t seconds>")
    second_per_grid_t: float  # temporal_patch_size / sample_fps (Qwen2.5-VL's M-RoPE time step)
    options: tuple[tuple[str, Any], ...] = ()  # the per-item options given (name, value)
    frames: tuple[Image.Image, ...] | None = field(default=None, repr=False)  # a list's frames, loaded


@dataclass
class ProcessedVideo:
    pixel_values: torch.Tensor  # float32 [grid_t * grid_h * grid_w, C * temporal_patch_size * patch_size**2]
    grid_thw: tuple[int, int, int]  # (frames / temporal_patch_size, height / patch, width / patch)
    num_tokens: int  # video pad tokens in the prompt: patches / merge_size**2
    resized_size: tuple[int, int]  # (height, width) of every frame after resizing
    frame_timestamps: list[float]  # seconds, one per sampled frame
    grid_timestamps: list[float]  # seconds, one per temporal patch group (Qwen3-VL prompt timestamps)
    second_per_grid_t: float  # temporal_patch_size / sample_fps, for Qwen2.5-VL's M-RoPE
    sample_fps: float  # sampled frames per second of video
    original_size: tuple[int, int]  # (height, width) of the source frames
    num_frames_total: int  # frames in the source video
    frame_indices: list[int]  # which source frames were used
    video_fps: float  # frame rate of the source


# --------------------------------------------------------------------------------------------------------
# Public entry points


def probe_video(source: str | os.PathLike) -> VideoProbe:
    """Read a video file's header: frame count, frame rate, duration and size, without decoding frames.

    When the header has no frame count (webm, mkv), the packets are counted instead: that reads the file
    but decodes nothing. Raises InputError for a missing or unreadable file, or one with no video stream.
    """

    path, what = _video_path(source)
    container = _open(path, what)
    with container:
        stream = _video_stream(container, what)
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            num_frames = _count_packets(container, stream)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if not fps > 0 or not math.isfinite(fps):
            seconds = _stream_seconds(container, stream)
            fps = num_frames / seconds if seconds else 0.0
        if num_frames <= 0:
            raise InputError(f"{what} has no decodable frames")
        if not fps > 0:
            raise InputError(f"{what} has no usable frame rate")
        context = stream.codec_context
        height, width = int(context.height or 0), int(context.width or 0)
        codec = context.name or "unknown"
    if height <= 0 or width <= 0:
        height, width = _first_frame_size(path, what)
    return VideoProbe(
        path=path,
        num_frames=num_frames,
        fps=fps,
        duration=num_frames / fps,
        height=height,
        width=width,
        codec=codec,
    )


def plan_video(
    video: VideoSource,
    config: VideoProcessorConfig,
    *,
    sampling: str = DEFAULT_SAMPLING,
    max_tokens: int | None = None,
    fps: float | None = None,
    nframes: int | None = None,
    min_frames: int | None = None,
    max_frames: int | None = None,
    total_pixels: float | None = None,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
    resized_height: int | None = None,
    resized_width: int | None = None,
) -> VideoPlan:
    """Work out a video's sampled frames, size, grid and token count from its header alone.

    `video` is a file path / file:// URL, or a list of frames. The options are qwen-vl-utils' per-item
    video options (module docstring); `sampling` picks the rule ("qwen-vl-utils" or "transformers").
    `max_tokens`, when given, is the token budget: a video needing more raises InputError naming it,
    before any frame is decoded. Raises InputError for bad options and unreadable videos.
    """
    if sampling not in SAMPLING_RULES:
        raise InputError(
            f"unknown video sampling rule {sampling!r}; use one of {', '.join(SAMPLING_RULES)}",
            param="sampling",
        )
    options = _Options(
        fps=None if fps is None else _positive_float(fps, "fps"),
        nframes=None if nframes is None else _positive_int(nframes, "nframes"),
        min_frames=None if min_frames is None else _positive_int(min_frames, "min_frames"),
        max_frames=None if max_frames is None else _positive_int(max_frames, "max_frames"),
        total_pixels=None if total_pixels is None else _positive_float(total_pixels, "total_pixels"),
        min_pixels=None if min_pixels is None else _positive_float(min_pixels, "min_pixels"),
        max_pixels=None if max_pixels is None else _positive_float(max_pixels, "max_pixels"),
        resized_height=None if resized_height is None else _positive_int(resized_height, "resized_height"),
        resized_width=None if resized_width is None else _positive_int(resized_width, "resized_width"),
    )
    options.check(sampling)
    if max_tokens is not None:
        max_tokens = _positive_int(max_tokens, "max_tokens")

    if _is_frame_list(video):
        frames = _load_frame_list(video)  # type: ignore[arg-type]
        plan = _plan_frame_list(frames, config, sampling, options)
    else:
        probe = probe_video(video)  # type: ignore[arg-type]
        plan = _plan_file(probe, config, sampling, options)
    if max_tokens is not None and plan.num_tokens > max_tokens:
        _raise_over_budget(plan, max_tokens)
    return plan


def process_video_plan(plan: VideoPlan, *, max_tokens: int | None = None) -> ProcessedVideo:
    """Decode the planned frames (only those) and turn them into the vision tower's input. `max_tokens`
    is checked again if the file turns out to hold fewer frames than its header said (see below)."""
    config = plan.config
    if plan.frames is not None:
        video = torch.stack(
            [torch.from_numpy(np.array(plan.frames[i], dtype=np.uint8)) for i in plan.frame_indices]
        )
        video = _resize(
            video.permute(0, 3, 1, 2).contiguous(), plan.resized_size, plan.sampling, config.resample
        )
    else:
        assert plan.path is not None
        video, decoded = _decode_frames(plan)
        if video is None:
            # The stream ended (or broke) before the last sampled frame: the header over-counted. Plan
            # again over the frames that really decode, as a reader that counts frames would have.
            if decoded == 0:
                raise InputError(f"the video file {str(plan.path)!r} has no decodable frames")
            probe = VideoProbe(
                path=plan.path,
                num_frames=decoded,
                fps=plan.video_fps,
                duration=decoded / plan.video_fps,
                height=plan.original_size[0],
                width=plan.original_size[1],
                codec="",
            )
            plan = _plan_file(probe, config, plan.sampling, _Options.from_plan(plan))
            if max_tokens is not None and plan.num_tokens > max_tokens:
                _raise_over_budget(plan, max_tokens)
            video, _ = _decode_frames(plan)
            if video is None:
                raise InputError(f"the video file {str(plan.path)!r} could not be decoded consistently")
    patches = _patchify(_rescale_and_normalise(video, config), config)
    return ProcessedVideo(
        pixel_values=patches,
        grid_thw=plan.grid_thw,
        num_tokens=plan.num_tokens,
        resized_size=plan.resized_size,
        frame_timestamps=list(plan.frame_timestamps),
        grid_timestamps=list(plan.grid_timestamps),
        second_per_grid_t=plan.second_per_grid_t,
        sample_fps=plan.sample_fps,
        original_size=plan.original_size,
        num_frames_total=plan.num_frames_total,
        frame_indices=list(plan.frame_indices),
        video_fps=plan.video_fps,
    )


def preprocess_video(
    video: VideoSource,
    config: VideoProcessorConfig,
    *,
    sampling: str = DEFAULT_SAMPLING,
    max_tokens: int | None = None,
    **options: Any,
) -> ProcessedVideo:
    """plan_video then process_video_plan: one video to the vision tower's input. `options` are
    plan_video's (fps, nframes, min_frames, max_frames, total_pixels, min_pixels, max_pixels,
    resized_height, resized_width)."""
    unknown = sorted(set(options) - set(VIDEO_OPTION_KEYS))
    if unknown:
        raise InputError(
            f"unknown video option {unknown[0]!r}; known: {', '.join(VIDEO_OPTION_KEYS)}", param=unknown[0]
        )
    plan = plan_video(video, config, sampling=sampling, max_tokens=max_tokens, **options)
    return process_video_plan(plan, max_tokens=max_tokens)


# --------------------------------------------------------------------------------------------------------
# Frame choice and timestamps (public so tests and other callers can use the bare rules)


def qwen_vl_utils_nframes(
    total_frames: int,
    video_fps: float,
    *,
    fps: float = 2.0,
    nframes: int | None = None,
    min_frames: int = 4,
    max_frames: int | None = None,
    frame_factor: int = 2,
) -> int:
    """How many frames qwen-vl-utils' smart_nframes samples: nframes rounded to even, or the duration
    times fps clamped to [min_frames (rounded up to even), max_frames (default min(768, total), rounded
    down to even)] and to the total, floored to even. Raises InputError outside [2, total_frames]."""
    if nframes is not None:
        count = round(nframes / frame_factor) * frame_factor
    else:
        low = math.ceil(min_frames / frame_factor) * frame_factor
        high_src = min(768, total_frames) if max_frames is None else max_frames
        high = math.floor(high_src / frame_factor) * frame_factor
        wanted = total_frames / video_fps * fps
        count = min(min(max(wanted, low), high), total_frames)
        count = math.floor(count / frame_factor) * frame_factor
    if not frame_factor <= count <= total_frames:
        raise InputError(
            f"cannot sample {count} frames from a video of {total_frames}: the count must be in "
            f"[{frame_factor}, {total_frames}]",
            param="nframes" if nframes is not None else "fps",
        )
    return int(count)


def qwen_vl_utils_indices(total_frames: int, count: int) -> list[int]:
    """qwen-vl-utils' frame indices: torch.linspace(0, total - 1, count) in float32, rounded half to even."""
    return torch.linspace(0, total_frames - 1, count).round().long().tolist()


def transformers_frame_indices(
    family: str,
    total_frames: int,
    video_fps: float,
    *,
    fps: float | None = 2.0,
    nframes: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
    temporal_patch_size: int = 2,
) -> list[int]:
    """The frames transformers 5.23's video processor of `family` samples (do_sample_frames=True)."""
    if _FAMILY_ALIASES.get(family) == "qwen3_vl":
        # Qwen3VLVideoProcessor.sample_frames: no rounding to the temporal patch (patchify pads instead).
        if nframes is None:
            count = int(total_frames / video_fps * (fps if fps is not None else 2.0))
            count = min(max(count, min_frames), max_frames, total_frames)
        else:
            count = nframes
        return np.linspace(0, total_frames - 1, count).round().astype(int).tolist()
    # Qwen2VLVideoProcessor.sample_frames
    tps = temporal_patch_size
    if nframes is not None:
        count = round(nframes / tps) * tps
    elif fps is not None:
        high = math.floor(min(max_frames, total_frames) / tps) * tps
        wanted = total_frames / video_fps * fps
        count = min(max(wanted, min_frames), high, total_frames)
        count = math.floor(count / tps) * tps
    else:
        return list(range(total_frames))
    if count > total_frames or count < 1:
        raise InputError(
            f"cannot sample {count} frames from a video of {total_frames} "
            f"(the count must be a multiple of {tps} in [{tps}, {total_frames}])",
            param="nframes" if nframes is not None else "fps",
        )
    return torch.arange(0, total_frames, total_frames / count).int().tolist()


def grid_timestamps(indices: Sequence[int], video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Qwen3-VL's timestamp per temporal patch, as transformers' Qwen3VLProcessor._calculate_timestamps:
    the indices are padded with the last one to a whole number of patches, and each patch gets the mean
    of its first and last frame's time (index / video_fps)."""
    padded = list(indices)
    if len(padded) % temporal_patch_size:
        padded.extend([padded[-1]] * (temporal_patch_size - len(padded) % temporal_patch_size))
    times = [index / video_fps for index in padded]
    return [
        (times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)
    ]


def smart_resize_frames(
    num_frames: int,
    height: int,
    width: int,
    *,
    temporal_factor: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
) -> tuple[int, int]:
    """transformers' Qwen3-VL video smart_resize: the frame size whose t * h * w fits [min, max] pixels.
    Sides shorter than `factor` are first scaled up (truncating), as the reference does."""
    if num_frames < temporal_factor:
        raise InputError(
            f"a video needs at least {temporal_factor} frames here, got {num_frames}", param="nframes"
        )
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_ratio(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_vl_utils_smart_resize(
    height: float, width: float, factor: int, min_pixels: float, max_pixels: float
) -> tuple[int, int]:
    """qwen-vl-utils' smart_resize, which differs from transformers' on tiny sides (each side is at least
    `factor` before the budget checks). Where the reference would produce a side of 0 (extreme aspect
    ratios under a small budget) the side is kept at `factor` instead."""
    if max_pixels < min_pixels:
        raise InputError(
            f"max_pixels ({max_pixels:g}) is below min_pixels ({min_pixels:g})", param="max_pixels"
        )
    _check_ratio(height, width)
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


# --------------------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class _Options:
    fps: float | None = None
    nframes: int | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    total_pixels: float | None = None
    min_pixels: float | None = None
    max_pixels: float | None = None
    resized_height: int | None = None
    resized_width: int | None = None

    def check(self, sampling: str) -> None:
        if self.fps is not None and self.nframes is not None:
            raise InputError("pass fps or nframes for a video, not both", param="nframes")
        if (self.resized_height is None) != (self.resized_width is None):
            missing = "resized_width" if self.resized_width is None else "resized_height"
            raise InputError(
                "resized_height and resized_width go together; pass both or neither", param=missing
            )
        if self.min_frames is not None and self.max_frames is not None and self.min_frames > self.max_frames:
            raise InputError(
                f"min_frames ({self.min_frames}) is above max_frames ({self.max_frames})", param="min_frames"
            )
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise InputError(
                f"max_pixels ({self.max_pixels:g}) is below min_pixels ({self.min_pixels:g})",
                param="max_pixels",
            )
        if sampling == "transformers" and self.total_pixels is not None:
            raise InputError(
                "total_pixels belongs to the qwen-vl-utils sampling rule; with the transformers rule the "
                "processor's pixel bounds (min_pixels / max_pixels) apply",
                param="total_pixels",
            )

    @classmethod
    def from_plan(cls, plan: VideoPlan) -> _Options:
        return cls(**dict(plan.options))

    def items(self) -> tuple[tuple[str, Any], ...]:
        return tuple((key, getattr(self, key)) for key in VIDEO_OPTION_KEYS if getattr(self, key) is not None)


def _plan_file(
    probe: VideoProbe, config: VideoProcessorConfig, sampling: str, options: _Options
) -> VideoPlan:
    total, video_fps = probe.num_frames, probe.fps
    tps = config.temporal_patch_size
    if sampling == "qwen-vl-utils":
        fps = options.fps if options.fps is not None else (config.fps or QVU_FPS)
        if total < tps and options.nframes is None:
            # qwen-vl-utils refuses a video shorter than one temporal patch; use what there is instead
            count, indices = tps, [min(i, total - 1) for i in range(tps)]
        else:
            count = qwen_vl_utils_nframes(
                total,
                video_fps,
                fps=fps,
                nframes=options.nframes,
                min_frames=options.min_frames if options.min_frames is not None else config.min_frames,
                max_frames=options.max_frames
                if options.max_frames is not None
                else min(config.max_frames, total),
                frame_factor=tps,
            )
            indices = qwen_vl_utils_indices(total, count)
        sample_fps = count / max(total, 1e-6) * video_fps
        resized = _qwen_vl_utils_frame_size(probe.height, probe.width, count, config, options)
    else:
        # transformers' Qwen2-VL processor has no fps of its own (fps None samples every frame)
        fps = options.fps if options.fps is not None else config.fps
        indices = transformers_frame_indices(
            config.family,
            total,
            video_fps,
            fps=None if options.nframes is not None else fps,
            nframes=options.nframes,
            min_frames=options.min_frames if options.min_frames is not None else config.min_frames,
            max_frames=options.max_frames if options.max_frames is not None else config.max_frames,
            temporal_patch_size=tps,
        )
        sample_fps = len(indices) / total * video_fps
        resized = _transformers_frame_size(probe.height, probe.width, len(indices), config, options)
    return _finish_plan(
        config,
        sampling,
        options,
        path=probe.path,
        total=total,
        video_fps=video_fps,
        original_size=(probe.height, probe.width),
        indices=indices,
        time_indices=indices,
        sample_fps=sample_fps,
        resized=resized,
    )


def _plan_frame_list(
    frames: list[Image.Image], config: VideoProcessorConfig, sampling: str, options: _Options
) -> VideoPlan:
    # qwen-vl-utils: every frame is used, the count padded to whole temporal patches with the last frame,
    # played at sample_fps (2 unless given; our option name is fps). Its faked metadata numbers the padded
    # frames on (0..n-1), so timestamps do too.
    tps = config.temporal_patch_size
    given = len(frames)
    padded = math.ceil(given / tps) * tps
    fps = options.fps if options.fps is not None else FRAME_LIST_FPS
    width, height = frames[0].size
    if sampling == "qwen-vl-utils":
        resized = _qwen_vl_utils_frame_size(height, width, padded, config, options)
    else:
        resized = _transformers_frame_size(height, width, given, config, options)
    return _finish_plan(
        config,
        sampling,
        options,
        path=None,
        total=given,
        video_fps=fps,
        original_size=(height, width),
        indices=list(range(given)) + [given - 1] * (padded - given),
        time_indices=list(range(padded)),
        sample_fps=fps,
        resized=resized,
        frames=tuple(frames),
    )


def _finish_plan(
    config: VideoProcessorConfig,
    sampling: str,
    options: _Options,
    *,
    path: Path | None,
    total: int,
    video_fps: float,
    original_size: tuple[int, int],
    indices: list[int],
    time_indices: list[int],
    sample_fps: float,
    resized: tuple[int, int],
    frames: tuple[Image.Image, ...] | None = None,
) -> VideoPlan:
    tps, patch = config.temporal_patch_size, config.patch_size
    grid = (math.ceil(len(indices) / tps), resized[0] // patch, resized[1] // patch)
    return VideoPlan(
        config=config,
        sampling=sampling,
        path=path,
        num_frames_total=total,
        video_fps=video_fps,
        original_size=original_size,
        frame_indices=tuple(int(i) for i in indices),
        sample_fps=sample_fps,
        resized_size=resized,
        grid_thw=grid,
        num_tokens=grid[0] * grid[1] * grid[2] // config.merge_size**2,
        frame_timestamps=tuple(i / video_fps for i in time_indices),
        grid_timestamps=tuple(grid_timestamps(time_indices, video_fps, tps)),
        second_per_grid_t=tps / sample_fps,
        options=options.items(),
        frames=frames,
    )


def _qwen_vl_utils_frame_size(
    height: int, width: int, count: int, config: VideoProcessorConfig, options: _Options
) -> tuple[int, int]:
    """qwen-vl-utils' fetch_video resize: a per-frame budget that shares total_pixels over the frames."""
    factor = config.factor
    if options.resized_height is not None and options.resized_width is not None:
        return qwen_vl_utils_smart_resize(
            options.resized_height,
            options.resized_width,
            factor,
            QVU_IMAGE_MIN_TOKENS * factor * factor,
            QVU_IMAGE_MAX_TOKENS * factor * factor,
        )
    min_pixels = (
        options.min_pixels if options.min_pixels is not None else QVU_VIDEO_MIN_TOKENS * factor * factor
    )
    total_pixels = (
        options.total_pixels
        if options.total_pixels is not None
        else QVU_MODEL_SEQ_LEN * factor * factor * 0.9
    )
    max_pixels = max(
        min(QVU_VIDEO_MAX_TOKENS * factor * factor, total_pixels / count * config.temporal_patch_size),
        int(min_pixels * 1.05),
    )
    if options.max_pixels is not None:
        max_pixels = min(options.max_pixels, max_pixels)  # an explicit max_pixels can only lower the budget
    return qwen_vl_utils_smart_resize(height, width, factor, min_pixels, max_pixels)


def _transformers_frame_size(
    height: int, width: int, count: int, config: VideoProcessorConfig, options: _Options
) -> tuple[int, int]:
    """transformers' video processor resize: its size bounds, per frame or (Qwen3-VL) over t * h * w."""
    low = options.min_pixels if options.min_pixels is not None else config.min_pixels
    high = options.max_pixels if options.max_pixels is not None else config.max_pixels
    if options.resized_height is not None and options.resized_width is not None:
        height, width = options.resized_height, options.resized_width
    if config.budget_over_frames:
        return smart_resize_frames(
            count,
            height,
            width,
            temporal_factor=config.temporal_patch_size,
            factor=config.factor,
            min_pixels=low,
            max_pixels=high,
        )
    return smart_resize(height, width, factor=config.factor, min_pixels=low, max_pixels=high)


def _raise_over_budget(plan: VideoPlan, max_tokens: int) -> None:
    t, h, w = plan.grid_thw
    raise ContextLengthError(
        f"the video needs {plan.num_tokens} tokens ({len(plan.frame_indices)} frames at "
        f"{plan.resized_size[1]}x{plan.resized_size[0]}, grid {t}x{h}x{w}), over the budget of {max_tokens} "
        "tokens; lower fps, nframes, max_frames, max_pixels or total_pixels",
        param="video",
    )


# --------------------------------------------------------------------------------------------------------
# Reading


def _video_path(source: str | os.PathLike) -> tuple[Path, str]:
    """The local file a video source names, and how to name it in errors."""
    if isinstance(source, os.PathLike):
        path, what = Path(source), f"the video file {str(source)!r}"
    elif isinstance(source, str):
        lowered = source[:16].lower()
        if lowered.startswith("file://"):
            parts = urllib.parse.urlsplit(source)
            if parts.netloc not in ("", "localhost"):
                raise InputError(
                    f"file URL {source!r} names a remote host {parts.netloc!r}; only local files are read"
                )
            path = Path(urllib.request.url2pathname(parts.path))
        elif lowered.startswith(("http://", "https://", "data:")):
            shown = source if len(source) <= 60 else source[:60] + "..."
            raise InputError(f"videos are read from local files only, not from {shown!r}; download it first")
        else:
            scheme = urllib.parse.urlsplit(source).scheme
            if "://" in source and len(scheme) > 1:
                raise InputError(
                    f"unsupported URL scheme {scheme!r} in {source!r}: give a path or a file:// URL"
                )
            path = Path(source).expanduser()
        what = f"the video file {source!r}"
    else:
        raise InputError(
            f"unsupported video input of type {type(source).__name__}: pass a path, a file:// URL or a list of frames"
        )
    if not path.exists():
        raise InputError(f"{what} does not exist")
    if path.is_dir():
        raise InputError(f"{what} is a directory, not a video")
    return path, what


def _open(path: Path, what: str) -> Any:
    import av

    try:
        return av.open(str(path), mode="r")
    except av.error.InvalidDataError as exc:
        raise InputError(f"{what} is not a video FFmpeg can read ({_reason(exc)})") from exc
    except av.error.EOFError as exc:
        raise InputError(f"{what} has no decodable frames: it ends before any frame") from exc
    except (av.error.FFmpegError, OSError) as exc:
        raise InputError(f"could not open {what}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    # PyAV errors carry the FFmpeg message in strerror; str() appends the file name again
    return getattr(exc, "strerror", None) or str(exc)


def _video_stream(container: Any, what: str) -> Any:
    if not container.streams.video:
        raise InputError(f"{what} has no video stream (no video frames at all)")
    return container.streams.video[0]


def _count_packets(container: Any, stream: Any) -> int:
    """Frames in a stream whose header has no count: one per non-empty packet, read without decoding."""
    import av

    count = 0
    try:
        for packet in container.demux(stream):
            if packet.size:
                count += 1
    except av.error.FFmpegError:
        pass  # a damaged tail: count what could be read
    return count


def _stream_seconds(container: Any, stream: Any) -> float:
    import av

    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return 0.0


def _first_frame_size(path: Path, what: str) -> tuple[int, int]:
    import av

    with _open(path, what) as container:
        try:
            for frame in container.decode(video=0):
                return frame.height, frame.width
        except av.error.FFmpegError as exc:
            raise InputError(f"{what} has no decodable frames ({_reason(exc)})") from exc
    raise InputError(f"{what} has no decodable frames")


def _decode_frames(plan: VideoPlan) -> tuple[torch.Tensor | None, int]:
    """Decode the plan's frames (order kept, repeats allowed), each resized as soon as it is decoded so
    that only small frames are held. Decoding is sequential from the start and stops after the last
    sampled frame; frames in between are decoded (they are needed as references) but not converted.
    Returns (frames (n, 3, h, w) uint8, frames decoded), or (None, frames in the stream) when the stream
    ends before the last sampled frame."""
    import av

    assert plan.path is not None
    path, indices, original = plan.path, plan.frame_indices, plan.original_size

    what = f"the video file {str(path)!r}"
    wanted = set(indices)
    last = max(wanted)
    kept: dict[int, torch.Tensor] = {}
    decoded = 0
    with _open(path, what) as container:
        stream = _video_stream(container, what)
        stream.thread_type = "AUTO"  # frame threads: the output is the same, only faster
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    rgb = _to_rgb_array(frame, what)
                    if rgb.shape[:2] != original:
                        raise InputError(
                            f"{what} changes frame size mid-stream ({original[1]}x{original[0]} -> "
                            f"{rgb.shape[1]}x{rgb.shape[0]}); such videos are not supported"
                        )
                    tensor = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).contiguous()
                    kept[decoded] = _resize(tensor, plan.resized_size, plan.sampling, plan.config.resample)
                decoded += 1
                if decoded > last:
                    break
        except av.error.FFmpegError:
            pass  # a damaged stream ends here; what decoded so far counts
    if len(kept) < len(wanted):
        return None, decoded
    return torch.cat([kept[i] for i in indices]), decoded


def _to_rgb_array(frame: Any, what: str) -> np.ndarray:
    """(h, w, 3) uint8 RGB, converted by FFmpeg's swscale as transformers' PyAV reader does."""
    import av

    try:
        return frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, ValueError, TypeError) as exc:  # a pixel format swscale cannot convert
        raise InputError(f"could not convert a frame of {what} to RGB: {_reason(exc)}") from exc


def _is_frame_list(video: Any) -> bool:
    return isinstance(video, (list, tuple))


def _load_frame_list(video: Sequence[ImageSource]) -> list[Image.Image]:
    if len(video) == 0:
        raise InputError("a video given as a list of frames needs at least one frame")
    frames = []
    for number, item in enumerate(video):
        try:
            frame = to_rgb(item) if isinstance(item, Image.Image) else load_image(item)
        except InputError as exc:
            raise InputError(f"frame {number} of the video: {exc}") from exc
        if frames and frame.size != frames[0].size:
            w0, h0 = frames[0].size
            raise InputError(
                f"the frames of a video must share one size: frame 0 is {w0}x{h0}, "
                f"frame {number} is {frame.size[0]}x{frame.size[1]}"
            )
        frames.append(frame)
    width, height = frames[0].size
    if width == 0 or height == 0:
        raise InputError(f"the frames of the video have a side of 0 pixels ({width}x{height})")
    return frames


# --------------------------------------------------------------------------------------------------------
# Pixels


def _resize(video: torch.Tensor, size: tuple[int, int], sampling: str, resample: int) -> torch.Tensor:
    """uint8 (T, C, H, W) -> uint8 (T, C, h, w) the way the rule's reference resizes.

    "qwen-vl-utils": torchvision's v1 ``transforms.functional.resize(BICUBIC, antialias=True)``, which
    resizes in float32, clamps to [0, 255] and rounds back to uint8 (the config's resample is not read).
    "transformers": torchvision's v2 ``resize`` as transformers' video processors call it, which on CPU
    runs torch's native uint8 kernel for bicubic (and for bilinear on AVX2 machines). The two differ by
    up to ~14 grey levels at hard edges, so each rule keeps its own."""
    if tuple(video.shape[-2:]) == tuple(size):
        return video
    if sampling == "qwen-vl-utils":
        resized = F.interpolate(video.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        return resized.clamp_(0, 255).round_().to(torch.uint8)
    mode = _RESAMPLE_MODES[resample]
    if mode == "nearest-exact":
        return F.interpolate(video, size=size, mode=mode)
    if mode == "bicubic" or _native_uint8_bilinear():
        return F.interpolate(video, size=size, mode=mode, align_corners=False, antialias=True)
    # torchvision's bilinear on CPUs without AVX2: resize in float, then round back to uint8
    resized = F.interpolate(video.float(), size=size, mode=mode, align_corners=False, antialias=True)
    return resized.round_().to(torch.uint8)


def _native_uint8_bilinear() -> bool:
    import platform

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
        "aarch64",
        "arm64",
    )


def _rescale_and_normalise(video: torch.Tensor, config: VideoProcessorConfig) -> torch.Tensor:
    """uint8 -> float32 with transformers' video arithmetic: rescale folded into the normalisation,
    (x - mean / rescale) / (std / rescale), in float32 (not the image processors' x * rescale first)."""
    values = video.to(torch.float32)
    mean = torch.tensor(config.image_mean, dtype=torch.float32)
    std = torch.tensor(config.image_std, dtype=torch.float32)
    if config.do_normalize:
        if config.do_rescale:
            mean = mean * (1.0 / config.rescale_factor)
            std = std * (1.0 / config.rescale_factor)
        return values.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    if config.do_rescale:
        return values * config.rescale_factor
    return values


def _patchify(values: torch.Tensor, config: VideoProcessorConfig) -> torch.Tensor:
    """float32 (T, C, H, W) -> [grid_t * grid_h * grid_w, C * T_patch * P * P] rows in merge-block order;
    T is padded to whole temporal patches by repeating the last frame."""
    tps, patch, merge = config.temporal_patch_size, config.patch_size, config.merge_size
    if pad := -values.shape[0] % tps:
        values = torch.cat([values, values[-1:].expand(pad, -1, -1, -1)])
    frames, channels, height, width = values.shape
    grid_t, grid_h, grid_w = frames // tps, height // patch, width // patch
    blocks = values.view(grid_t, tps, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    # -> (t, block row, block col, row in block, col in block, channel, frame in patch, pixel row, pixel col)
    blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return blocks.reshape(grid_t * grid_h * grid_w, channels * tps * patch * patch)


# --------------------------------------------------------------------------------------------------------
# Option checks


def _check_ratio(height: float, width: float) -> None:
    if height <= 0 or width <= 0:
        raise InputError(f"video frames have a side of 0 pixels ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"video frames are {width}x{height}, an aspect ratio of {ratio:.4g}; the most the vision models "
            f"take is {MAX_ASPECT_RATIO}"
        )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}", param=name)
    return int(value)


def _positive_float(value: Any, name: str) -> float:
    """A per-item option that must be a positive, finite number (fps, pixel budgets)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a positive number, got {value!r}", param=name)
    number = float(value)
    if not (number > 0 and math.isfinite(number)):
        raise InputError(f"{name} must be a positive number, got {value!r}", param=name)
    return number


def _config_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)
