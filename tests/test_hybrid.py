"""Qwen3.5 (hybrid: gated DeltaNet + gated softmax attention), Qwen3.5-MoE and Qwen3-Next against transformers.

The tiny models (tests/tiny_models.py) alternate linear-attention and softmax-attention layers, with key and
value heads of different counts and widths, a quarter of each attention head rotated, and zero-centred norms
drawn away from zero, so each of Qwen3.5's departures from Qwen3 moves the logits if it is got wrong.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tiny_models import build_tiny, engine_greedy, reference_greedy
from vl_models import IDS

from qwen_engine import LLM, SamplingParams
from qwen_engine.config import ModelConfig
from qwen_engine.engine.engine import EngineConfig
from qwen_engine.models import gated_deltanet
from qwen_engine.models.gated_deltanet import chunked_delta_rule, recurrent_delta_rule

TOLERANCE = 1e-4  # oracle.md §9d, for tiny fixtures in float32


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 151_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory, qwen3_tokenizer_dir):
    folder = tmp_path_factory.mktemp("qwen3_5")
    ref = build_tiny("qwen3_5", folder, tokenizer_dir=qwen3_tokenizer_dir)
    return folder, ref


def _max_diff(llm: LLM, ref: torch.nn.Module, ids: list[int], chunk: int = 1024) -> float:
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    got = llm.engine.logits(ids, chunk=chunk)
    diff = (got - expected).abs().max().item()
    print(f"max|Δlogit| = {diff:.2e} (max|logit| {expected.abs().max():.2f})")
    return diff


def test_config_reads_the_hybrid_layout(qwen3_5):
    folder, _ = qwen3_5
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    assert cfg.architecture == "qwen3_5" and cfg.family == "qwen3_5"
    assert cfg.linear_attention.layers == {0, 2} and cfg.attention_layers == [1, 3]
    assert (cfg.linear_attention.num_key_heads, cfg.linear_attention.num_value_heads) == (2, 4)
    assert cfg.linear_attention.conv_channels == 2 * 2 * 16 + 4 * 24
    assert cfg.rotary_dim == 8 and cfg.attention_output_gate and cfg.zero_centered_norm
    # Older configs give only the period of the full-attention layers.
    raw = json.loads((folder / "config.json").read_text())
    del raw["layer_types"]
    raw["full_attention_interval"] = 2
    assert ModelConfig.from_hf(raw).linear_attention.layers == {0, 2}


@pytest.mark.parametrize("chunk", [1024, 37, 1])
def test_logits_match_transformers(qwen3_5, chunk):
    """One call (prefill chunks of 64 inside the delta rule), chunks of 37 (the state carried between calls,
    as chunked prefill does) and one token at a time (the recurrent form only)."""
    folder, ref = qwen3_5
    llm = LLM(str(folder))
    ids = _ids(150 if chunk > 1 else 40, seed=1)
    assert _max_diff(llm, ref, ids, chunk) <= TOLERANCE


def test_greedy_tokens_match_generate_in_a_batch(qwen3_5):
    """Two prompts of different lengths decode together through the engine: a step mixes one sequence's prefill
    run with the other's single-token update, each reading its own state slot."""
    folder, ref = qwen3_5
    llm = LLM(str(folder))
    prompts = [_ids(23, seed=2), _ids(70, seed=3)]
    expected = [reference_greedy(ref, p, 16) for p in prompts]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, repetition_penalty=1.0)
    seqs = [llm.engine.add_request(p, params.with_defaults(llm.default_params)) for p in prompts]
    while llm.engine.has_work():
        llm.engine.step()
    assert [s.output_ids for s in seqs] == expected
    assert not llm.engine.states.owner, "finished sequences must give their state slots back"


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempted_sequences_restart_from_a_zeroed_state(qwen3_5, prefix_caching):
    """A KV cache too small for both sequences forces preemption: the preempted one is recomputed from token 0,
    and its state slot must start from zero again, or its tokens would differ (with prefix caching: from the
    state saved at its prompt's last block boundary, if its blocks are still cached)."""
    folder, ref = qwen3_5
    llm = LLM(str(folder))
    config = EngineConfig(max_model_len=256, kv_cache_memory=0, block_size=16, enable_prefix_caching=prefix_caching)
    per_block = 2 * 2 * 16 * 2 * 32 * 4  # 2 attention layers × block 16 × 2 kv heads × head_dim 32, k and v
    config.kv_cache_memory = 7 * per_block  # 112 slots: the two sequences need 60 + 60
    engine = type(llm.engine)(llm.model, llm.tokenizer, llm.engine.eos_token_ids, config)
    prompts = [_ids(30, seed=4), _ids(30, seed=5)]
    expected = [reference_greedy(ref, p, 30) for p in prompts]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, repetition_penalty=1.0)
    seqs = [engine.add_request(p, params.with_defaults(llm.default_params)) for p in prompts]
    while engine.has_work():
        engine.step()
    assert engine.scheduler.num_preemptions > 0
    assert [s.output_ids for s in seqs] == expected


