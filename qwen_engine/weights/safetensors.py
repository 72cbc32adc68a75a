"""Reading Hugging Face safetensors checkpoints, single-file or sharded, one tensor at a time."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import ModelLoadError


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no model.safetensors, index or *.safetensors file found")
    return files


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint; only one tensor is materialised at a time."""
    from safetensors import safe_open

    for path in checkpoint_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{path}: cannot read safetensors file ({e})") from None


def count_parameters(files: list[Path]) -> int:
    """The number of values in the checkpoint, from the files' JSON headers alone (no tensor is read)."""
    total = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error) as e:
            raise ModelLoadError(f"{path}: cannot read safetensors header ({e})") from None
        for name, info in header.items():
            if name != "__metadata__":
                total += math.prod(info.get("shape", []))
    return total
