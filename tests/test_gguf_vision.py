"""Vision-language GGUFs: the language model's file plus llama.cpp's vision projector (`mmproj`) file, against
transformers on the tiny random checkpoints of test_vl_parity.py.

tests/gguf_files.py writes both files the way llama.cpp's converter does. That was checked by hand on
2026-12-06 against the converter of the llama.cpp vendored in llama-cpp-python 0.3.36's sdist, run on these
checkpoints (Qwen2-VL with 4 tower blocks: the converter cannot name the merger's `mm.2` in a shallower tower;
Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE; the projector of Qwen3.5, whose language side it refuses without MTP
layers). Tensor names, types and values were identical, and so was the metadata but for general.type and
general.quantization_version. The converter's own F32 files gave transformers' logits through our loader
within 5.4e-06, on the kernels and on the float32 path.
"""

from __future__ import annotations

import contextlib
import shutil

import gguf
import pytest
import torch
from gguf_files import write_gguf, write_mmproj
from test_vl_parity import (
    TOLERANCE,
    image_video_text,
    make_video,
    one_image,
    one_video,
    reference_logits,
    reference_positions,
    two_images,
)
from vl_models import build_vl

from qwen_engine import LLM, SamplingParams
from qwen_engine.errors import InputError, ModelLoadError
from qwen_engine.text.vl_template import VL_TEMPLATES

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
Q = gguf.GGMLQuantizationType
OPTIONS = dict(progress=False, max_model_len=4096, kv_cache_memory=64 << 20)


def tower_family(family: str) -> str:
    return "qwen3_vl" if family.startswith("qwen3") else family


def norms(family: str) -> dict:
    qwen2 = family.startswith("qwen2")
    return dict(image_mean=CLIP_MEAN if qwen2 else (0.5,) * 3, image_std=CLIP_STD if qwen2 else (0.5,) * 3)


@pytest.fixture(scope="module", params=FAMILIES)
def files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, qwen3_tokenizer_dir):
    """(family, reference, folder of files): text.gguf (F32) with the family's chat template, quant.gguf (the block
    types of gguf_files.TYPES) with the Qwen3 text template, mmproj-f32.gguf and mmproj-f16.gguf."""
    family = request.param
    folder = tmp_path_factory.mktemp(f"gguf-{family}")
    ref = build_vl(family, folder / "hf", qwen3_tokenizer_dir, hub_config=family not in ("qwen2_vl", "qwen3_5"))
    write_gguf(ref, qwen3_tokenizer_dir, folder / "text.gguf", types={}, chat_template=VL_TEMPLATES[tower_family(family)])
    write_gguf(ref, qwen3_tokenizer_dir, folder / "quant.gguf")
    write_mmproj(ref, folder / "mmproj-f32.gguf", **norms(family))
    write_mmproj(ref, folder / "mmproj-f16.gguf", Q.F16, **norms(family))
    return family, ref, folder


@pytest.fixture(scope="module")
def video_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


@pytest.fixture(scope="module")
def llm(files):
    family, ref, folder = files
    return LLM(folder / "text.gguf", mmproj=folder / "mmproj-f32.gguf", **OPTIONS)


@pytest.mark.parametrize("messages", [one_image, two_images], ids=["one_image", "two_images"])
def test_image_logits_match_transformers(files, llm, messages) -> None:
    family, ref, _ = files
    assert llm.config.vision.family == tower_family(family)
    prompt = llm.encode_chat(messages(), add_generation_prompt=True)
    positions, delta = reference_positions(ref, prompt)
    assert torch.equal(prompt.positions, positions) and prompt.rope_delta == delta
    ours, theirs = llm.logits(prompt), reference_logits(ref, prompt)
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOLERANCE, f"{family}: max |Δlogit| {diff:.2e}"
    assert theirs.abs().max() > 1.0


@pytest.mark.parametrize("messages", [one_video, image_video_text], ids=["one_video", "image_video_text"])
def test_video_logits_match_transformers(files, llm, video_file, messages) -> None:
    """Video positions follow the original rule (checked in test_vl_parity.py); here the projector file must give
    the same tower and the same temporal spacing (Qwen2.5-VL: 2 positions a second, not stored in the file)."""
    family, ref, _ = files
    prompt = llm.encode_chat(messages(video_file), add_generation_prompt=True)
    folder_llm = LLM(files[2] / "hf", **OPTIONS)
    assert torch.equal(prompt.positions, folder_llm.encode_chat(messages(video_file)).positions)
    diff = (llm.logits(prompt) - reference_logits(ref, prompt)).abs().max().item()
    assert diff <= TOLERANCE, f"{family}: max |Δlogit| {diff:.2e}"