def _greedy(llm: LLM, prompt: list[int], tokens: int):
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, repetition_penalty=1.0)
    seq = llm.engine.add_request(prompt, params.with_defaults(llm.default_params))
    while llm.engine.has_work():
        llm.engine.step()
    return seq


def test_repeated_prompt_resumes_from_the_saved_state(qwen3_5):
    """Prefix caching on a hybrid model: the first request saves the recurrent state at its prompt's last block
    boundary (40 tokens, blocks of 16: after token 32); the same prompt again takes the first 32 tokens' KV blocks
    from the cache, resumes from that state, and must give the reference's tokens."""
    folder, ref = qwen3_5
    llm = LLM(str(folder))
    prompt = _ids(40, seed=6)
    expected = reference_greedy(ref, prompt, 8)
    first = _greedy(llm, prompt, 8)
    assert first.num_cached_prompt == 0 and llm.engine.states.restored == 0
    second = _greedy(llm, prompt, 8)
    assert second.num_cached_prompt == 32 and llm.engine.states.restored == 1
    assert first.output_ids == second.output_ids == expected
    assert not llm.engine.states.owner


def test_next_turn_resumes_from_the_answer(qwen3_5):
    """A chat's next turn repeats the previous prompt and answer and adds to them: it resumes from the state saved
    at the newest block boundary the answer crossed (token 48 of 40 + 20), not only from the prompt's."""
    folder, ref = qwen3_5
    llm = LLM(str(folder))
    prompt = _ids(40, seed=7)
    first = _greedy(llm, prompt, 20)
    follow = prompt + first.output_ids + _ids(11, seed=8)
    second = _greedy(llm, follow, 6)
    assert second.num_cached_prompt == 48
    assert second.output_ids == reference_greedy(ref, follow, 6)


def test_state_snapshots_are_evicted_least_recently_used_first(qwen3_5):
    folder, ref = qwen3_5
    llm = LLM(str(folder))
    config = replace(llm.engine.config, state_snapshots=1)
    llm.engine = type(llm.engine)(llm.model, llm.tokenizer, llm.engine.eos_token_ids, config)
    a, b = _ids(40, seed=9), _ids(40, seed=10)
    _greedy(llm, a, 2)
    _greedy(llm, b, 2)  # takes the only snapshot
    again = _greedy(llm, a, 4)
    assert again.num_cached_prompt == 0  # its blocks are cached, but no state to resume from: computed again
    assert again.output_ids == reference_greedy(ref, a, 4)
    assert _greedy(llm, a, 2).num_cached_prompt == 32


def test_bfloat16_checkpoint(tmp_path, qwen3_tokenizer_dir):
    """Saved in bfloat16 as Qwen publishes it; the linear layers stay bfloat16 on the kernels."""
    ref = build_tiny("qwen3_5", tmp_path, tokenizer_dir=qwen3_tokenizer_dir, bfloat16=True, seed=7)
    llm = LLM(str(tmp_path))
    assert type(llm.model.model.layers[0].linear_attn.in_proj_qkv).__name__ == "QuantLinear", "bf16 kernels"
    assert _max_diff(llm, ref, _ids(90, seed=8)) <= TOLERANCE
    assert engine_greedy(llm, _ids(12, seed=9), 10) == reference_greedy(ref, _ids(12, seed=9), 10)


