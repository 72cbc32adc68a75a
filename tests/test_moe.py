"""Qwen3-MoE and Qwen2-MoE against transformers: Hugging Face folders (float32 and bfloat16) and GGUF files
(expert tensors in quantised blocks, loaded by transformers' own GGUF reader as the reference).

The tiny models (tests/tiny_models.py) have 6 experts, 2 chosen per token, and a dense MLP in layer 1
(mlp_only_layers), so routing, renormalisation (Qwen3) or its absence (Qwen2), the shared expert with its
sigmoid gate (Qwen2) and the mix of sparse and dense layers are all on the path. Every test first checks that
no token's 2nd and 3rd router logits are nearly tied: there float32 noise could pick another expert and
the comparison would say nothing (shared/design/oracle.md §9c).
"""

from __future__ import annotations

import pytest
import torch
from gguf_files import write_gguf
from tiny_models import build_tiny, engine_greedy, reference_greedy

from qwen_engine import LLM, SamplingParams
from qwen_engine.errors import InputError, ModelLoadError
from qwen_engine.models.moe import ExpertMixture
from qwen_engine.models.quant import QuantLinear

ARCHS = ["qwen3_moe", "qwen2_moe"]
TOLERANCE = 1e-4  # oracle.md §9d, for tiny fixtures in float32


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 151_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _smallest_router_margin(llm: LLM, ids) -> float:
    """The smallest gap, over tokens and sparse layers, between the router logits of the k-th and (k+1)-th
    expert: float32 noise moves them by ~1e-6, so a gap 100 times that makes the choice of experts certain."""
    margins = []

    def record(module, args, _output):
        logits = module.gate(args[0].reshape(-1, args[0].shape[-1])).float()
        top = logits.topk(module.top_k + 1, dim=-1).values  # the softmax keeps the order: compare logits
        margins.append(float((top[:, -2] - top[:, -1]).min()))

    hooks = [m.register_forward_hook(record) for m in llm.model.modules() if isinstance(m, ExpertMixture)]
    try:
        llm.logits(ids)
    finally:
        for h in hooks:
            h.remove()
    assert margins, "no expert mixture ran"
    return min(margins)


def _check_logits(llm: LLM, ref: torch.nn.Module, ids: list[int]) -> float:
    margin = _smallest_router_margin(llm, ids)
    assert margin > 1e-4, f"router near-tie ({margin:.1e}): the fixture cannot tell routing bugs from noise"
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    diff = (llm.logits(ids) - expected).abs().max().item()
    print(f"max|Δlogit| = {diff:.2e} (max|logit| {expected.abs().max():.2f}, router margin {margin:.1e})")
    assert diff <= TOLERANCE, diff
    return diff


@pytest.fixture(scope="module", params=ARCHS)
def hf_pair(request, tmp_path_factory, qwen3_tokenizer_dir):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build_tiny(request.param, folder, tokenizer_dir=qwen3_tokenizer_dir, seed=3)
    return LLM(folder), ref, request.param


def test_config_and_layers(hf_pair):
    llm, ref, arch = hf_pair
    cfg = llm.config
    assert cfg.architecture == arch and cfg.moe is not None
    assert (cfg.moe.num_experts, cfg.moe.experts_per_token, cfg.moe.expert_intermediate_size) == (6, 2, 48)
    assert cfg.moe.norm_topk_prob == (arch == "qwen3_moe")
    assert cfg.moe.sparse_layers == {0, 2}
    assert cfg.moe.shared_expert_intermediate_size == (80 if arch == "qwen2_moe" else 0)
    assert (cfg.attention_bias, cfg.qk_norm) == ((True, False) if arch == "qwen2_moe" else (False, True))
    kinds = [type(layer.mlp).__name__ for layer in llm.model.model.layers]
    assert kinds == ["ExpertMixture", "SwiGLU", "ExpertMixture"]


