"""The batched sampler against hand-computed numbers on tiny vocabularies."""

from __future__ import annotations

import math
import re

import pytest
import torch

from qwen_engine.engine.sampler import (
    Sampler,
    apply_penalties,
    apply_temperature,
    apply_top_k_top_p_min_p,
    compute_logprobs,
    make_generator,
    sample_from_logits,
)
from qwen_engine.engine.sampling_params import SamplingParams

NEG_INF = -math.inf


def sp(**kwargs) -> SamplingParams:
    return SamplingParams(**kwargs).with_defaults(SamplingParams())


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor([probs], dtype=torch.float32))


def kept(row: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(row.tolist()) if v != NEG_INF]


def draw_frequencies(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int) -> torch.Tensor:
    # n rows sharing one generator: n independent draws in one sampler call.
    g = make_generator(seed)
    logits = logits_row.reshape(1, -1).expand(n, -1).contiguous()
    ids = Sampler()(logits, [params] * n, [[]] * n, [[]] * n, [g] * n)
    return torch.bincount(ids, minlength=logits.shape[1]).double() / n


# ---------------------------------------------------------------- penalties


def test_logit_bias_is_added_before_the_penalties_and_moves_greedy() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0], [2.0, 1.0, 0.5, 3.0]])
    params = [sp(logit_bias={1: 5.0, 3: -100}, repetition_penalty=2.0), sp()]
    out = apply_penalties(logits, params, [[1], []], [[], []])
    # Row 0: token 1 biased to 6.0, then halved by the repetition penalty (it is in the prompt).
    assert out.tolist() == [[2.0, 3.0, 0.5, -97.0], [2.0, 1.0, 0.5, 3.0]]
    greedy = Sampler()(logits, [sp(temperature=0, logit_bias={"2": 10}), sp(temperature=0)], [[], []], [[], []],
                       [None, None])
    assert greedy.tolist() == [2, 3]


def test_logit_bias_minus_100_bans_a_token_when_sampling() -> None:
    freq = draw_frequencies(logits_of([0.5, 0.3, 0.2]), sp(temperature=1.0, logit_bias={0: -100}), 4000, seed=1)
    assert freq[0] == 0
    assert freq[1] == pytest.approx(0.6, abs=0.03)


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        ({"x": 1}, "token ids"),
        ({-3: 1}, "token ids"),
        ({5: 101}, "[-100, 100]"),
        ({5: float("nan")}, "finite"),
        ([5], "map token ids"),
    ],
)
def test_logit_bias_is_checked(bias, message) -> None:
    from qwen_engine.errors import InputError

    with pytest.raises(InputError, match=re.escape(message)) as caught:
        SamplingParams(logit_bias=bias)
    assert caught.value.param == "logit_bias"



def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0]])
    out = apply_penalties(logits, [sp(repetition_penalty=2.0)], [[0, 1]], [[1, 3, 3]])
    # 0: 2/2; 1: -1*2 (prompt and output, once); 3: 0*2 = 0; 2 and 4 untouched.
    assert out.tolist() == [[1.0, -2.0, 0.5, 0.0, 3.0]]


def test_repetition_penalty_below_one_boosts() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    out = apply_penalties(logits, [sp(repetition_penalty=0.5)], [[0, 1]], [[]])
    assert out.tolist() == [[4.0, -0.5, 0.5]]


def test_presence_penalty_only_counts_the_output() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    out = apply_penalties(logits, [sp(presence_penalty=0.5)], [[0, 2]], [[1, 1, 1, 4]])
    assert out.tolist() == [[1.0, 0.5, 1.0, 1.0, 0.5]]


def test_frequency_penalty_scales_with_count() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    out = apply_penalties(logits, [sp(frequency_penalty=0.25)], [[0]], [[1, 1, 1, 4]])
    assert out.tolist() == [[1.0, 0.25, 1.0, 1.0, 0.75]]