def test_mixture_of_experts(tmp_path, qwen3_tokenizer_dir):
    """Qwen3.5-MoE: every layer sparse (6 experts, top 2, always renormalised) plus a gated shared expert; the
    experts come fused in transformers 5's layout and are split at load."""
    ref = build_tiny("qwen3_5_moe", tmp_path, tokenizer_dir=qwen3_tokenizer_dir, seed=10)
    llm = LLM(str(tmp_path))
    assert llm.model.config.moe.norm_topk_prob and len(llm.model.config.moe.sparse_layers) == 4
    ids = _ids(60, seed=11)
    from test_moe import _smallest_router_margin

    assert _smallest_router_margin(llm, ids) > 1e-4, "router near-tie: the fixture cannot tell routing bugs"
    assert _max_diff(llm, ref, ids) <= TOLERANCE
    assert engine_greedy(llm, ids[:15], 10) == reference_greedy(ref, ids[:15], 10)


def test_qwen3_next(tmp_path, qwen3_tokenizer_dir):
    """Qwen3-Next: the same hybrid layers, but q/k/v/z and b/a stored fused and grouped by key head (regrouped at
    load), and a mixture of experts with a shared expert beside a dense layer 1."""
    ref = build_tiny("qwen3_next", tmp_path, tokenizer_dir=qwen3_tokenizer_dir, seed=15)
    llm = LLM(str(tmp_path))
    cfg = llm.model.config
    assert cfg.architecture == "qwen3_next" and cfg.moe.sparse_layers == {0, 2, 3}
    ids = _ids(80, seed=16)
    from test_moe import _smallest_router_margin

    assert _smallest_router_margin(llm, ids) > 1e-4, "router near-tie: the fixture cannot tell routing bugs"
    assert _max_diff(llm, ref, ids, chunk=50) <= TOLERANCE
    assert engine_greedy(llm, ids[:15], 10) == reference_greedy(ref, ids[:15], 10)