@contextlib.contextmanager
def tower_in_float16(ref, position_table: bool = False, dtype: torch.dtype = torch.float16):
    """The reference with its tower's matrices (and `position_table`) rounded to `dtype`, as a file stores them."""
    saved = {name: param.detach().clone() for name, param in ref.named_parameters()}
    try:
        with torch.no_grad():
            for name, param in ref.named_parameters():
                if name.startswith("model.visual.") and param.dim() > 1 and (position_table or "pos_embed" not in name):
                    param.copy_(param.to(dtype).float())
        yield ref
    finally:
        with torch.no_grad():
            for name, param in ref.named_parameters():
                param.copy_(saved[name])


def test_f16_projector_matches_transformers_with_f16_tower(files) -> None:
    """An mmproj-F16 file (the common one): the tower computes in float32 from the file's float16 values, so it
    must match the reference whose tower weights are rounded to float16 the same way."""
    family, ref, folder = files
    llm = LLM(folder / "text.gguf", mmproj=folder / "mmproj-f16.gguf", **OPTIONS)
    prompt = llm.encode_chat(one_image(), add_generation_prompt=True)
    with tower_in_float16(ref):
        diff = (llm.logits(prompt) - reference_logits(ref, prompt)).abs().max().item()
    assert diff <= TOLERANCE, f"{family}: max |Δlogit| {diff:.2e}"


@pytest.mark.parametrize("files", ["qwen2_5_vl", "qwen3_vl"], indirect=True)
def test_bf16_projector_keeps_its_linear_layers_in_bf16(files, tmp_path) -> None:
    """An mmproj-BF16 file: the tower's linear layers keep the file's bfloat16 weights for the kernels (half the
    memory), with the numbers of the reference whose tower is rounded to bfloat16."""
    from qwen_engine.models.quant import QuantLinear

    family, ref, folder = files
    write_mmproj(ref, tmp_path / "mmproj-bf16.gguf", Q.BF16, **norms(family))
    llm = LLM(folder / "text.gguf", mmproj=tmp_path / "mmproj-bf16.gguf", **OPTIONS)
    kept = [m for m in llm.model.visual.modules() if isinstance(m, QuantLinear)]
    linears = [m for m in llm.model.visual.modules() if isinstance(m, torch.nn.Linear)]
    if kernels_native():
        assert kept and not linears
    prompt = llm.encode_chat(two_images(), add_generation_prompt=True)
    with tower_in_float16(ref, dtype=torch.bfloat16):
        diff = (llm.logits(prompt) - reference_logits(ref, prompt)).abs().max().item()
    assert diff <= TOLERANCE, f"{family}: max |Δlogit| {diff:.2e}"


def kernels_native() -> bool:
    from qwen_engine import kernels

    return kernels.native() is not None