def test_negative_presence_and_frequency_reward() -> None:
    logits = torch.tensor([[0.0, 0.0]])
    out = apply_penalties(logits, [sp(presence_penalty=-1.0, frequency_penalty=-0.5)], [[]], [[1, 1]])
    assert out.tolist() == [[0.0, 2.0]]


def test_all_penalties_together_repetition_first() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    params = sp(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    out = apply_penalties(logits, [params], [[2]], [[0, 0, 1]])
    # 0: 2/2 - 0.5*2 - 1 = -1; 1: -2*2 - 0.5 - 1 = -5.5; 2 (prompt only): 1/2.
    assert out.tolist() == [[-1.0, -5.5, 0.5]]


def test_penalties_do_not_mutate_and_return_a_copy() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    before = logits.clone()
    out = apply_penalties(logits, [sp(repetition_penalty=1.5, frequency_penalty=1.0)], [[0]], [[1]])
    assert torch.equal(logits, before)
    same = apply_penalties(logits, [sp()], [[0]], [[1]])
    assert torch.equal(same, logits) and same.data_ptr() != logits.data_ptr()
    assert not torch.equal(out, logits)


def test_penalties_ignore_ids_outside_the_vocab() -> None:
    logits = torch.tensor([[2.0, 2.0]])
    out = apply_penalties(logits, [sp(repetition_penalty=2.0, presence_penalty=1.0)], [[5, -1]], [[0, 7]])
    assert out.tolist() == [[0.0, 2.0]]


def test_penalties_are_per_row() -> None:
    logits = torch.tensor([[2.0, 2.0, 2.0]] * 3)
    params = [sp(repetition_penalty=2.0), sp(frequency_penalty=1.0), sp()]
    out = apply_penalties(logits, params, [[0], [0], [0]], [[1], [1, 1], [1]])
    assert out.tolist() == [[1.0, 1.0, 2.0], [2.0, 0.0, 2.0], [2.0, 2.0, 2.0]]


# ---------------------------------------------------------------- temperature and filters


def test_temperature_divides_each_row_and_skips_greedy_rows() -> None:
    logits = torch.tensor([[2.0, -4.0, 1.0], [2.0, -4.0, 1.0], [2.0, -4.0, 1.0]])
    out = apply_temperature(logits, [0.5, 2.0, 0.0])
    assert out.tolist() == [[4.0, -8.0, 2.0], [1.0, -2.0, 0.5], [2.0, -4.0, 1.0]]
    assert logits[0].tolist() == [2.0, -4.0, 1.0]


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert kept(apply_top_k_top_p_min_p(logits, [2], [1.0], [0.0])[0]) == [1, 2]
    assert kept(apply_top_k_top_p_min_p(logits, [1], [1.0], [0.0])[0]) == [1]
    for off in (0, -1, 4, 100):
        assert kept(apply_top_k_top_p_min_p(logits, [off], [1.0], [0.0])[0]) == [0, 1, 2, 3]
    # Kept values are unchanged.
    assert apply_top_k_top_p_min_p(logits, [2], [1.0], [0.0])[0, 1].item() == 3.0


def test_top_k_ties_go_to_the_lower_id() -> None:
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]])
    assert kept(apply_top_k_top_p_min_p(logits, [1], [1.0], [0.0])[0]) == [1]
    assert kept(apply_top_k_top_p_min_p(logits, [2], [1.0], [0.0])[0]) == [1, 2]
    assert kept(apply_top_k_top_p_min_p(logits, [3], [1.0], [0.0])[0]) == [1, 2, 4]


def test_top_p_nucleus() -> None:
    logits = logits_of([0.5, 0.1, 0.3, 0.1])

    def top_p(p: float) -> list[int]:
        return kept(apply_top_k_top_p_min_p(logits, [0], [p], [0.0])[0])

    assert top_p(1.0) == [0, 1, 2, 3]
    assert top_p(0.5) == [0]  # 0.5 alone already reaches 0.5
    assert top_p(0.51) == [0, 2]
    assert top_p(0.8) == [0, 2]  # 0.5 + 0.3 reaches 0.8 exactly
    assert top_p(0.81) == [0, 1, 2]  # tie between the 0.1s: lower id first
    assert top_p(0.95) == [0, 1, 2, 3]
    assert top_p(1e-9) == [0]  # a tiny top_p still keeps one token