def test_released_multimodal_checkpoint_with_a_text_prompt(tmp_path, qwen3_tokenizer_dir):
    """Qwen3.5 is released as Qwen3_5ForConditionalGeneration: a nested text_config, `model.language_model.*`
    names, a vision tower (images and videos: tests/test_vl_parity.py) and a multi-token-prediction head
    (`mtp.*`, for speculative decoding, not used here: skipped at load)."""
    import transformers
    from safetensors.torch import load_file, save_file
    from tiny_models import perturb

    text = build_tiny("qwen3_5", tmp_path / "text", tokenizer_dir=qwen3_tokenizer_dir).config.to_dict()
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64)
    cfg = transformers.Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **IDS)
    torch.manual_seed(0)
    ref = transformers.Qwen3_5ForConditionalGeneration._from_config(cfg, attn_implementation="eager",
                                                                   dtype=torch.float32)
    perturb(ref, seed=12)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.endswith("norm.weight") and "linear_attn.norm" not in name and "visual" not in name:
                param.sub_(1.0)
    ref.eval().save_pretrained(tmp_path / "mm")
    weights = load_file(tmp_path / "mm" / "model.safetensors")
    assert any(k.startswith("model.language_model.") for k in weights)
    weights["mtp.fc.weight"] = torch.zeros(4, 4)  # as released checkpoints carry
    save_file(weights, tmp_path / "mm" / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (tmp_path / "mm" / name).write_bytes((qwen3_tokenizer_dir / name).read_bytes())
    llm = LLM(str(tmp_path / "mm"))
    assert llm.model.config.architecture == "qwen3_5" and llm.model.visual is not None
    assert _max_diff(llm, ref, _ids(50, seed=13)) <= TOLERANCE


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe", "qwen3_next"])
def test_gguf_files(tmp_path, qwen3_tokenizer_dir, arch):
    """GGUF files as llama.cpp's converter writes them (tests/gguf_files.py: norms as 1 + w, A = -exp(A_log),
    Qwen3.5's value heads tiled, Qwen3-Next's b/a fused, a multi-token-prediction block appended). In float32 they
    must give transformers' logits; with weights in quantised blocks, the kernels' logits must equal those of the
    same file dequantised at load (the gguf package's values), and greedy tokens must agree."""
    from gguf_files import write_gguf

    # (llama.cpp's qwen3next has no dense layers: its converter refuses mlp_only_layers)
    ref = build_tiny(arch, tmp_path / "hf", tokenizer_dir=qwen3_tokenizer_dir, seed=20,
                     dense_layers=() if arch == "qwen3_next" else (1,))
    write_gguf(ref, qwen3_tokenizer_dir, tmp_path / "f32.gguf", types={}, mtp_layers=1)
    write_gguf(ref, qwen3_tokenizer_dir, tmp_path / "quant.gguf")
    ids = _ids(70, seed=21)
    for quantized in (True, False):
        llm = LLM(str(tmp_path / "f32.gguf"), quantized=quantized)
        cfg = llm.model.config
        assert cfg.num_layers == 4 and not cfg.zero_centered_norm
        assert cfg.linear_attention.tiled_value_heads == (arch != "qwen3_next")
        assert _max_diff(llm, ref, ids, chunk=40) <= TOLERANCE
    blocks, floats = LLM(str(tmp_path / "quant.gguf")), LLM(str(tmp_path / "quant.gguf"), quantized=False)
    for projection in ("in_proj_qkv", "in_proj_b"):
        assert type(getattr(blocks.model.model.layers[0].linear_attn, projection)).__name__ == "QuantLinear"
    diff = (blocks.engine.logits(ids) - floats.engine.logits(ids)).abs().max().item()
    assert diff <= TOLERANCE, diff
    assert engine_greedy(blocks, ids[:12], 10) == engine_greedy(floats, ids[:12], 10)


def test_delta_rule_chunks_equal_the_recurrence():
    """The chunked form (several chunks, a ragged last one, a carried-in state) against the one-token
    recurrence, both against a float64 loop written from the rule's definition."""
    gen = torch.Generator().manual_seed(0)
    heads, length, dk, dv = 3, 150, 16, 24
    q, k = (torch.nn.functional.normalize(torch.randn(heads, length, dk, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(heads, length, dv, generator=gen)
    g = -torch.rand(heads, length, generator=gen)
    beta = torch.rand(heads, length, generator=gen)
    start = torch.randn(heads, dk, dv, generator=gen)

    state = start.double().clone()
    expected = torch.empty(heads, length, dv, dtype=torch.float64)
    for t in range(length):
        state *= g[:, t, None, None].double().exp()
        kt, vt = k[:, t].double(), v[:, t].double()
        state += kt[:, :, None] * ((vt - torch.einsum("hkv,hk->hv", state, kt)) * beta[:, t, None].double())[:, None]
        expected[:, t] = torch.einsum("hkv,hk->hv", state, q[:, t].double())

    chunked_state = start.clone()
    chunked = chunked_delta_rule(q, k, v, g, beta, chunked_state, chunk=64)
    assert (chunked - expected).abs().max() < 1e-4
    assert (chunked_state - state).abs().max() < 1e-4
    stepped_state = start.clone()[None]
    stepped = torch.stack([recurrent_delta_rule(q[None, :, t], k[None, :, t], v[None, :, t], g[None, :, t],
                                                beta[None, :, t], stepped_state)[0] for t in range(length)], dim=1)
    assert (stepped - expected).abs().max() < 1e-4
    # The check can fail: dropping the decay inside a chunk is caught.
    wrong = chunked_delta_rule(q, k, v, torch.zeros_like(g), beta, start.clone(), chunk=64)
    assert (wrong - expected).abs().max() > 1e-2


def test_native_delta_rule_step_equals_pytorch(native):
    """The decode-step kernel against the same step in PyTorch operations: several sequences, heads, and
    widths that are not multiples of a vector."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, dk, dv = 3, 4, 20, 37
    q, k = (torch.nn.functional.normalize(torch.randn(batch, heads, dk, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(batch, heads, dv, generator=gen)
    g, beta = -torch.rand(batch, heads, generator=gen), torch.rand(batch, heads, generator=gen)
    state = torch.randn(batch, heads, dk, dv, generator=gen)
    expected_state = state.clone()
    expected = gated_deltanet.reference_delta_rule_step(q, k, v, g, beta, expected_state)
    got = native.delta_rule_step_(q, k, v, g, beta, state)
    assert (got - expected).abs().max() < 1e-5 and (state - expected_state).abs().max() < 1e-5
    wrong = native.delta_rule_step_(q, k, v, g, torch.zeros_like(beta), expected_state.clone())
    assert (wrong - expected).abs().max() > 1e-2  # the comparison can fail


def test_a_dropped_convolution_state_is_caught(qwen3_5, monkeypatch):
    """The parity test can fail: forgetting the convolution's carried inputs between chunks moves the logits."""
    folder, ref = qwen3_5
    llm = LLM(str(folder))
    real = gated_deltanet.GatedDeltaNet.forward

    def forgetful(self, x, cache):
        cache.recurrent_for(x.shape[0]).layer(self.index)[0].zero_()
        return real(self, x, cache)

    monkeypatch.setattr(gated_deltanet.GatedDeltaNet, "forward", forgetful)
    assert _max_diff(llm, ref, _ids(60, seed=14), chunk=20) > 100 * TOLERANCE


def test_w8a8_runs_hybrid_models(qwen3_5):
    """The lossy w8a8 mode converts the linear-attention layers' projections one by one (smoothed with maxima
    that calibration passes through the recurrent layers gather), the attention layers' and the MLPs' as in
    the dense models. Its next-token distributions stay near the float model's; decoding (recurrent states,
    paged cache) gives the tokens the same mode's full forward picks; a second load maps the stored layers and
    gives the same logits. (Greedy agreement with the float model is no measure on a random model: its
    next-token logits lie within ~0.02 of each other.)"""
    from qwen_engine.models import w8a8

    folder, _ = qwen3_5
    exact = LLM(str(folder), progress=False)
    lossy = LLM(str(folder), progress=False, quantization="w8a8")
    converted = {name for name, m in lossy.model.named_modules() if isinstance(m, w8a8.W8A8Linear)}
    assert {name.rsplit(".", 1)[-1] for name in converted} == {
        "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "qkv_proj", "o_proj", "gate_up_proj",
        "down_proj", "lm_head"}
    smoothed = [m for m in lossy.model.modules() if isinstance(m, w8a8.W8A8Linear) and m.input_factors is not None]
    assert smoothed, "calibration gathered no maxima"
    ids = _ids(40, seed=5)
    p = torch.log_softmax(exact.logits(ids), -1)
    got = lossy.logits(ids)
    q = torch.log_softmax(got, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    print(f"w8a8 on the tiny Qwen3.5: mean KL {kl:.2e}")
    assert 0 < kl < 1e-2
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = lossy.tokenizer.encode("def add(a, b):")
    tokens = lossy.generate("def add(a, b):", params)[0].token_ids
    assert tokens == lossy.logits(prompt + tokens[:-1])[len(prompt) - 1 :].argmax(-1).tolist()
    again = LLM(str(folder), progress=False, quantization="w8a8")
    assert torch.equal(again.logits(ids), got)


@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 70, 37), (16, 64, 128)])
def test_native_triangular_solve_equals_pytorch(native, shape):
    """The chunked delta rule's system (I + L) X = B, L strictly lower, by forward substitution, against
    torch.linalg.solve_triangular; the diagonal and upper triangle given must not be read."""
    heads, n, width = shape
    gen = torch.Generator().manual_seed(n)
    lower = (torch.randn(heads, n, n, generator=gen) * 0.3).tril(-1)
    b = torch.randn(heads, n, width, generator=gen)
    expected = torch.linalg.solve_triangular(torch.eye(n) + lower, b, upper=False, unitriangular=True)
    noisy = lower + torch.randn(heads, n, n, generator=gen).triu()  # what the solve must ignore
    got = native.unit_lower_solve(noisy, b)
    print(f"max|Δ| = {(got - expected).abs().max():.2e} (max {expected.abs().max():.2f})")
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("tokens", [1, 2, 3, 70])
def test_native_causal_conv_equals_pytorch(native, tokens):
    """A prompt chunk's convolution and SiLU in one native pass against the PyTorch form (cat, grouped conv1d, SiLU):
    chunks shorter than the kernel's memory, as long as it and longer; 37 channels (not a multiple of a vector).
    The state must come out as the chunk's last inputs (or the old state's tail and the chunk, for 1-2 tokens)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(tokens)
    channels, kernel = 37, 4
    x = torch.randn(tokens, channels, generator=gen)
    state = torch.randn(channels, kernel - 1, generator=gen)
    weight = torch.randn(channels, kernel, generator=gen)
    conv = torch.cat([state, x.T], dim=-1)
    expected = F.silu(F.conv1d(conv[None], weight[:, None], groups=channels)[0]).T
    expected_state = conv[:, -(kernel - 1):]
    got = native.causal_conv_silu_(x, state, weight)
    print(f"max|Δ| = {(got - expected).abs().max():.2e}")
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(state, expected_state)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("consecutive", [False, True])
def test_native_deltanet_decode_equals_pytorch(native, tiled, consecutive):
    """A DeltaNet layer's whole decode step between its projections (convolution, gates, normalised heads, the
    delta rule, the gated norm) in one native call, against the same step in PyTorch operations: three sequences
    in a pool of five slots, taken in order or scattered, value heads sharing key heads both ways, widths that
    are not multiples of a vector. The pools must come out updated alike."""
    from types import SimpleNamespace

    from qwen_engine.config import LinearAttentionConfig

    gen = torch.Generator().manual_seed(5)
    lin = LinearAttentionConfig(layers=frozenset({0}), num_key_heads=2, num_value_heads=4, key_head_dim=20,
                                value_head_dim=37, conv_kernel=4, tiled_value_heads=tiled)
    layer = gated_deltanet.GatedDeltaNet(SimpleNamespace(linear_attention=lin, hidden_size=24, rms_norm_eps=1e-6), 0)
    for p in layer.parameters():
        p.data = torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 1.0)
    batch, pool = 3, 5
    mixed = torch.randn(batch, lin.conv_channels, generator=gen)
    z = torch.randn(batch, 4 * 37, generator=gen)
    b, a = torch.randn(batch, 4, generator=gen), torch.randn(batch, 4, generator=gen)
    conv_pool = torch.randn(pool, lin.conv_channels, 3, generator=gen)
    delta_pool = torch.randn(pool, 4, 20, 37, generator=gen)
    slots = slice(1, 4) if consecutive else torch.tensor([4, 0, 2])
    indices = torch.arange(1, 4) if consecutive else slots
    expected_conv, expected_delta = conv_pool.clone(), delta_pool.clone()
    original_conv, original_delta = conv_pool.clone(), delta_pool.clone()
    expected = layer._decode_reference(mixed, z, b, a, slots, expected_conv, expected_delta)

    def native_step(conv_pool, delta_pool, tiled=tiled):
        return native.deltanet_decode_(mixed, z, b, a, indices, conv_pool,
                                       delta_pool, layer.conv1d.weight[:, 0].contiguous(), layer.A_log,
                                       layer.dt_bias, layer.norm.weight, layer.norm.eps, 2, tiled)

    got = native_step(conv_pool, delta_pool)
    print(f"max|Δ| = {(got - expected).abs().max():.2e} (max {expected.abs().max():.2f})")
    assert (got - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())
    assert torch.equal(conv_pool, expected_conv)
    assert (delta_pool - expected_delta).abs().max() < 1e-5 * delta_pool.abs().max()
    # The comparison can fail: value heads reading the wrong key heads move the output.
    assert (native_step(original_conv.clone(), original_delta.clone()) - expected).abs().max() < 1e-4
    wrong = native_step(original_conv.clone(), original_delta.clone(), tiled=not tiled)
    assert (wrong - expected).abs().max() > 1e-2
