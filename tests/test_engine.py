"""The batching engine: a request's greedy output is the same alone, in a batch of 16 mixed-length requests,
after a prefix-cache hit, after chunked prefill and after preemption; the block pool is whole afterwards."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import build_tiny

from qwen_engine import LLM, ContextLengthError, SamplingParams
from qwen_engine.engine.engine import Engine, EngineConfig

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True).with_defaults(SamplingParams())


@pytest.fixture(scope="module")
def llm(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    folder = tmp_path_factory.mktemp("engine-tiny")
    build_tiny("qwen3", folder, tokenizer_dir=qwen3_tokenizer_dir, seed=3)
    return LLM(folder, max_model_len=1024)


def make_engine(llm: LLM, **overrides) -> Engine:
    config = EngineConfig(max_model_len=llm.max_model_len, **overrides)
    return Engine(llm.model, llm.tokenizer, llm.eos_token_ids, config)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(151_000) for _ in range(rng.randrange(3, 90))] for _ in range(n)]


def run(engine: Engine, prompt_ids: list[list[int]], params=GREEDY) -> list[list[int]]:
    params = params if isinstance(params, list) else [params] * len(prompt_ids)
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompt_ids, params, strict=True)]
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < 10_000, "engine made no progress"
    return [s.output_ids for s in seqs]


def assert_pool_whole(engine: Engine) -> None:
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting


@pytest.fixture(scope="module")
def alone(llm) -> list[list[int]]:
    """Each of 16 prompts run by itself, in a fresh engine, without prefix caching."""
    outs = []
    for p in prompts(16):
        outs += run(make_engine(llm, enable_prefix_caching=False, kv_cache_memory=64 << 20), [p])
    return outs


def test_batch_of_16_matches_alone(llm, alone):
    engine = make_engine(llm, kv_cache_memory=64 << 20)
    assert run(engine, prompts(16)) == alone
    assert_pool_whole(engine)


def test_chunked_prefill_matches_alone(llm, alone):
    engine = make_engine(llm, max_num_batched_tokens=7, kv_cache_memory=64 << 20)
    assert run(engine, prompts(16)) == alone
    assert_pool_whole(engine)


def test_preemption_matches_alone(llm, alone):
    # A pool of 20 blocks × 16 tokens cannot hold 16 sequences of up to ~110 tokens: some are preempted.
    engine = make_engine(llm, kv_cache_memory=20 * _block_bytes(llm))
    assert engine.blocks.num_blocks == 20
    assert run(engine, prompts(16)) == alone
    assert engine.scheduler.num_preemptions > 0
    assert_pool_whole(engine)


def test_prefix_cache_hit_matches(llm, alone):
    engine = make_engine(llm, kv_cache_memory=64 << 20)
    first = run(engine, prompts(16))
    hits_before = engine.blocks.hits
    seqs = [engine.add_request(p, GREEDY) for p in prompts(16)]
    while engine.has_work():
        engine.step()
    assert [s.output_ids for s in seqs] == first == alone
    assert engine.blocks.hits > hits_before
    assert sum(s.num_cached_prompt for s in seqs) > 0
    assert_pool_whole(engine)


def test_multi_turn_reuses_the_conversation(llm):
    engine = make_engine(llm, kv_cache_memory=64 << 20)
    turn1 = prompts(1, seed=5)[0] * 3
    (answer,) = run(engine, [turn1])
    turn2 = turn1 + answer + prompts(1, seed=6)[0]
    seq = engine.add_request(turn2, GREEDY)
    while engine.has_work():
        engine.step()
    # Every full block of the first turn's prompt and answer is served from the cache.
    assert seq.num_cached_prompt >= (len(turn1) + len(answer) - 1) // 16 * 16 - 16
    fresh = make_engine(llm, enable_prefix_caching=False, kv_cache_memory=64 << 20)
    assert run(fresh, [turn2]) == [seq.output_ids]


def test_different_pictures_never_share_blocks(llm):
    # Same tokens, different extra content hashes (as an image's would be): no hit.
    blocks = make_engine(llm).blocks
    from qwen_engine.engine.block_manager import BlockTable

    ids = list(range(100, 164))
    a = BlockTable()
    blocks.grow(a, len(ids))
    blocks.register_full_blocks(a, ids, len(ids), extra=[b"", b"picture-1", b"", b""])
    b = BlockTable()
    assert blocks.match_prefix(b, ids + [1], extra=[b"", b"picture-2", b"", b""]) == 16
    blocks.release(b)
    c = BlockTable()
    assert blocks.match_prefix(c, ids + [1], extra=[b"", b"picture-1", b"", b""]) == 64


def test_mixed_sampling_params_in_one_batch(llm):
    ps = prompts(6, seed=9)
    params = [
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, presence_penalty=1.5),
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, frequency_penalty=1.0),
        SamplingParams(max_tokens=12, temperature=0.8, top_k=5, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=1.2, top_p=0.5, seed=2, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
    ]
    params = [p.with_defaults(SamplingParams()) for p in params]
    together = run(make_engine(llm), ps, params)
    apart = [run(make_engine(llm), [p], [sp])[0] for p, sp in zip(ps, params, strict=True)]
    assert together == apart
    assert [len(o) for o in together] == [16, 16, 16, 12, 9, 16]
    assert len({tuple(o) for o in together[:3] + together[5:]}) == 4  # each penalty really changed the answer


def test_new_requests_join_running_decodes(llm):
    engine = make_engine(llm, max_num_batched_tokens=16)
    short = engine.add_request(prompts(1, seed=1)[0][:5], GREEDY)
    engine.step()
    long = engine.add_request(list(range(1000, 1200)), GREEDY)
    progress = []
    while not long.output_ids:
        engine.step()
        progress.append(len(short.output_ids))
    # While the 200-token prompt was prefilled in chunks, the running stream gained a token every step.
    assert progress == list(range(progress[0], progress[0] + len(progress)))
    assert len(progress) >= 200 // 16


def test_cancel_frees_blocks_at_once(llm):
    engine = make_engine(llm)
    seqs = [engine.add_request(p, GREEDY) for p in prompts(4)]
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_used > 0
    for seq in seqs:
        engine.abort(seq)
    assert_pool_whole(engine)
    assert all(s.finish_reason == "abort" for s in seqs)


def test_request_longer_than_cache_is_refused(llm):
    engine = make_engine(llm, kv_cache_memory=4 * _block_bytes(llm))
    with pytest.raises(ContextLengthError, match="whole KV cache holds 64"):
        engine.add_request(list(range(100, 200)), GREEDY)


def test_lone_sequence_outgrowing_the_pool_ends_with_length(llm):
    engine = make_engine(llm, kv_cache_memory=4 * _block_bytes(llm))
    (out,) = run(engine, [list(range(100, 150))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
                 .with_defaults(SamplingParams()))
    assert len(out) == 64 - 50 + 1  # the pool's 64 slots hold the prompt and all but the last sampled token
    assert_pool_whole(engine)


def test_soak_with_random_cancellations(llm):
    rng = random.Random(0)
    engine = make_engine(llm, kv_cache_memory=30 * _block_bytes(llm), max_num_batched_tokens=64)
    live = []
    for _ in range(300):
        if rng.random() < 0.3:
            p = [rng.randrange(151_000) for _ in range(rng.randrange(1, 60))]
            live.append(engine.add_request(p, SamplingParams(max_tokens=rng.randrange(1, 20), temperature=0.7,
                                                             ignore_eos=True).with_defaults(SamplingParams())))
        if live and rng.random() < 0.1:
            engine.abort(live.pop(rng.randrange(len(live))))
        engine.step()
        live = [s for s in live if not s.finished]
    while engine.has_work():
        engine.step()
    assert_pool_whole(engine)


def _block_bytes(llm: LLM) -> int:
    from qwen_engine.engine.kv_cache import PagedKVCache

    cfg = llm.config
    return PagedKVCache.bytes_per_block(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, llm.engine.dtype)


def test_prompt_logprobs_equal_the_log_softmax_of_the_logits(demo_llm):
    ids = demo_llm.tokenizer.encode("def fib(n):\n    if n < 2:\n        return n")
    reference = torch.log_softmax(demo_llm.logits(ids), dim=-1)
    scored = demo_llm.engine.prompt_logprobs(ids, top_n=3, chunk=5)  # chunks end mid-prompt
    assert scored[0] == (None, []) and len(scored) == len(ids)
    for i in range(1, len(ids)):
        lp, top = scored[i]
        assert lp == pytest.approx(reference[i - 1, ids[i]].item(), abs=1e-4)
        best = reference[i - 1].topk(3)
        assert [t for t, _ in top] == best.indices.tolist()
        assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-4)