def test_top_p_sees_the_distribution_left_by_top_k() -> None:
    logits = logits_of([0.5, 0.1, 0.3, 0.1])
    # Alone, 0.6 needs {0, 2}; after top_k=2 the survivors are 0.625 / 0.375 and 0.625 suffices.
    assert kept(apply_top_k_top_p_min_p(logits, [0], [0.6], [0.0])[0]) == [0, 2]
    assert kept(apply_top_k_top_p_min_p(logits, [2], [0.6], [0.0])[0]) == [0]


def test_top_p_on_a_uniform_distribution() -> None:
    logits = torch.zeros(1, 5)
    assert kept(apply_top_k_top_p_min_p(logits, [0], [0.5], [0.0])[0]) == [0, 1, 2]
    assert kept(apply_top_k_top_p_min_p(logits, [0], [0.4], [0.0])[0]) == [0, 1]


def test_min_p_relative_to_the_most_probable() -> None:
    logits = logits_of([0.05, 0.5, 0.2, 0.25])

    def min_p(m: float) -> list[int]:
        return kept(apply_top_k_top_p_min_p(logits, [0], [1.0], [m])[0])

    assert min_p(0.0) == [0, 1, 2, 3]
    assert min_p(0.1) == [0, 1, 2, 3]  # threshold 0.05: 0.05 stays
    assert min_p(0.11) == [1, 2, 3]
    assert min_p(0.4) == [1, 2, 3]  # threshold 0.2
    assert min_p(0.5) == [1, 3]  # threshold 0.25
    assert min_p(1.0) == [1]


def test_min_p_keeps_all_ties_of_the_maximum() -> None:
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert kept(apply_top_k_top_p_min_p(logits, [0], [1.0], [1.0])[0]) == [1, 2]


def test_filters_are_per_row_and_do_not_mutate() -> None:
    logits = logits_of([0.5, 0.1, 0.3, 0.1]).expand(4, -1).contiguous()
    before = logits.clone()
    out = apply_top_k_top_p_min_p(logits, [1, 0, 0, 3], [1.0, 0.8, 1.0, 0.6], [0.0, 0.0, 0.5, 0.0])
    assert [kept(row) for row in out] == [[0], [0, 2], [0, 2], [0, 2]]
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- the sampler


def test_greedy_takes_argmax_of_penalised_logits() -> None:
    logits = torch.tensor([[3.0, 2.5, 1.0]])
    ids = Sampler()(logits, [sp(temperature=0.0)], [[]], [[]], [None])
    assert ids.tolist() == [0] and ids.dtype == torch.int64
    ids = Sampler()(logits, [sp(temperature=0.0, repetition_penalty=1.5)], [[0]], [[]], [None])
    assert ids.tolist() == [1]  # 3 / 1.5 = 2 < 2.5
    ids = Sampler()(logits, [sp(temperature=0.0, frequency_penalty=1.0)], [[]], [[0, 1]], [None])
    assert ids.tolist() == [0]  # 2 > 1.5 > 1


def test_greedy_consumes_no_randomness() -> None:
    g = make_generator(7)
    state = g.get_state()
    global_state = torch.get_rng_state()
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    Sampler()(logits, [sp(temperature=0.0)] * 3, [[]] * 3, [[]] * 3, [g, None, g])
    assert torch.equal(g.get_state(), state)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_sampler_does_not_mutate_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    before = logits.clone()
    Sampler()(
        logits, [sp(temperature=0.7, top_k=2, repetition_penalty=1.3)], [[0]], [[1]], [make_generator(0)]
    )
    assert torch.equal(logits, before)


