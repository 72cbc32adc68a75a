"""The w8a8 layers of a model kept on disk, so that only its first load in the lossy mode pays for converting.

Converting the demo model to int8 takes a few seconds and, while it runs, holds the GGUF's bytes in memory
next to their int8 copy. The converted layers are written once, as a safetensors file under the cache folder
(QWEN_ENGINE_HOME, `w8a8/`), and later loads take them from that file, never reading the GGUF's own copies of
those weights: read whole into huge pages where the kernel has free ones (as the default path's re-laid weights,
weights/arena.py), else mapped, a page read when a product first touches it. The file's name follows
from the source's path, sizes and modification times and from the weight layout the kernels want, so a changed
model or another CPU makes a new file (the stale one of the same source is removed). QWEN_ENGINE_W8A8_CACHE=0
turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from .arena import WeightArena, huge_pages_wanted
from .demo import cache_home

FORMAT = "qwen-engine-w8a8/2"  # bump when the layers' numbers or layout change (2: weight scales per group)
DTYPES = {"U8": torch.uint8, "F32": torch.float32}


def store_path(source: Path, layout: str, mode: str = "w8a8") -> Path | None:
    """Where the converted layers of `source` (a file, or a folder of files) live, or None if turned off.
    `layout`: everything else they depend on (models/w8a8.py: store_kind). Each mode (w8a8, a8) has a folder of
    its own, so that one never removes the other's file as stale."""
    if os.environ.get("QWEN_ENGINE_W8A8_CACHE", "1") == "0":
        return None
    source = source.resolve()
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    stamp = [FORMAT, layout] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    where = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    what = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    return cache_home() / mode / f"{where}-{what}.safetensors"


ALIGN = 64  # a cache line: the kernels' 64-byte loads of a weight must not straddle two


def _save_aligned(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file in which every tensor whose predecessors are whole cache lines starts on one: the data
    begins at a multiple of ALIGN (the header padded with spaces, as the format allows) and tensors of whole
    lines (every int8 weight) come first. safetensors' own save_file orders float32 before uint8 and pads the
    header to 8 bytes only: the demo's int8 weights all began 8 bytes into a line, and the units kernel ran
    8-13 % slower on them at 1-32 rows of x."""
    order = sorted(tensors, key=lambda name: (tensors[name].numel() * tensors[name].element_size() % ALIGN != 0, name))
    header: dict = {"__metadata__": {"format": FORMAT}}
    offset = 0
    names = {dtype: name for name, dtype in DTYPES.items()}
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            f.write(memoryview(tensors[name].contiguous().numpy()).cast("B"))


def write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically (a reader never sees half a file) and remove older files of the same source. A failure
    (a full or read-only disk) only costs the next load its speed, so it is a warning."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_aligned(tensors, tmp)
        os.replace(tmp, path)
        source = path.name.split("-")[0]
        for stale in path.parent.glob(f"{source}-*.safetensors"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as e:  # a full or read-only disk: never a reason to fail a load
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        warnings.warn(f"could not keep the w8a8 layers in {path.parent} ({e}); the next load converts again",
                      stacklevel=2)


def read(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a file that `write` made, as views of a private mapping of it (nothing is read yet), or
    None if it is missing, of another format, or cut short."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length)) if 8 + length <= size else None
    except (OSError, ValueError, struct.error):
        return None
    data = 8 + length
    try:
        if header.pop("__metadata__")["format"] != FORMAT or any(
                info["dtype"] not in DTYPES or data + info["data_offsets"][1] > size for info in header.values()):
            return None
    except (AttributeError, KeyError, TypeError, IndexError):  # not a header `write` made
        return None
    if huge_pages_wanted(size - data):
        held = _read_into_arena(path, data, size - data)
        if held is None:
            return None
    else:  # copy-on-write: the tensors may be written, the file not
        held = torch.frombuffer(np.memmap(path, dtype=np.uint8, mode="c"), dtype=torch.uint8)[data:]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        tensors[name] = held[start:end].view(DTYPES[info["dtype"]]).view(info["shape"])
    return tensors


def _read_into_arena(path: Path, offset: int, nbytes: int) -> torch.Tensor | None:
    """Bytes offset.. of the file read whole into a huge-page arena (weights/arena.py): a8's decode steps ran 4-5 %
    faster at one stream and 8-14 % at 16-32 than from the mapping's 4 KiB pages, for 0.2-0.5 s more at load
    (docs/benchmarks.md, thirty-sixth pass). The offsets keep their alignment (the arena starts on a 2 MiB
    boundary). None if the file is shorter than the header said."""
    held = WeightArena(nbytes, huge_pages=True).take((nbytes,))
    view = memoryview(held.numpy())
    done = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                return None
            done += n
    return held