def test_logits_match_transformers(hf_pair):
    llm, ref, _ = hf_pair
    _check_logits(llm, ref, _ids(120, seed=1))


def test_greedy_through_the_engine_matches_transformers(hf_pair):
    """Prefill in chunks, paged decode and a batch of two sequences, each equal to transformers' generate."""
    llm, ref, _ = hf_pair
    prompts = [_ids(30, seed=2), _ids(17, seed=3)]
    expected = [reference_greedy(ref, p, 12) for p in prompts]
    assert [engine_greedy(llm, p, 12) for p in prompts] == expected
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.0)
    seqs = [llm.engine.add_request(p, params.with_defaults(llm.default_params)) for p in prompts]
    while not all(seq.finished for seq in seqs):  # both in the same steps: batched prefill and decode
        llm.engine.step()
    assert [seq.output_ids for seq in seqs] == expected


def test_a_wrong_routing_rule_is_caught(hf_pair):
    """The comparison can fail: flipping renormalisation moves the logits far beyond the tolerance."""
    llm, ref, _ = hf_pair
    ids = _ids(60, seed=4)
    mixtures = [m for m in llm.model.modules() if isinstance(m, ExpertMixture)]
    for m in mixtures:
        m.norm_topk_prob = not m.norm_topk_prob
    try:
        with torch.inference_mode():
            expected = ref(torch.tensor([ids])).logits[0]
        assert (llm.logits(ids) - expected).abs().max().item() > 100 * TOLERANCE
    finally:
        for m in mixtures:
            m.norm_topk_prob = not m.norm_topk_prob


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_checkpoint_keeps_expert_weights_in_bfloat16(arch, tmp_path, qwen3_tokenizer_dir):
    ref = build_tiny(arch, tmp_path, tokenizer_dir=qwen3_tokenizer_dir, seed=6, bfloat16=True)
    llm = LLM(tmp_path)
    mixture = llm.model.model.layers[0].mlp
    assert isinstance(mixture.experts[0].gate_up_proj, QuantLinear)  # stacked gate/up over bfloat16 blocks
    assert [t.name for t in mixture.experts[0].gate_up_proj.qtypes] == ["BF16", "BF16"]
    _check_logits(llm, ref, _ids(80, seed=5))


@pytest.fixture(scope="module", params=ARCHS)
def gguf_pair(request, tmp_path_factory, qwen3_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    arch = request.param
    folder = tmp_path_factory.mktemp(f"{arch}-gguf")
    # Every layer sparse, as in the released MoE GGUFs (transformers' GGUF reader maps no dense MLP for them).
    model = build_tiny(arch, folder, tokenizer_dir=qwen3_tokenizer_dir, seed=7, dense_layers=())
    path = folder / f"tiny-{arch}.gguf"
    write_gguf(model, qwen3_tokenizer_dir, path)
    # transformers' GGUF config reader skips the experts' width, so it is given the config; the weights come
    # from the GGUF through its own name map, expert split and dequantisation.
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, config=model.config,
                                               dtype=torch.float32, attn_implementation="eager").eval()
    return path, ref, arch


@pytest.mark.parametrize("quantized", [True, False], ids=["blocks", "float32"])
def test_gguf_matches_transformers_gguf_loader(gguf_pair, quantized):
    path, ref, arch = gguf_pair
    llm = LLM(path, quantized=quantized)
    cfg = llm.config
    assert cfg.architecture == arch and cfg.moe.sparse_layers == {0, 1, 2}
    assert cfg.moe.norm_topk_prob == (arch == "qwen3_moe")  # llama.cpp's rule for each architecture
    expert = llm.model.model.layers[2].mlp.experts[5]
    if quantized:  # each expert a view of its rows in the file's 3-D blocks, gate and up stacked
        assert [t.name for t in expert.gate_up_proj.qtypes] == ["Q8_0", "Q4_0"]
        assert [t.name for t in expert.down_proj.qtypes] == ["F16"]
    else:
        assert expert.gate_proj.weight.dtype == torch.float32
    _check_logits(llm, ref, _ids(100, seed=8))
    prompt = _ids(20, seed=9)
    assert engine_greedy(llm, prompt, 10) == reference_greedy(ref, prompt, 10)


