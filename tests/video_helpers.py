"""Helpers for the video tests: synthetic videos written with PyAV, and the torchvision import shim.

The torchvision shim. transformers' video processors need torchvision. The PyPI torchvision 0.28.0 wheel
is a CUDA build whose ``_C.so`` does not load beside the CPU torch, and ``import torchvision`` then fails
in ``_meta_registrations.py`` because the ``torchvision::nms`` operator does not exist. Defining the
``nms`` / ``qnms`` schemas first lets the import succeed; everything transformers uses from torchvision
(``transforms.v2.functional``) is plain torch. Note that once torchvision is installed, transformers
imports it from ``image_utils`` too, so the shim must run before the first transformers import of the
whole test session (tests/conftest.py), not only in the video tests.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

_SHIM_LIBRARY = None  # keeps the torch.library.Library (and so the definitions) alive


def define_torchvision_ops() -> None:
    """Let ``import torchvision`` work with the CUDA wheel next to CPU torch (see the module docstring).
    Does nothing when torchvision is absent, already imported, or its operators already exist."""
    global _SHIM_LIBRARY
    if _SHIM_LIBRARY is not None or "torchvision" in sys.modules:
        return
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018  (a working torchvision build or an earlier shim)
        return
    except (AttributeError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SHIM_LIBRARY = library


def moving_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(count, height, width, 3) uint8 frames: a colour gradient, noise, and a bright square and a dark
    bar that move, so consecutive frames differ and hard edges exercise the resampler."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for index in range(count):
        frame = np.stack(
            [
                (xs * 255 // max(width - 1, 1) + index * 7) % 256,
                (ys * 255 // max(height - 1, 1)) % 256,
                np.full_like(xs, (index * 29) % 256),
            ],
            axis=-1,
        ).astype(np.int16)
        frame += rng.integers(-12, 13, size=frame.shape, dtype=np.int16)
        side = max(2, min(height, width) // 3)
        top = (index * 3) % max(height - side, 1)
        left = (index * 5) % max(width - side, 1)
        frame[top : top + side, left : left + side] = (250, 240, 10)
        bar = (index * 2) % max(width - 2, 1)
        frame[:, bar : bar + 2] = (5, 5, 60)
        frames[index] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def write_video(
    path: Path,
    frames: np.ndarray,
    fps: int = 8,
    codec: str = "libx264",
    pix_fmt: str | None = None,
    container_format: str | None = None,
) -> Path:
    """Encode (n, h, w, 3) uint8 RGB frames. The pixel format defaults to yuv420p when both sides are
    even and yuv444p otherwise (4:2:0 needs even sides); ffv1 defaults to bgr0 (lossless RGB)."""
    import av

    height, width = frames.shape[1:3]
    if pix_fmt is None:
        if codec == "ffv1":
            pix_fmt = "bgr0"
        else:
            pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18", "g": "6"}  # small GOP: several keyframes
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_empty_video(path: Path, container_format: str = "matroska") -> Path:
    """A container with a video stream and no frame in it."""
    import av

    container = av.open(str(path), "w", format=container_format)
    stream = container.add_stream("ffv1", rate=8)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "bgr0"
    container.start_encoding()
    container.close()
    return path


def write_undecodable_video(path: Path, packets: int = 10) -> Path:
    """A valid Matroska file with an FFV1 stream whose packets are random bytes: the header reads, no
    frame decodes."""
    import av

    rng = np.random.default_rng(1)
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "bgr0"
        container.start_encoding()
        for index in range(packets):
            packet = av.Packet(rng.integers(0, 256, size=200, dtype=np.uint8).tobytes())
            packet.stream = stream
            packet.pts = packet.dts = index
            container.mux(packet)
    return path
