"""DRY against a plain transcription of its author's rule, in the sampler, and end to end in the engine."""

from __future__ import annotations

import random

import pytest
import torch

from qwen_engine import SamplingParams
from qwen_engine.engine.dry import MAX_MATCH, breaker_ids, dry_penalties
from qwen_engine.engine.sampler import Sampler
from qwen_engine.errors import InputError


def reference(context, breakers, multiplier, base, allowed_length, last_n=-1) -> dict[int, float]:
    """p-e-w's DRY as text-generation-webui writes it, one earlier occurrence at a time."""
    ids = context[-last_n:] if last_n > 0 else context
    if len(ids) < 2 or ids[-1] in breakers:
        return {}
    longest: dict[int, int] = {}
    for i in range(len(ids) - 1):
        if ids[i] != ids[-1] or ids[i + 1] in breakers:
            continue
        length = 1
        while length < MAX_MATCH:
            j = i - length
            if j < 0 or ids[j] != ids[-(length + 1)] or ids[-(length + 1)] in breakers:
                break
            length += 1
        longest[ids[i + 1]] = max(length, longest.get(ids[i + 1], 0))
    return {t: multiplier * base ** (n - allowed_length) for t, n in longest.items() if n >= allowed_length}


def as_dict(result) -> dict[int, float]:
    tokens, penalties = result
    return dict(zip(tokens.tolist(), penalties.tolist(), strict=True))


def test_a_repeat_of_two_tokens_penalises_what_followed_it() -> None:
    # "a b c ... a b": c would make "a b c" again.
    got = as_dict(dry_penalties([1, 2, 3, 9, 1, 2], frozenset(), 0.8, 1.75, 2))
    assert got == pytest.approx({3: 0.8})
    longer = as_dict(dry_penalties([1, 2, 3, 4, 9, 1, 2, 3], frozenset(), 0.8, 1.75, 2))
    assert longer == pytest.approx({4: 0.8 * 1.75})
    assert as_dict(dry_penalties([1, 2, 3, 9, 1, 2], frozenset(), 0.8, 1.75, 3)) == {}  # 2 tokens allowed
    assert as_dict(dry_penalties([1, 2, 3, 9, 1, 2], frozenset({9}), 0.8, 1.75, 2)) == pytest.approx({3: 0.8})
    assert as_dict(dry_penalties([1, 2, 3, 9, 1, 2], frozenset({1}), 0.8, 1.75, 2)) == {}  # a breaker stops it


def test_matches_the_reference_on_random_repetitive_text() -> None:
    rng = random.Random(3)
    for _ in range(400):
        alphabet = rng.randint(2, 8)
        phrase = [rng.randrange(alphabet) for _ in range(rng.randint(1, 6))]
        context = []
        while len(context) < rng.randint(2, 160):
            context += phrase if rng.random() < 0.5 else [rng.randrange(alphabet)]
        breakers = frozenset(rng.sample(range(alphabet), rng.randint(0, 2)))
        args = (breakers, rng.choice([0.5, 0.8, 2.0]), rng.choice([1.0, 1.75, 3.0]), rng.randint(1, 4),
                rng.choice([-1, 0, 5, 40]))
        assert as_dict(dry_penalties(context, *args)) == pytest.approx(reference(context, *args)), (context, args)


def test_long_matches_stop_at_fifty() -> None:
    context = list(range(100)) + list(range(99))
    assert as_dict(dry_penalties(context, frozenset(), 1.0, 2.0, 2)) == pytest.approx({99: 2.0 ** (MAX_MATCH - 2)})


def test_the_sampler_applies_it_per_row() -> None:
    params = [SamplingParams(temperature=0, dry_multiplier=5.0).with_defaults(SamplingParams()),
              SamplingParams(temperature=0).with_defaults(SamplingParams())]
    logits = torch.tensor([[0.0, 0.0, 0.0, 3.0, 2.0]] * 2)
    chosen = Sampler()(logits, params, [[1, 2, 3, 0], [1, 2, 3, 0]], [[1, 2], [1, 2]], [None, None],
                       [frozenset(), frozenset()])
    assert chosen.tolist() == [4, 3]  # token 3 would repeat "1 2 3": -5 for the DRY row only


@pytest.mark.parametrize(
    ("field", "value"),
    [("dry_multiplier", -1), ("dry_base", 0.5), ("dry_allowed_length", 0), ("dry_penalty_last_n", -2),
     ("dry_sequence_breakers", ["", "x"]), ("dry_multiplier", float("inf"))],
)
def test_bad_settings_are_refused(field, value) -> None:
    with pytest.raises(InputError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field


def test_the_engine_applies_it_over_prompt_and_answer(demo_llm) -> None:
    """Greedy decoding with DRY in the engine equals a step-by-step loop over the model's logits with
    dry_penalties applied by hand (the prompt makes the model repeat itself, so DRY has work to do)."""
    prompt = "Repeat the sentence 'I like cats.' ten times."
    ids = demo_llm.tokenizer.encode(demo_llm.apply_chat_template([{"role": "user", "content": prompt}]))
    settings = dict(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    out = demo_llm.chat([{"role": "user", "content": prompt}],
                        SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.0, **settings))
    breakers = breaker_ids(demo_llm.tokenizer, ["\n", ":", '"', "*"])
    tokens: list[int] = []
    penalised = 0
    for _ in range(24):
        raw = demo_llm.logits(ids + tokens)[-1]
        found, penalties = dry_penalties(ids + tokens, breakers, 0.8, 1.75, 2)
        logits = raw.clone()
        logits[found] -= penalties
        penalised += int(logits.argmax() != raw.argmax())
        tokens.append(int(logits.argmax()))
        if tokens[-1] in demo_llm.engine.eos_token_ids:
            break
    assert out.token_ids == tokens
    assert penalised > 0  # DRY changed at least one greedy choice