def test_gguf_chat_answers(gguf_pair):
    """The GGUF's own tokenizer and chat template drive a chat turn end to end (stop at eos or the limit)."""
    path, _, _ = gguf_pair
    llm = LLM(path)
    out = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=5, temperature=0.0))
    assert out.usage.completion_tokens <= 5 and out.finish_reason in ("stop", "length")


def test_bad_expert_counts_are_reported(tmp_path, qwen3_tokenizer_dir):
    import json

    build_tiny("qwen3_moe", tmp_path, tokenizer_dir=qwen3_tokenizer_dir)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_experts_per_tok"] = 9
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="num_experts_per_tok=9 must be between 1 and num_experts=6"):
        LLM(tmp_path)
    config["num_experts_per_tok"], config["num_local_experts"] = 2, 5  # the checkpoint holds 6
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="experts"):
        LLM(tmp_path)


def test_lossy_int8_mode_refuses_moe(hf_pair):
    llm, _, _ = hf_pair
    with pytest.raises(InputError, match="mixture-of-experts"):
        LLM(llm.path, quantization="w8a8")


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_qwen3_vl_moe_image_prompt_matches_transformers(layout, tmp_path, qwen3_tokenizer_dir):
    """Qwen3-VL-MoE stores each layer's experts fused. Released files hold gate_up_proj [E, H, 2I] and down_proj
    [E, I, H]; transformers 5 saves them transposed. Both load to the same model (tests/test_vl_parity.py runs
    the whole vision suite on the first)."""
    from safetensors import safe_open
    from test_vl_parity import one_image, reference_logits
    from vl_models import build_vl

    ref = build_vl("qwen3_vl_moe", tmp_path, qwen3_tokenizer_dir, hub_config=layout == "hub", seed=3)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        shape = tuple(f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape())
    assert shape == ((6, 64, 96) if layout == "hub" else (6, 96, 64))
    llm = LLM(tmp_path, progress=False, max_model_len=4096, kv_cache_memory=64 << 20)
    cfg = llm.config
    assert (cfg.architecture, cfg.vision.family, cfg.moe.norm_topk_prob) == ("qwen3_moe", "qwen3_vl", True)
    prompt = llm.encode_chat(one_image(), add_generation_prompt=True)
    margin = _smallest_router_margin(llm, prompt)
    assert margin > 1e-4, margin
    diff = (llm.logits(prompt) - reference_logits(ref, prompt)).abs().max().item()
    print(f"{layout}: max|Δlogit| = {diff:.2e}, router margin {margin:.1e}")
    assert diff <= TOLERANCE, diff


def test_fused_experts_of_a_wrong_shape_are_reported(tmp_path):
    from qwen_engine.weights.experts import split_fused

    name = "model.layers.3.mlp.experts.gate_up_proj"
    with pytest.raises(ModelLoadError, match=r"has shape \(6, 64, 95\), expected \[experts, 96, 64\] or"):
        split_fused(name, torch.zeros(6, 64, 95), hidden=64, intermediate=48, saved_by_v5=True)
    # hidden == 2 · intermediate: the shapes cannot tell, the file's transformers version does
    w = torch.randn(2, 8, 8)
    v5 = dict(split_fused(name, w, hidden=8, intermediate=4, saved_by_v5=True))
    hub = dict(split_fused(name, w, hidden=8, intermediate=4, saved_by_v5=False))
    gate = "model.layers.3.mlp.experts.1.gate_proj.weight"
    assert torch.equal(v5[gate], w[1, :4]) and torch.equal(hub[gate], w[1, :, :4].t())
