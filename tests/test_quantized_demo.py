"""The demo GGUF run on its quantised blocks (native kernels, the default) against the same file dequantised to
float32 at load (quantized=False, the reference): the same greedy tokens, logits equal up to summation order.

Measured here: max|Δlogit| = 4.6e-5 with logits of magnitude ~30 (7e-7 of the logits' norm); the bound,
1e-3 as in test_parity_demo.py, leaves a wide margin. The weights are the file's exact values in both, so a larger gap
would be a kernel bug, not rounding.
"""

from __future__ import annotations

import pytest
import torch

from qwen_engine import LLM, SamplingParams
from qwen_engine.models.quant import QuantEmbedding, QuantLinear

PROMPTS = [
    [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "列出三种排序算法并比较它们。"}],
]
MAX_ABS = 1e-3


@pytest.fixture(scope="module")
def reference(demo_gguf):
    return LLM(demo_gguf, progress=False, quantized=False)


def test_demo_model_keeps_its_blocks(demo_llm):
    model = demo_llm.model
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert isinstance(model.lm_head, QuantLinear)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantLinear) and isinstance(layer.mlp.gate_up_proj, QuantLinear)
    # No float32 copy of any matrix: what remains as parameters are norms and biases.
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_greedy_tokens_identical_to_float32(demo_llm, reference, index):
    params = SamplingParams(max_tokens=32, temperature=0.0, repetition_penalty=1.0)
    ours = demo_llm.chat(PROMPTS[index], params)
    ref = reference.chat(PROMPTS[index], params)
    assert ours.token_ids == ref.token_ids


def test_logits_close_to_float32(demo_llm, reference):
    ids = demo_llm.tokenizer.encode(demo_llm.apply_chat_template(PROMPTS[0]))
    ours, ref = demo_llm.logits(ids), reference.logits(ids)
    diff = (ours - ref).abs().max().item()
    print(f"max|Δlogit| = {diff:.2e}, relative to the norm {((ours - ref).norm() / ref.norm()).item():.2e}")
    assert diff <= MAX_ABS
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