@pytest.mark.parametrize("files", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"], indirect=True)
def test_ollama_published_layout(files, qwen3_tokenizer_dir, tmp_path, monkeypatch) -> None:
    """ollama's published vision models are one file with the tower inside, under ollama's own names and
    metadata (gguf_files.write_gguf(ollama=True), written from ollama's translation layer for llama.cpp, as no
    published file could be had here); Qwen3.5's also with a per-layer head_count_kv, `ssm_dt` and `mtp.*`."""
    from model_stores import make_ollama_model

    family, ref, folder = files
    write_gguf(ref, qwen3_tokenizer_dir, tmp_path / "model.gguf", types={}, ollama=True,
               chat_template=VL_TEMPLATES[tower_family(family)])
    make_ollama_model(tmp_path / "ollama", "tiny-vl", gguf=tmp_path / "model.gguf", family="qwen25vl")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("QWEN_ENGINE_HOME", str(tmp_path / "home"))
    llm = LLM("ollama:tiny-vl", **OPTIONS)
    assert llm.config.vision.family == tower_family(family)
    for messages in (one_image, two_images):
        prompt = llm.encode_chat(messages(), add_generation_prompt=True)
        with tower_in_float16(ref, position_table=True):
            diff = (llm.logits(prompt) - reference_logits(ref, prompt)).abs().max().item()
        assert diff <= TOLERANCE, f"{family}: max |Δlogit| {diff:.2e}"

    from qwen_engine.weights.catalog import ollama_entries

    (entry,) = [e for e in ollama_entries() if e.name == "ollama:tiny-vl:latest"]
    assert entry.runs == "vision"


def test_quantised_language_model_with_image_on_kernels(files) -> None:
    """Quantised language-model blocks on the native kernels, with an image: the same logits as the same files
    dequantised to float32 by the gguf package. Its text template prints no image placeholders, so the family's
    vision template is used instead."""
    family, _, folder = files
    fast = LLM(folder / "quant.gguf", mmproj=folder / "mmproj-f16.gguf", **OPTIONS)
    slow = LLM(folder / "quant.gguf", mmproj=folder / "mmproj-f16.gguf", quantized=False, **OPTIONS)
    prompt = fast.encode_chat(two_images(), add_generation_prompt=True)
    assert prompt.token_ids == slow.encode_chat(two_images(), add_generation_prompt=True).token_ids
    diff = (fast.logits(prompt) - slow.logits(prompt)).abs().max().item()
    assert diff <= TOLERANCE, f"{family}: max |Δlogit| {diff:.2e}"


@pytest.mark.parametrize("files", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"], indirect=True)
def test_greedy_with_image_matches_transformers(files, llm) -> None:
    family, ref, _ = files
    messages = one_image()
    prompt = llm.encode_chat(messages)
    # (A GGUF brings the family's published defaults, Qwen2.5's repetition_penalty 1.05 among them: turned off.)
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.0))
    ids, expected = list(prompt.token_ids), []
    for _ in range(8):
        tail = (torch.arange(prompt.positions.shape[1], len(ids)) + prompt.rope_delta).expand(3, -1)
        step = type(prompt)(ids, prompt.items, torch.cat([prompt.positions, tail], dim=1), prompt.rope_delta)
        expected.append(int(reference_logits(ref, step)[-1].argmax()))
        ids.append(expected[-1])
    assert out.token_ids == expected


def test_projector_settings_come_from_the_file(files, llm) -> None:
    family, _, _ = files
    config = llm.vision.image_config
    assert config.image_mean == pytest.approx(norms(family)["image_mean"], abs=1e-7)
    assert config.patch_size == (16 if family.startswith("qwen3") else 14)
    if family.startswith("qwen2"):  # the released preprocessor configs' bounds, which the file does not hold
        assert (config.min_pixels, config.max_pixels) == (3136, 12845056)


@pytest.mark.parametrize("files", ["qwen2_5_vl"], indirect=True)
def test_projector_beside_the_model_is_found(files, tmp_path) -> None:
    family, _, folder = files
    shutil.copy(folder / "text.gguf", tmp_path / "model-F32.gguf")
    shutil.copy(folder / "mmproj-f16.gguf", tmp_path / "mmproj-model-F16.gguf")
    found = LLM(tmp_path / "model-F32.gguf", **OPTIONS)
    explicit = LLM(folder / "text.gguf", mmproj=folder / "mmproj-f16.gguf", **OPTIONS)
    prompt = found.encode_chat(one_image())
    assert torch.equal(found.logits(prompt), explicit.logits(prompt))
    # Two projectors: which one is the model's is not guessed; the model runs on text alone.
    shutil.copy(folder / "mmproj-f32.gguf", tmp_path / "mmproj-model-F32.gguf")
    text_only = LLM(tmp_path / "model-F32.gguf", **OPTIONS)
    assert text_only.config.vision is None
    with pytest.raises(InputError, match="text only"):
        text_only.chat(one_image())
    assert text_only.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2)).token_ids


@pytest.mark.parametrize("files", ["qwen3_vl"], indirect=True)
def test_projector_that_does_not_pair_is_refused(files, tmp_path, qwen3_tokenizer_dir) -> None:
    family, _, folder = files
    other = build_vl("qwen2_5_vl", tmp_path / "other", qwen3_tokenizer_dir)
    write_mmproj(other, tmp_path / "mmproj-qwen2_5_vl.gguf")
    with pytest.raises(ModelLoadError, match="does not pair"):
        LLM(folder / "text.gguf", mmproj=tmp_path / "mmproj-qwen2_5_vl.gguf", **OPTIONS)
    # Found beside the file rather than named: not the model's, so it runs on text alone.
    shutil.copy(folder / "text.gguf", tmp_path / "model.gguf")
    assert LLM(tmp_path / "model.gguf", **OPTIONS).config.vision is None
    with pytest.raises(ModelLoadError, match="not a vision projector"):
        LLM(folder / "text.gguf", mmproj=folder / "quant.gguf", **OPTIONS)
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(folder / "text.gguf", mmproj=tmp_path / "missing.gguf", **OPTIONS)
    with pytest.raises(InputError, match="model folder"):
        LLM(folder / "hf", mmproj=folder / "mmproj-f32.gguf", **OPTIONS)