def test_same_seed_same_sequence_different_seed_differs() -> None:
    logits = torch.zeros(1, 8)  # uniform: any two seeds' sequences of 200 draws differ with certainty
    params = sp(temperature=1.0)

    def run(seed: int) -> list[int]:
        g = make_generator(seed)
        return [Sampler()(logits, [params], [[]], [[]], [g]).item() for _ in range(200)]

    a, b, c = run(123), run(123), run(124)
    assert a == b
    assert a != c
    assert sum(x == y for x, y in zip(a, c, strict=True)) < 60  # ~25 expected by chance
    assert len(set(a)) == 8


def test_top_k_1_equals_greedy() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 50, generator=gen)
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1  # a tie for the top
    greedy = Sampler()(logits, [sp(temperature=0.0)] * 16, [[]] * 16, [[]] * 16, [None] * 16)
    for seed in range(5):
        g = make_generator(seed)
        ids = Sampler()(logits, [sp(temperature=1.5, top_k=1)] * 16, [[]] * 16, [[]] * 16, [g] * 16)
        assert torch.equal(ids, greedy)
    assert greedy[3].item() == 7


def test_tiny_temperature_is_finite_and_picks_the_max() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.9, -50.0]])
    ids = Sampler()(logits, [sp(temperature=1e-30)], [[]], [[]], [make_generator(0)])
    assert ids.tolist() == [1]


def test_filtered_tokens_are_never_drawn() -> None:
    logits = torch.tensor([2.0, 0.0, 1.9, 1.8, -1.0])
    freq = draw_frequencies(logits, sp(temperature=5.0, top_k=2), 3000, seed=3)
    assert freq[1] == freq[3] == freq[4] == 0
    assert freq[0] > 0.4 and freq[2] > 0.4


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (sp(temperature=1.0), [0.5, 0.3, 0.15, 0.05]),
        # temperature 2: p ** (1/2), renormalised (the square roots sum to 1.86573)
        (sp(temperature=2.0), [0.37899, 0.29356, 0.20758, 0.11985]),
        (sp(temperature=1.0, top_k=2), [0.625, 0.375, 0.0, 0.0]),
        (sp(temperature=1.0, top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (sp(temperature=1.0, min_p=0.5), [0.625, 0.375, 0.0, 0.0]),
    ],
)
def test_sampled_frequencies_match_the_distribution(params: SamplingParams, expected: list[float]) -> None:
    assert sum(expected) == pytest.approx(1.0, abs=1e-4)
    freq = draw_frequencies(logits_of([0.5, 0.3, 0.15, 0.05])[0], params, 20000, seed=2024)
    # One standard deviation is at most sqrt(0.25 / 20000) = 0.0035.
    assert freq.tolist() == pytest.approx(expected, abs=0.012)
    for f, e in zip(freq.tolist(), expected, strict=True):
        if e == 0.0:
            assert f == 0.0


def test_batched_rows_match_one_row_at_a_time() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 40, generator=gen) * 2
    params = [
        sp(temperature=0.0, repetition_penalty=1.3),
        sp(temperature=0.8, top_k=5, presence_penalty=0.5),
        sp(temperature=1.2, top_p=0.7, frequency_penalty=0.3),
        sp(temperature=1.0, min_p=0.2, repetition_penalty=0.9),
        sp(temperature=0.5, top_k=10, top_p=0.9, min_p=0.05),
    ]
    prompts = [[1, 2, 3], [4, 5], [], [6, 6, 7], [8]]
    outputs = [[9, 9], [10], [11, 12, 11], [], [13]]

    # Filters: the batched call treats each row with its own values.
    temps = [p.temperature for p in params]
    batched = apply_top_k_top_p_min_p(
        apply_temperature(apply_penalties(logits, params, prompts, outputs), temps),
        [p.top_k for p in params],
        [p.top_p for p in params],
        [p.min_p for p in params],
    )
    for i, p in enumerate(params):
        one = apply_top_k_top_p_min_p(
            apply_temperature(
                apply_penalties(logits[i : i + 1], [p], [prompts[i]], [outputs[i]]), [p.temperature]
            ),
            [p.top_k],
            [p.top_p],
            [p.min_p],
        )
        assert torch.equal(batched[i : i + 1], one)

    # Draws: with per-row seeds a row's tokens do not depend on its neighbours.
    sampler = Sampler()
    gens = [make_generator(100 + i) for i in range(5)]
    together = [sampler(logits, params, prompts, outputs, gens).tolist() for _ in range(20)]
    alone = []
    for i in range(5):
        g = make_generator(100 + i)
        alone.append(
            [
                sampler(logits[i : i + 1], [params[i]], [prompts[i]], [outputs[i]], [g]).item()
                for _ in range(20)
            ]
        )
    assert [list(col) for col in zip(*together, strict=True)] == alone


