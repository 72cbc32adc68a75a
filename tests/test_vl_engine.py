"""Images through the serving engine: chunked prefill that splits an image, batching with text-only and other
image requests, the prefix cache keyed by image content, and M-RoPE positions for videos (the original rule)."""

from __future__ import annotations

import pytest
import torch
from test_vl_parity import picture
from vl_models import build_vl

from qwen_engine import LLM, SamplingParams
from qwen_engine.models.mrope import VisionSpan, mrope_positions

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def llm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, qwen3_tokenizer_dir) -> LLM:
    folder = tmp_path_factory.mktemp(request.param)
    build_vl(request.param, folder, qwen3_tokenizer_dir)
    return LLM(folder, progress=False, kv_cache_memory=32 << 20)


def ask(image, text: str = "Describe it.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_chunked_prefill_through_an_image_matches_whole_prefill(llm: LLM) -> None:
    messages = ask(picture(320, 240, 0))
    whole = llm.chat(messages, GREEDY).token_ids
    scheduler = llm.engine.scheduler
    budget, alone = scheduler.max_num_batched_tokens, scheduler.max_tokens_alone
    scheduler.max_num_batched_tokens = scheduler.max_tokens_alone = 23  # cuts the image's tokens into several steps
    try:
        llm.engine.vision_cache.clear()
        llm.engine.blocks.cached.clear()
        chunked = llm.chat(messages, GREEDY).token_ids
    finally:
        scheduler.max_num_batched_tokens, scheduler.max_tokens_alone = budget, alone
    assert chunked == whole


def test_batch_of_image_and_text_requests_equals_each_alone(llm: LLM) -> None:
    requests = [
        ask(picture(320, 240, 0)),
        [{"role": "user", "content": "Just text, no picture."}],
        [{"role": "user", "content": [{"type": "image", "image": picture(200, 150, 1)}, {"type": "text", "text": "and"},
                                      {"type": "image", "image": picture(150, 300, 2)}]}],
    ]
    alone = [llm.chat(m, GREEDY).token_ids for m in requests]
    prompts = [llm.encode_chat(m) for m in requests]
    seqs = [llm.engine.add_request(p.token_ids, GREEDY.with_defaults(llm.default_params), vision=p if p.items else None)
            for p in prompts]
    while llm.engine.has_work():
        llm.engine.step()
    assert [s.output_ids for s in seqs] == alone


def test_prefix_cache_tells_images_apart(llm: LLM) -> None:
    first, second = ask(picture(320, 240, 3)), ask(picture(320, 240, 4))  # same size: same token ids
    p1, p2 = llm.encode_chat(first), llm.encode_chat(second)
    assert p1.token_ids == p2.token_ids
    llm.engine.blocks.cached.clear()
    out1 = llm.chat(first, GREEDY)
    blocks = llm.engine.blocks
    hits = blocks.hits
    out2 = llm.chat(second, GREEDY)
    image_start = int(p2.items[0].rows[0])
    assert blocks.hits - hits <= image_start  # nothing past the image's first block came from the cache
    hits = blocks.hits
    again = llm.chat(first, GREEDY)
    assert blocks.hits - hits >= len(p1.token_ids) - llm.engine.config.block_size  # the same image: a hit
    assert again.token_ids == out1.token_ids
    assert out2.token_ids != out1.token_ids or not torch.equal(p1.items[0].pixel_values, p2.items[0].pixel_values)


def test_decode_continues_from_rope_delta(llm: LLM) -> None:
    """Generated tokens sit at i + rope_delta, which is below i after an image (it takes fewer positions)."""
    prompt = llm.encode_chat(ask(picture(320, 240, 0)))
    assert prompt.rope_delta < 0
    assert int(prompt.positions.max()) + 1 == len(prompt.token_ids) + prompt.rope_delta


# -- M-RoPE positions, original rule ---------------------------------------------------------------------------


def test_positions_text_image_text() -> None:
    # 3 text tokens, a 1x2x3 image block at 3, then 2 text tokens.
    positions, delta = mrope_positions(11, [VisionSpan(3, (1, 2, 3))])
    expected = torch.tensor([
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7],
    ])
    assert torch.equal(positions, expected)
    assert delta == 8 - 11


def test_positions_after_a_long_video_resume_after_its_time_extent() -> None:
    """Qwen2-VL: a video of 4 frame groups on a 1x2 grid. Text after it resumes at max(all axes) + 1 = 1 + 4,
    where transformers 5 would resume at 1 + max(h, w) = 3 (oracle.md §6 (a))."""
    positions, delta = mrope_positions(1 + 8 + 2, [VisionSpan(1, (4, 1, 2))])
    assert positions[:, 0].tolist() == [0, 0, 0]
    assert positions[0, 1:9].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    assert positions[1, 1:9].tolist() == [1] * 8
    assert positions[2, 1:9].tolist() == [1, 2] * 4
    assert positions[:, 9].tolist() == [5, 5, 5]
    assert positions[:, 10].tolist() == [6, 6, 6]
    assert delta == 7 - 11


def test_positions_qwen25_video_time_alignment() -> None:
    """Qwen2.5-VL: groups 2 s apart (fps 1, temporal patch 2) at 2 tokens/s step time by 4: the oracle's
    example of t-positions 41, 45, 49, 53; text after resumes at 54 (transformers 5: 47)."""
    start = 41
    positions, _ = mrope_positions(start + 4 * 6 * 6 + 1, [VisionSpan(start, (4, 6, 6), 2.0, 2)])
    times = positions[0, start : start + 144].reshape(4, 36)[:, 0].tolist()
    assert times == [41, 45, 49, 53]
    assert int(positions[1:, start : start + 144].max()) == 46
    assert positions[:, -1].tolist() == [54, 54, 54]


def test_positions_qwen25_fractional_seconds_truncate_like_the_reference() -> None:
    # fps 3 → 2/3 s per group x 2 tokens/s = 1.333…: float32 products truncated: 0, 1, 2, 4
    seconds = torch.tensor(2 / 3, dtype=torch.float32).item()
    positions, _ = mrope_positions(4, [VisionSpan(0, (4, 1, 1), seconds, 2)])
    expected = (torch.arange(4) * torch.tensor(seconds, dtype=torch.float32) * 2).long()
    assert positions[0].tolist() == expected.tolist() == [0, 1, 2, 4]


def test_positions_are_observable(llm: LLM) -> None:
    """Positions shifted by one after the image move the logits far beyond the 1e-4 parity tolerance."""
    family = llm.config.vision.family
    prompt = llm.encode_chat(ask(picture(200, 150, 5)))
    ours = llm.logits(prompt)
    shifted = type(prompt)(prompt.token_ids, prompt.items, prompt.positions.clone(), prompt.rope_delta)
    after = int(prompt.items[0].rows[-1]) + 1
    shifted.positions[:, after:] += 1
    moved = (llm.logits(shifted) - ours).abs().max().item()
    assert moved > 1e-2, family