def test_text_architecture_refuses_a_projector(tmp_path, qwen3_tokenizer_dir) -> None:
    from tiny_models import build_tiny

    text = build_tiny("qwen3", tmp_path / "text", tokenizer_dir=qwen3_tokenizer_dir)
    write_gguf(text, qwen3_tokenizer_dir, tmp_path / "qwen3.gguf", types={})
    vl = build_vl("qwen3_vl", tmp_path / "vl", qwen3_tokenizer_dir)
    write_mmproj(vl, tmp_path / "mmproj.gguf")
    with pytest.raises(ModelLoadError, match="takes no vision tower"):
        LLM(tmp_path / "qwen3.gguf", mmproj=tmp_path / "mmproj.gguf", **OPTIONS)


@pytest.mark.parametrize("files", ["qwen3_vl"], indirect=True)
def test_ollama_model_with_a_projector_layer(files, tmp_path, monkeypatch) -> None:
    """A model pulled into ollama from a llama.cpp GGUF repository keeps its mmproj file as a projector layer."""
    from model_stores import make_ollama_model

    family, _, folder = files
    root = tmp_path / "ollama"
    make_ollama_model(root, "tiny-qwen3-vl", gguf=folder / "quant.gguf", projector=folder / "mmproj-f16.gguf",
                      family="qwen3vl")
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    monkeypatch.setenv("QWEN_ENGINE_HOME", str(tmp_path / "home"))
    assert_same_as_naming_the_files(LLM("ollama:tiny-qwen3-vl", **OPTIONS), folder)

    from qwen_engine.weights.catalog import ollama_entries

    (entry,) = [e for e in ollama_entries() if e.name == "ollama:tiny-qwen3-vl:latest"]
    assert entry.runs == "vision"


def assert_same_as_naming_the_files(llm: LLM, folder) -> None:
    """`llm` found the quantised model and its F16 projector on its own: the logits of naming both."""
    direct = LLM(folder / "quant.gguf", mmproj=folder / "mmproj-f16.gguf", **OPTIONS)
    prompt = direct.encode_chat(one_image())
    assert torch.equal(llm.logits(prompt), direct.logits(prompt))


@pytest.mark.parametrize("files", ["qwen3_vl"], indirect=True)
def test_gguf_repository_in_the_hugging_face_cache(files, tmp_path, monkeypatch) -> None:
    """A snapshot of a llama.cpp GGUF repository holds the model and its mmproj file: the name loads both."""
    from model_stores import make_hf_repo

    _, _, folder = files
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(folder / "quant.gguf", repo / "Tiny-VL-Q8_0.gguf")
    shutil.copy(folder / "mmproj-f16.gguf", repo / "mmproj-Tiny-VL-F16.gguf")
    make_hf_repo(tmp_path / "hf", "Qwen/Tiny-VL-GGUF", repo)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert_same_as_naming_the_files(LLM("Qwen/Tiny-VL-GGUF", **OPTIONS), folder)

    from qwen_engine.weights.catalog import hf_entries

    (entry,) = [e for e in hf_entries() if e.name == "Qwen/Tiny-VL-GGUF"]
    assert (entry.runs, entry.family) == ("vision", "qwen3vl")


@pytest.mark.parametrize("files", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"], indirect=True)
def test_a8_language_model_with_image(files) -> None:
    """quantization="a8" converts the language model's products whose blocks have an exact int8 form (o, gate/up
    in the test writer's mix; Qwen3.5's linear-attention ones too) and leaves the tower alone: with two images, the
    next-token distributions stay within int8 activations' rounding of the default path's."""
    from qwen_engine.models.a8 import A8Linear

    family, _, folder = files
    exact = LLM(folder / "quant.gguf", mmproj=folder / "mmproj-f16.gguf", **OPTIONS)
    lossy = LLM(folder / "quant.gguf", mmproj=folder / "mmproj-f16.gguf", quantization="a8", **OPTIONS)
    assert any(isinstance(m, A8Linear) for m in lossy.model.model.modules())
    assert not any(isinstance(m, A8Linear) for m in lossy.model.visual.modules())
    prompt = exact.encode_chat(two_images(), add_generation_prompt=True)
    p = torch.log_softmax(exact.logits(prompt), -1)
    q = torch.log_softmax(lossy.logits(lossy.encode_chat(two_images(), add_generation_prompt=True)), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    print(f"{family} a8 with two images: mean KL {kl:.2e}")
    assert 0 < kl < 5e-3