def test_sample_from_logits_uses_one_draw_per_row() -> None:
    logits = torch.tensor([[0.0, NEG_INF, 0.0], [NEG_INF, 5.0, NEG_INF]])
    g1, g2 = make_generator(9), make_generator(9)
    ids = sample_from_logits(logits, [g1, None])
    assert ids[1].item() == 1 and ids[0].item() in (0, 2)
    torch.rand((), generator=g2, dtype=torch.float64)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_make_generator() -> None:
    assert make_generator(None) is None
    a, b = make_generator(42), make_generator(42)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 3), [sp()], [[]], [[]], [None])
    with pytest.raises(ValueError):
        apply_temperature(torch.zeros(2, 3), [1.0, 1.0, 1.0])


# ---------------------------------------------------------------- logprobs


def test_compute_logprobs_uses_raw_logits() -> None:
    logits = logits_of([0.5, 0.25, 0.125, 0.125]).expand(2, -1).contiguous() + 3.0  # shift-invariant
    result = compute_logprobs(logits, torch.tensor([1, 3]), top_n=2)
    assert result.token_logprobs.tolist() == pytest.approx([math.log(0.25), math.log(0.125)], abs=1e-6)
    assert result.top_ids.tolist() == [[0, 1], [0, 1]]
    assert result.top_logprobs[0].tolist() == pytest.approx([math.log(0.5), math.log(0.25)], abs=1e-6)
    empty = compute_logprobs(logits, torch.tensor([0, 0]), top_n=0)
    assert empty.top_ids.shape == (2, 0)
    assert compute_logprobs(logits, torch.tensor([0, 0]), top_n=99).top_ids.shape == (2, 4)


# ---------------------------------------------------------------- against a plain reference, large vocabularies


def reference_keep(row: list[float], k: int, p: float, m: float) -> set[int]:
    """The filters written out one token at a time, in float64."""
    vocab = len(row)
    order = sorted(range(vocab), key=lambda i: (-row[i], i))
    keep = order[:k] if 0 < k < vocab else order
    if p < 1:
        z = sum(math.exp(row[i]) for i in keep)
        nucleus, mass = [], 0.0
        for i in keep:
            nucleus.append(i)
            mass += math.exp(row[i]) / z
            if mass >= p:
                break
        keep = nucleus
    if m > 0:
        best = max(row[i] for i in keep)
        keep = [i for i in keep if math.exp(row[i] - best) >= m]
    return set(keep)


def random_case(gen: torch.Generator, vocab: int, batch: int) -> tuple[torch.Tensor, list, list, list]:
    logits = torch.randn(batch, vocab, generator=gen) * torch.rand(batch, 1, generator=gen) * 8
    # Some rows with many ties.
    logits[::3] = torch.randint(-4, 3, (len(logits[::3]), vocab), generator=gen).float()
    pick = lambda options: [options[int(i)] for i in torch.randint(len(options), (batch,), generator=gen)]  # noqa: E731
    return (
        logits,
        pick([0, -1, 1, 2, 5, 20, 70]),
        pick([1.0, 0.05, 0.5, 0.8, 0.95, 0.99]),
        pick([0.0, 0.01, 0.1, 0.6]),
    )


