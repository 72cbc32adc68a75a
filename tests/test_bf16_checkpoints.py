"""Checkpoints saved in bfloat16 (as Qwen publishes them) run in float32 on CPU: their linear weights stay in
bfloat16 for the native kernels (weights/bf16_layers.py), and the numbers are transformers' own in float32.

transformers loads the same folder with dtype=float32 (every bfloat16 weight widened exactly). Our logits must
be within 1e-4 of its logits (measured ~4e-6 with |logit| ~4, as for float32 checkpoints), on the AMX tiles and
off them, greedy tokens identical, many streams at once identical to each alone, and the vision towers' output
within the same tolerance. A float32 checkpoint and `quantized=False` keep plain float32 layers.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny, engine_greedy, reference_greedy
from vl_models import IDS, build_vl

from qwen_engine import LLM, SamplingParams
from qwen_engine.models.quant import QuantEmbedding, QuantLinear

TOLERANCE = 1e-4
BF16 = 30  # ggml's type number


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 151_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])  # tied embeddings, and a separate lm_head
def pair(request, tmp_path_factory, qwen3_tokenizer_dir, native):
    folder = tmp_path_factory.mktemp(f"bf16-{request.param}")
    ref = build_tiny(request.param, folder, tokenizer_dir=qwen3_tokenizer_dir, bfloat16=True)
    return ref, LLM(folder, progress=False), folder


def test_linear_weights_stay_in_bfloat16(pair):
    _, llm, _ = pair
    model = llm.model
    layers = [model.lm_head]
    for layer in model.model.layers:
        layers += [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
    for layer in layers:
        assert isinstance(layer, QuantLinear) and set(layer._type_ids) == {BF16}, layer
        assert all(b.dtype == torch.uint8 and b.shape[1] == 2 * layer.in_features for b in layer.blocks)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # norms and biases: float32
    assert model.decode_step() is not None  # decode steps run natively over the bfloat16 weights


def test_logits_match_transformers_in_float32_on_and_off_the_tiles(pair, native):
    ref, llm, _ = pair
    ids = _ids(96)  # 96 rows: the AMX tiles where the CPU has them
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    diffs = [(llm.logits(ids) - expected).abs().max().item()]
    was = native.set_amx_prefill(False)
    try:
        diffs.append((llm.logits(ids) - expected).abs().max().item())
    finally:
        native.set_amx_prefill(was)
    assert max(diffs) <= TOLERANCE, diffs
    assert expected.abs().max() > 1.0


def test_greedy_generation_matches_reference(pair):
    ref, llm, _ = pair
    prompt = _ids(20, seed=2)
    assert engine_greedy(llm, prompt, 24) == reference_greedy(ref, prompt, 24)


def test_many_streams_decode_as_each_alone(pair):
    # 18 sequences decoding together: 18 rows of x per product, which take the AMX tiles (from 17 rows).
    _, llm, _ = pair
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, repetition_penalty=1.0)
    params = params.with_defaults(llm.default_params)

    def run(prompts: list[list[int]]) -> list[list[int]]:
        seqs = [llm.engine.add_request(p, params) for p in prompts]
        while not all(s.finished for s in seqs):
            llm.engine.step()
        return [s.output_ids for s in seqs]

    prompts = [_ids(5 + i, seed=10 + i) for i in range(18)]
    alone = [run([p])[0] for p in prompts[:3]]
    assert run(prompts)[:3] == alone


def test_float32_checkpoints_and_quantized_false_keep_float32_layers(pair, tmp_path, qwen3_tokenizer_dir):
    _, _, folder = pair
    reference = LLM(folder, progress=False, quantized=False)
    assert isinstance(reference.model.lm_head, torch.nn.Linear)
    assert reference.model.lm_head.weight.dtype == torch.float32
    build_tiny("qwen3", tmp_path / "f32", tokenizer_dir=qwen3_tokenizer_dir)
    plain = LLM(tmp_path / "f32", progress=False)
    assert isinstance(plain.model.model.layers[0].mlp.down_proj, torch.nn.Linear)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_vision_towers_keep_bfloat16_linears_and_match_reference(family, tmp_path, qwen3_tokenizer_dir, native):
    from test_vl_parity import one_image, reference_logits

    ref = build_vl(family, tmp_path, qwen3_tokenizer_dir, hub_config=True, bfloat16=True)
    llm = LLM(tmp_path, progress=False, max_model_len=4096, kv_cache_memory=64 << 20)
    visual = llm.model.visual
    linears = [m for m in visual.modules() if isinstance(m, QuantLinear)]
    assert linears and not any(isinstance(m, torch.nn.Linear) for m in visual.modules())
    prompt = llm.encode_chat(one_image(), add_generation_prompt=True)
    assert int((torch.tensor(prompt.token_ids) == IDS["image_token_id"]).sum()) >= 16  # tiles take the rows
    ours = llm.logits(prompt)
    theirs = reference_logits(ref, prompt)
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOLERANCE, f"{family}: max |Δlogit| {diff:.2e}"
    assert theirs.abs().max() > 1.0


@pytest.mark.parametrize("in_features", [64, 50, 3420 // 10])  # a multiple of 32; widths the kernels pad
def test_keep_linears_matches_the_float32_layer(native, in_features):
    from qwen_engine.weights import bf16_layers

    gen = torch.Generator().manual_seed(in_features)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, 24), torch.nn.Linear(24, 40), torch.nn.Linear(40, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).bfloat16().float())
        model[2].weight.add_(1e-3)  # no longer exactly bfloat16: stays a float32 nn.Linear
    reference = [torch.nn.Linear(m.in_features, m.out_features) for m in model]
    for ref, m in zip(reference, model, strict=True):
        ref.load_state_dict(m.state_dict())
    assert bf16_layers.keep_linears(model) == 2
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], torch.nn.Linear)
    assert isinstance(model[0], bf16_layers.PaddedLinear) == (in_features % 32 != 0)
    for rows in (3, 40):  # in registers; on the AMX tiles where the CPU has them
        x = torch.randn(rows, in_features, generator=gen)
        with torch.no_grad():
            for ref, m in zip(reference[:2], model[:2], strict=True):
                exact = x.double() @ ref.weight.double().T + ref.bias.double()
                assert ((m(x).double() - exact).abs() <= 1e-6 * (x.double().abs() @ ref.weight.double().abs().T
                                                                   + 1)).all()
                x = ref(x)
    assert torch.equal(model[0].dequantized(), reference[0].weight)


def test_only_vision_towers_get_padded_widths():
    # The text model's layers are stacked and read as they are by the native decode step: a width the kernels
    # cannot read (not a multiple of 16) stays float32 there; a vision tower pads it (PaddedLinear).
    from qwen_engine.weights import bf16_layers

    odd = torch.zeros(8, 50, dtype=torch.bfloat16)
    layer = torch.nn.Linear(50, 8)
    assert not bf16_layers.can_keep("model.layers.0.mlp.down_proj", layer, odd)
    assert bf16_layers.can_keep("visual.blocks.0.mlp.down_proj", layer, odd, pad=True)
    assert bf16_layers.can_keep("model.layers.0.mlp.down_proj", layer, torch.zeros(8, 48, dtype=torch.bfloat16))
    assert not bf16_layers.can_keep("model.layers.0.mlp.down_proj", layer, odd.float())
