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