@pytest.mark.parametrize("vocab", [7, 40, 3000])
def test_filters_match_the_reference(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    for _ in range(4 if vocab > 100 else 20):
        logits, ks, ps, ms = random_case(gen, vocab, 12)
        out = apply_top_k_top_p_min_p(logits, ks, ps, ms)
        for b in range(len(logits)):
            assert set(kept(out[b])) == reference_keep(logits[b].tolist(), ks[b], ps[b], ms[b]), (
                ks[b],
                ps[b],
                ms[b],
            )
            assert torch.equal(out[b][out[b] != NEG_INF], logits[b][out[b] != NEG_INF])


def test_nucleus_shortcut_equals_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    import qwen_engine.engine.sampler as sampler_module

    gen = torch.Generator().manual_seed(11)
    vocab = 4096
    logits = torch.randn(8, vocab, generator=gen) * torch.tensor(
        [[1.0], [2], [4], [8], [12], [16], [24], [32]]
    )
    logits[5, :700] = logits[5].max() + 1  # a tie wider than the shortcut's candidates
    top_p = [0.5, 0.9, 0.95, 0.99, 0.9, 0.9, 0.3, 0.999]

    undecided = []
    original = sampler_module._top_p_rows_

    def spy(*args, **kwargs):
        left = original(*args, **kwargs)
        if not kwargs["complete"]:
            undecided.append(len(left))
        return left

    monkeypatch.setattr(sampler_module, "_top_p_rows_", spy)
    fast = apply_top_k_top_p_min_p(logits, [0] * 8, top_p, [0.0] * 8)
    assert undecided and 0 < undecided[0] < 8  # both ways were taken
    monkeypatch.setattr(sampler_module, "_NUCLEUS_PREFETCH", vocab)
    slow = apply_top_k_top_p_min_p(logits, [0] * 8, top_p, [0.0] * 8)
    assert torch.equal(fast, slow)
    for b in range(8):
        assert set(kept(fast[b])) == reference_keep(logits[b].tolist(), 0, top_p[b], 0.0)


def test_candidate_draws_equal_full_vocabulary_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    import qwen_engine.engine.sampler as sampler_module

    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(6, 5000, generator=gen) * 2
    filtered = apply_top_k_top_p_min_p(logits, [1, 10, 60, 200, 900, 0], [1.0] * 6, [0.0] * 6)

    def draws() -> list[list[int]]:
        gens = [make_generator(7 + i) for i in range(6)]
        return [sample_from_logits(filtered, gens).tolist() for _ in range(30)]

    fast = draws()
    monkeypatch.setattr(sampler_module, "_CANDIDATE_WIDTHS", ())
    assert draws() == fast
    for step in fast:
        assert all(filtered[b, t] != NEG_INF for b, t in enumerate(step))


def test_bfloat16_logits_are_accepted() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]], dtype=torch.bfloat16)
    params = [sp(temperature=0.0, repetition_penalty=2.0)]
    assert Sampler()(logits, params, [[1]], [[]], [None]).tolist() == [2]
    ids = Sampler()(logits, [sp(temperature=1.0, top_k=2)], [[]], [[]], [make_generator(0)])
    assert ids.tolist()[0] in (1, 2)


@pytest.mark.parametrize("rows,n", [(1, 151936), (8, 151936), (3, 17), (2, 5), (4, 48)])
def test_native_argmax_equals_torch(rows, n):
    from qwen_engine import kernels

    native = kernels.native()
    if native is None:
        pytest.skip("no native kernels here: the sampler uses torch.argmax itself")
    gen = torch.Generator().manual_seed(rows * n)
    x = torch.randn(rows, n, generator=gen)
    cases = [x, x.round()]  # rounding makes many ties: the first maximal index must win
    tied = torch.zeros(rows, n)
    tied[:, n // 3] = tied[:, n - 1] = 5.0  # a tie across the vector body and the tail
    cases.append(tied)
    cases.append(torch.full((rows, n), -math.inf))
    special = x.clone()
    special[0, n // 2] = math.inf
    special[-1, n - 1] = math.nan  # NaN counts as the largest
    special[-1, n // 4] = math.nan  # ... and the first NaN wins
    cases.append(special)
    cases.append(x.t().contiguous().t())  # not contiguous
    for case in cases:
        assert torch.equal(native.argmax_rows(case), case.argmax(dim=-1))
