"""Small random Qwen2 and Qwen3 checkpoints, built and saved by transformers, against transformers itself.

Covers both architectures, the safetensors loader (single file and sharded with an index), both config
dialects (`rope_parameters` and `rope_theta`/`rope_scaling`), YaRN rope scaling, and the KV cache
(prefill in pieces + token-by-token decode gives the same logits as one full forward).
Measured max|Δlogit| ≈ 4e-6 with |logit| ≈ 4; tolerance 1e-4 (oracle.md §9d).
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build_tiny, engine_greedy, reference_greedy

from qwen_engine import LLM, SamplingParams
from qwen_engine.errors import InputError, ModelLoadError

TOLERANCE = 1e-4
CASES = [
    # arch, yarn, legacy config spelling, sharded
    ("qwen2", False, False, False),
    ("qwen2", True, True, True),
    ("qwen3", False, True, False),
    ("qwen3", True, False, True),
]


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 151_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(str(x) for x in c))
def pair(request, tmp_path_factory, qwen3_tokenizer_dir):
    arch, yarn, legacy, shard = request.param
    folder = tmp_path_factory.mktemp(f"tiny-{arch}")
    ref = build_tiny(arch, folder, tokenizer_dir=qwen3_tokenizer_dir, yarn=yarn, legacy_config=legacy, shard=shard)
    assert (folder / "model.safetensors.index.json").is_file() == shard
    config = json.loads((folder / "config.json").read_text())
    assert ("rope_parameters" in config) != legacy
    return ref, LLM(folder), request.param


def test_logits_every_position(pair):
    ref, llm, _ = pair
    ids = _ids(96)  # longer than YaRN's original 32 positions, so the scaled frequencies matter
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    ours = llm.logits(ids)
    diff = (ours - expected).abs().max().item()
    assert diff <= TOLERANCE, f"max|Δlogit| = {diff:.3g}"


def test_greedy_generation_matches_reference(pair):
    ref, llm, _ = pair
    prompt = _ids(20, seed=2)
    assert engine_greedy(llm, prompt, 24) == reference_greedy(ref, prompt, 24)


def test_config_features_are_read(pair):
    _, llm, (arch, yarn, _, _) = pair
    cfg = llm.config
    assert cfg.architecture == arch
    assert cfg.qk_norm == (arch == "qwen3") and cfg.attention_bias == (arch == "qwen2")
    assert cfg.rope.kind == ("yarn" if yarn else "default")
    assert cfg.tie_word_embeddings == (arch == "qwen2")


def test_yarn_changes_the_numbers(tmp_path, qwen3_tokenizer_dir):
    # Guard against a YaRN path that silently does nothing: same weights, plain rope, different logits.
    build_tiny("qwen3", tmp_path / "a", tokenizer_dir=qwen3_tokenizer_dir, yarn=True)
    build_tiny("qwen3", tmp_path / "b", tokenizer_dir=qwen3_tokenizer_dir, yarn=False)
    ids = _ids(96)
    assert (LLM(tmp_path / "a").logits(ids) - LLM(tmp_path / "b").logits(ids)).abs().max() > 1e-2


def test_missing_shard_and_missing_tensor(tmp_path, qwen3_tokenizer_dir):
    folder = tmp_path / "m"
    build_tiny("qwen3", folder, tokenizer_dir=qwen3_tokenizer_dir, shard=True)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        LLM(folder)


def test_generation_config_is_honoured(tmp_path, qwen3_tokenizer_dir):
    folder = tmp_path / "g"
    build_tiny("qwen2", folder, tokenizer_dir=qwen3_tokenizer_dir)
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.3, "top_p": 0.7, "top_k": 5, "repetition_penalty": 1.2,
                    "eos_token_id": [151645, 151643, 42]})
    )
    llm = LLM(folder)
    resolved = SamplingParams(top_k=9).with_defaults(llm.default_params)
    assert (resolved.temperature, resolved.top_p, resolved.top_k, resolved.repetition_penalty) == (0.3, 0.7, 9, 1.2)
    assert set(llm.eos_token_ids) == {151645, 151643, 42}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes_load_and_run(tmp_path, qwen3_tokenizer_dir, dtype):
    folder = tmp_path / dtype
    ref = build_tiny("qwen3", folder, tokenizer_dir=qwen3_tokenizer_dir)
    llm = LLM(folder, dtype=dtype)
    assert next(llm.model.parameters()).dtype == getattr(torch, dtype)
    ids = _ids(32)
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    # Half precision rounds every weight and activation: close to the fp32 reference, not equal to it.
    diff = (llm.logits(ids) - expected).abs().max().item()
    assert diff < 0.25, diff


@pytest.fixture
def rounded_reference_cache(monkeypatch):
    """Makes transformers' KV cache store keys and values rounded to a dtype (and read them back as float32):
    the reference for kv_cache_dtype. Its attention uses what the cache returns, the new tokens included, as
    ours reads them back from the pool."""
    from transformers.cache_utils import DynamicLayer

    original = DynamicLayer.update

    def use(dtype: torch.dtype) -> None:
        def update(self, key_states, value_states, *args, **kwargs):
            rounded = (key_states.to(dtype).float(), value_states.to(dtype).float())
            return original(self, *rounded, *args, **kwargs)

        monkeypatch.setattr(DynamicLayer, "update", update)

    return use


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_half_kv_cache_equals_reference_with_a_rounded_cache(tmp_path, qwen3_tokenizer_dir, rounded_reference_cache,
                                                             kv_dtype):
    # qwen2: its k/v biases make larger keys than qwen3's normed ones.
    ref = build_tiny("qwen2", tmp_path / "m", tokenizer_dir=qwen3_tokenizer_dir, seed=4)
    exact, llm = LLM(tmp_path / "m"), LLM(tmp_path / "m", kv_cache_dtype=kv_dtype)
    assert llm.engine.cache.k.dtype == getattr(torch, kv_dtype)
    # Half the bytes a token: twice the tokens in the same memory.
    assert llm.engine.capacity_tokens == 2 * exact.engine.capacity_tokens
    ids, prompt = _ids(96), _ids(20, seed=2)
    with torch.inference_mode():
        plain = ref(torch.tensor([ids])).logits[0]
    plain_greedy = reference_greedy(ref, prompt, 24)
    rounded_reference_cache(getattr(torch, kv_dtype))
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    ours = llm.logits(ids)
    diff = (ours - expected).abs().max().item()
    assert diff <= TOLERANCE, f"max|Δlogit| = {diff:.3g}"
    # The rounding is real (so this test would fail if the option did nothing): far beyond the tolerance.
    moved = (ours - plain).abs().max().item()
    assert moved > 10 * TOLERANCE, moved
    # The engine's paged cache (native prefill and decode kernels on the CPU) against transformers' generate. (A
    # bfloat16 pool's decode products are bf16 where the CPU has AVX512-BF16; the tokens agree all the same here.)
    assert engine_greedy(llm, prompt, 24) == reference_greedy(ref, prompt, 24)
    assert engine_greedy(exact, prompt, 24) == plain_greedy


def test_kv_cache_dtype_is_checked(tmp_path, qwen3_tokenizer_dir):
    with pytest.raises(InputError, match="kv_cache_dtype"):
        LLM(tmp_path / "never-loaded", kv_cache_dtype="int4")
