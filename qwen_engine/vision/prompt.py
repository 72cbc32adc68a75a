"""From chat messages with images and videos to a `Prompt`: token ids, the vision inputs, and M-RoPE positions.

    messages ──split──► template messages + vision requests (source, options), in order
             ──template──► text with one <|image_pad|> / <|video_pad|> per item
             ──preprocess──► pixel patches and grids (vision/image.py, vision/video.py)
             ──expand──► one pad token per merged patch (Qwen3-VL: per frame group, after "<t seconds>")
             ──tokenise──► ids; each item's rows = its pad tokens, in order
             ──positions──► models/mrope.py

Message parts accepted: {"type": "text", "text"}, {"type": "image", "image"}, {"image"} without a type,
{"type": "image_url", "image_url": {"url"}}, {"type": "video", "video"} and {"type": "video_url",
"video_url": {"url"}}; per-item options (min_pixels, max_pixels, resized_height, resized_width; for videos
also fps, nframes, min_frames, max_frames, total_pixels) sit beside the source in the part.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import VisionLinks
from ..errors import ContextLengthError, InputError
from ..models.mrope import VisionSpan, mrope_positions
from .image import ImageProcessorConfig, preprocess_image

IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = IMAGE_OPTIONS + ("fps", "nframes", "min_frames", "max_frames", "total_pixels")


@dataclass
class VisionLimits:
    """What one request may ask of the vision encoder (the server sets these; None: no limit)."""

    max_images: int | None = None
    max_videos: int | None = None
    max_pixels: int | None = None  # per image or frame; larger asks are resized down to it
    fetch_timeout: float = 10.0  # seconds for an http(s) image or video
    max_fetch_bytes: int = 64 << 20  # largest image or video body fetched


@dataclass
class VisionRequest:
    kind: str  # "image" or "video"
    source: Any  # path, URL, data URL, bytes, PIL image, or (video) a list of frames
    options: dict[str, Any]
    where: str  # "messages[n].content[k]", for errors


@dataclass
class VisionItem:
    """One image or video, processed, and where its tokens sit in the prompt."""

    kind: str
    pixel_values: torch.Tensor  # float32 [patches, C*T*P*P]
    grid_thw: tuple[int, int, int]  # in patches
    rows: torch.Tensor  # int64 positions of its pad tokens in Prompt.token_ids
    content_hash: bytes  # names the encoder output: equal pixels and grid, equal embeddings
    original_size: tuple[int, int]  # (height, width) as given (first frame for a video)
    resized_size: tuple[int, int]  # (height, width) the model saw
    seconds_per_group: float | None = None  # videos: seconds covered by one temporal patch
    timestamps: list[float] = field(default_factory=list)  # videos: seconds of each frame group

    @property
    def num_tokens(self) -> int:
        return int(self.rows.numel())


@dataclass
class Prompt:
    """A prompt ready for the engine. Text-only prompts have no items and no positions."""

    token_ids: list[int]
    items: list[VisionItem] = field(default_factory=list)
    positions: torch.Tensor | None = None  # int64 [3, len(token_ids)] (vision-language models)
    rope_delta: int = 0  # generated token i sits at position i + rope_delta
    text: str | None = None  # the rendered prompt before pad expansion

    @property
    def images(self) -> list[VisionItem]:
        return [item for item in self.items if item.kind == "image"]

    @property
    def videos(self) -> list[VisionItem]:
        return [item for item in self.items if item.kind == "video"]

    def block_extras(self, block_size: int) -> list[bytes]:
        """Per KV block, the content hashes of the items whose tokens fall into it (for the prefix cache)."""
        if not self.items:
            return []
        extras = [b""] * -(-len(self.token_ids) // block_size)
        for item in self.items:
            for block in range(int(item.rows[0]) // block_size, int(item.rows[-1]) // block_size + 1):
                extras[block] += item.content_hash
        return extras


def split_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[VisionRequest]]:
    """Messages for the chat template (vision parts reduced to {"type": "image"} / {"type": "video"}) and
    the vision requests in prompt order. Text-only messages pass through unchanged."""
    out, requests = [], []
    if not isinstance(messages, list):
        return messages, requests  # the template's validation names the problem
    for n, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for k, part in enumerate(content):
            request = _vision_request(part, f"messages[{n}].content[{k}]")
            if request is None:
                parts.append(part)
            else:
                requests.append(request)
                parts.append({"type": request.kind})
        out.append(dict(message, content=parts))
    return out, requests


def _vision_request(part: Any, where: str) -> VisionRequest | None:
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    if kind == "image_url" or (kind is None and "image_url" in part):
        return VisionRequest("image", _url_of(part, "image_url", where), _options(part, IMAGE_OPTIONS), where)
    if kind == "video_url" or (kind is None and "video_url" in part):
        return VisionRequest("video", _url_of(part, "video_url", where), _options(part, VIDEO_OPTIONS), where)
    if kind == "image" or (kind is None and "image" in part):
        if part.get("image") is None:
            raise InputError(f"{where} is an image part without an 'image'", param=where)
        return VisionRequest("image", part["image"], _options(part, IMAGE_OPTIONS), where)
    if kind == "video" or (kind is None and "video" in part):
        if part.get("video") is None:
            raise InputError(f"{where} is a video part without a 'video'", param=where)
        return VisionRequest("video", part["video"], _options(part, VIDEO_OPTIONS), where)
    if kind not in (None, "text"):
        raise InputError(f"{where} has unknown part type {kind!r}", param=where)
    return None


def _url_of(part: dict[str, Any], key: str, where: str) -> str:
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise InputError(f"{where}.{key} needs a 'url' string", param=f"{where}.{key}")
    return url


def _options(part: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    options = {k: part[k] for k in allowed if part.get(k) is not None}
    # OpenAI's image_url may carry options inside the url object too (e.g. {"url": …, "max_pixels": …}).
    for key in ("image_url", "video_url"):
        nested = part.get(key)
        if isinstance(nested, dict):
            options.update({k: nested[k] for k in allowed if nested.get(k) is not None})
    return options


class PromptBuilder:
    """Turns rendered chat text plus vision requests into a Prompt for one vision-language model."""

    def __init__(
        self,
        links: VisionLinks,
        tokenizer,
        image_config: ImageProcessorConfig,
        video_config: Any = None,
        limits: VisionLimits | None = None,
    ):
        self.links = links
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.video_config = video_config
        self.limits = limits or VisionLimits()
        self.image_pad = tokenizer.id_to_token(links.image_token_id)
        self.video_pad = tokenizer.id_to_token(links.video_token_id)
        self.vision_start = tokenizer.id_to_token(links.vision_start_token_id)
        self.vision_end = tokenizer.id_to_token(links.vision_end_token_id)
        if None in (self.image_pad, self.video_pad, self.vision_start, self.vision_end):
            raise InputError("the tokenizer lacks the vision tokens this model's config names")

    def build(self, text: str, requests: list[VisionRequest], max_tokens: int | None = None) -> Prompt:
        self._check_counts(text, requests)
        downloads: list[str] = []  # temporary copies of video URLs, removed when the pixels are made
        # Videos are planned first, from their headers: an over-budget video fails before any frame is decoded.
        try:
            plans = {
                n: self._plan_video(r, max_tokens, downloads) for n, r in enumerate(requests) if r.kind == "video"
            }
        except BaseException:
            _remove(downloads)
            raise
        video_tokens = sum(plan.num_tokens for plan in plans.values())
        if max_tokens is not None and video_tokens > max_tokens:
            raise ContextLengthError(
                f"the {len(plans)} videos need {video_tokens} tokens together, but the model's context holds "
                f"{max_tokens}; lower fps, max_frames or max_pixels / total_pixels",
                param="messages",
            )
        try:
            items = [self._process(request, plans.get(n)) for n, request in enumerate(requests)]
        finally:
            _remove(downloads)
        expanded = self._expand(text, items)
        ids = self.tokenizer.encode(expanded)
        if max_tokens is not None and len(ids) > max_tokens:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens with its images and videos, but the model's context holds "
                f"{max_tokens}; use fewer or smaller images (max_pixels) or fewer video frames"
            )
        self._place(ids, items)
        spans = [span for item in items for span in self._spans(item)]
        positions, delta = mrope_positions(len(ids), spans)
        return Prompt(ids, items, positions, delta, text)

    # -- steps -----------------------------------------------------------------------------------------------


    def _check_counts(self, text: str, requests: list[VisionRequest]) -> None:
        limits = self.limits
        images = sum(r.kind == "image" for r in requests)
        videos = len(requests) - images
        if limits.max_images is not None and images > limits.max_images:
            raise InputError(f"{images} images in one request; the limit is {limits.max_images}", param="messages")
        if limits.max_videos is not None and videos > limits.max_videos:
            raise InputError(f"{videos} videos in one request; the limit is {limits.max_videos}", param="messages")
        for kind, count, pad in (("image", images, self.image_pad), ("video", videos, self.video_pad)):
            found = text.count(pad)
            if found != count:
                raise InputError(
                    f"the rendered prompt holds {found} {kind} placeholder(s) ({pad}) for {count} {kind}(s); "
                    f"the chat template must print one per {kind} part (and the text none of its own)",
                    param="messages",
                )

    def _pixel_options(self, options: dict[str, Any]) -> dict[str, Any]:
        cap = self.limits.max_pixels
        if cap is None:
            return options
        options = dict(options)
        options["max_pixels"] = min(int(options.get("max_pixels", cap)), cap)
        if "min_pixels" in options:
            options["min_pixels"] = min(int(options["min_pixels"]), options["max_pixels"])
        return options

    def _process(self, request: VisionRequest, plan=None) -> VisionItem:
        try:
            if request.kind == "image":
                return self._process_image(request)
            return self._process_video(request, plan)
        except InputError as e:
            raise self._located(e, request) from None

    @staticmethod
    def _located(error: InputError, request: VisionRequest) -> InputError:
        """The error, naming the message part it came from."""
        if error.param is None:
            error.param = request.where
        if not str(error).startswith(request.where):
            error.args = (f"{request.where}: {error}",)
        return error

    def _process_image(self, request: VisionRequest) -> VisionItem:
        from .fetch import load_image

        source = request.source
        if not isinstance(source, Image.Image):
            source = load_image(
                source, timeout=self.limits.fetch_timeout, max_bytes=self.limits.max_fetch_bytes
            )
        options = self._pixel_options(request.options)
        processed = preprocess_image(source, self.image_config, **options)
        return VisionItem(
            kind="image",
            pixel_values=processed.pixel_values,
            grid_thw=processed.grid_thw,
            rows=torch.empty(processed.num_tokens, dtype=torch.long),
            content_hash=_content_hash("image", processed.pixel_values, processed.grid_thw),
            original_size=processed.original_size,
            resized_size=processed.resized_size,
        )

    def _plan_video(self, request: VisionRequest, max_tokens: int | None, downloads: list[str]):
        """Sample frames and size a video from its header alone, so the budget is checked before decoding."""
        from .video import plan_video

        if self.video_config is None:
            raise InputError("video input needs PyAV (pip install av)", param=request.where)
        source, downloaded = request.source, None
        try:
            if isinstance(source, str) and source[:8].lower().startswith(("http://", "https://")):
                downloaded = self._download_video(source)
                downloads.append(downloaded)
                source = downloaded
            return plan_video(source, self.video_config, max_tokens=max_tokens,
                              **self._pixel_options(request.options))
        except InputError as e:
            if downloaded is not None:  # name the URL, not our temporary copy
                e.args = (str(e).replace(repr(downloaded), repr(request.source)).replace(downloaded, request.source),)
            raise self._located(e, request) from None

    def _download_video(self, url: str) -> str:
        """Fetch a video URL into a temporary file (PyAV reads files), within the fetch timeout and size limit."""
        from .fetch import _read_http

        data, _ = _read_http(url, self.limits.fetch_timeout, self.limits.max_fetch_bytes, kind="video")
        suffix = Path(urllib.parse.urlsplit(url).path).suffix[:8] or ".mp4"
        with tempfile.NamedTemporaryFile(suffix=suffix, prefix="qwen-engine-video-", delete=False) as f:
            f.write(data)
        return f.name

    def _process_video(self, request: VisionRequest, plan) -> VisionItem:
        from .video import process_video_plan

        video = process_video_plan(plan, max_tokens=plan.num_tokens)
        return VisionItem(
            kind="video",
            pixel_values=video.pixel_values,
            grid_thw=video.grid_thw,
            rows=torch.empty(video.num_tokens, dtype=torch.long),
            content_hash=_content_hash("video", video.pixel_values, video.grid_thw),
            original_size=video.original_size,
            resized_size=video.resized_size,
            seconds_per_group=video.second_per_grid_t,
            timestamps=list(video.grid_timestamps),
        )

    def _expand(self, text: str, items: list[VisionItem]) -> str:
        """One pad token per merged patch; Qwen3-VL videos become a timestamped block per frame group."""
        merge = self.links.spatial_merge_size**2
        images = iter([item for item in items if item.kind == "image"])
        videos = iter([item for item in items if item.kind == "video"])
        wrapped_video = self.vision_start + self.video_pad + self.vision_end
        per_frame = self.links.family == "qwen3_vl"

        def expand(match: re.Match[str]) -> str:
            found = match.group(0)
            if found == self.image_pad:
                return self.image_pad * (next(images).pixel_values.shape[0] // merge)
            video = next(videos)
            t, h, w = video.grid_thw
            if per_frame:
                # The original (transformers 4.x) replaces the template's whole wrapper with one wrapped block
                # per frame group, each after its time; 5.x keeps the outer wrapper too (oracle.md §6).
                frame = self.vision_start + self.video_pad * (h * w // merge) + self.vision_end
                return "".join(f"<{stamp:.1f} seconds>" + frame for stamp in video.timestamps)
            pads = self.video_pad * (t * h * w // merge)
            return self.vision_start + pads + self.vision_end if found == wrapped_video else pads

        pattern = "|".join(re.escape(s) for s in (wrapped_video, self.image_pad, self.video_pad))
        return re.sub(pattern, expand, text)

    def _place(self, ids: list[int], items: list[VisionItem]) -> None:
        """Give each item the rows of its pad tokens, in order, checking the counts add up."""
        id_tensor = torch.tensor(ids, dtype=torch.long)
        for kind, token in (("image", self.links.image_token_id), ("video", self.links.video_token_id)):
            rows = torch.nonzero(id_tensor == token).flatten()
            offset = 0
            for item in (i for i in items if i.kind == kind):
                n = item.pixel_values.shape[0] // self.links.spatial_merge_size**2
                item.rows = rows[offset : offset + n]
                offset += n
            if offset != rows.numel():
                raise InputError(
                    f"the prompt holds {rows.numel()} {kind} pad tokens but its {kind}s need {offset}",
                    param="messages",
                )

    def _spans(self, item: VisionItem) -> list[VisionSpan]:
        merge = self.links.spatial_merge_size
        t, h, w = item.grid_thw
        grid = (t, h // merge, w // merge)
        if item.kind == "image":
            return [VisionSpan(int(item.rows[0]), grid)]
        if self.links.family == "qwen3_vl":  # each frame group is its own block, placed by its timestamp text
            per_group = grid[1] * grid[2]
            return [VisionSpan(int(item.rows[g * per_group]), (1, grid[1], grid[2])) for g in range(t)]
        if self.links.family == "qwen2_5_vl":
            return [VisionSpan(int(item.rows[0]), grid, item.seconds_per_group or 1.0, self.links.tokens_per_second)]
        return [VisionSpan(int(item.rows[0]), grid)]


def _remove(paths: list[str]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)
    paths.clear()


def _content_hash(kind: str, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(kind.encode())
    digest.update(repr(tuple(grid_thw)).encode())
    digest.update(pixel_values.contiguous().numpy().tobytes())
    return digest.digest()
