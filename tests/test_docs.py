"""Every ```python block of docs/usage.md runs, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "usage.md"


def test_usage_examples_run(demo_gguf, demo_llm, monkeypatch):
    import qwen_engine

    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 6
    # LLM() in the docs loads the demo model; hand it the one the session already loaded.
    monkeypatch.setattr(qwen_engine, "LLM", lambda *a, **k: demo_llm)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)


def test_vision_examples_run(tmp_path, monkeypatch, qwen3_tokenizer_dir):
    """docs/vision.md's python blocks, on a tiny random Qwen2.5-VL standing in for the real checkpoint."""
    from test_vl_parity import make_video, picture
    from vl_models import build_vl

    import qwen_engine

    doc = DOC.parent / "vision.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 4
    folder = tmp_path / "model"
    build_vl("qwen2_5_vl", folder, qwen3_tokenizer_dir)
    llm = qwen_engine.LLM(folder, progress=False, kv_cache_memory=16 << 20)
    monkeypatch.setattr(qwen_engine, "LLM", lambda *a, **k: llm)
    monkeypatch.chdir(tmp_path)
    picture(320, 240, 0).save("photo.jpg")
    make_video(tmp_path / "clip.mp4")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)
    assert namespace["out"].usage.prompt_tokens == len(namespace["prompt"].token_ids)
