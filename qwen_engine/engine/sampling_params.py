"""What a caller may ask of sampling, validated up front so bad values never reach the model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import InputError


@dataclass
class SamplingParams:
    """Per-request sampling settings. `None` means "the model's default" (its generation config).

    temperature 0 means greedy. top_k 0 (or -1), top_p 1 and min_p 0 switch those filters off.
    repetition_penalty multiplies down the logits of every token already in the prompt or the answer (as in
    transformers and vLLM); presence_penalty and frequency_penalty subtract from tokens in the answer (as in
    OpenAI's API). dry_* is the DRY penalty on tokens that would extend a repetition (engine/dry.py; llama.cpp's
    names and defaults). logit_bias adds its value (-100 to 100, as OpenAI allows) to the logits of the given token
    ids before anything else, greedy included: -100 all but bans a token, 100 all but forces it. The same seed
    gives the same output.
    """

    max_tokens: int | None = None
    min_tokens: int | None = None  # no end of sequence (EOS, stop_token_ids, stop strings) before this many tokens
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[int, float] | None = None
    dry_multiplier: float | None = None  # DRY (engine/dry.py): 0 is off; 0.8 is its author's suggestion
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None  # look at this many last tokens (-1 or 0: all of them)
    dry_sequence_breakers: list[str] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: off; n >= 0: the chosen token's log-prob and the n most likely
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def finite(name: str, value: float | None) -> None:
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise InputError(f"{name} must be a finite number, got {value!r}", param=name)

        for f in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            finite(f, getattr(self, f))
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise InputError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", param="max_tokens")
        if self.min_tokens is not None and (not isinstance(self.min_tokens, int) or self.min_tokens < 0):
            raise InputError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}", param="min_tokens")
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InputError(f"min_tokens ({self.min_tokens}) is above max_tokens ({self.max_tokens})",
                             param="min_tokens")
        if self.temperature is not None and self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < -1):
            raise InputError(f"top_k must be an integer >= -1 (0 or -1 disable it), got {self.top_k!r}", param="top_k")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}", param="repetition_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= value <= 2:
                raise InputError(f"{name} must be in [-2, 2], got {value}", param=name)
        if self.seed is not None and (not isinstance(self.seed, int) or not _SEED_MIN <= self.seed <= _SEED_MAX):
            raise InputError(f"seed must be an integer in [{_SEED_MIN}, {_SEED_MAX}], got {self.seed!r}",
                             param="seed")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise InputError("stop must be a string or a list of non-empty strings", param="stop")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise InputError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}", param="logprobs")
        if self.stop_token_ids is not None and not all(isinstance(t, int) for t in self.stop_token_ids):
            raise InputError("stop_token_ids must be a list of integers", param="stop_token_ids")
        if self.logit_bias is not None:
            self.logit_bias = _checked_logit_bias(self.logit_bias)
        self._validate_dry()

    def _validate_dry(self) -> None:
        for name in ("dry_multiplier", "dry_base"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise InputError(f"{name} must be a finite number >= 0, got {value!r}", param=name)
        if self.dry_base is not None and self.dry_base < 1:
            raise InputError(f"dry_base must be >= 1, got {self.dry_base}", param="dry_base")
        for name, lowest in (("dry_allowed_length", 1), ("dry_penalty_last_n", -1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < lowest):
                raise InputError(f"{name} must be an integer >= {lowest}, got {value!r}", param=name)
        breakers = self.dry_sequence_breakers
        if breakers is not None and (
            not isinstance(breakers, list) or not all(isinstance(b, str) and b for b in breakers)
        ):
            raise InputError("dry_sequence_breakers must be a list of non-empty strings", param="dry_sequence_breakers")

    def with_defaults(self, defaults: SamplingParams) -> SamplingParams:
        """A copy whose unset (None) fields are taken from `defaults`, then from the engine's fallbacks."""
        merged = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                value = getattr(defaults, f.name)
            if value is None:
                value = FALLBACKS.get(f.name)
            merged[f.name] = value
        return replace(self, **merged)

    @property
    def greedy(self) -> bool:
        return not self.temperature


# What torch.Generator.manual_seed takes: a signed or an unsigned 64-bit integer.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _checked_logit_bias(bias: Any) -> dict[int, float]:
    # JSON object keys are strings, so "1234" is accepted for token 1234 (as OpenAI's API sends them).
    if not isinstance(bias, dict):
        raise InputError("logit_bias must map token ids to numbers", param="logit_bias")
    checked: dict[int, float] = {}
    for key, value in bias.items():
        token = key
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            token = int(key)
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise InputError(f"logit_bias keys must be token ids (non-negative integers), got {key!r}",
                             param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"logit_bias[{key!r}] must be a finite number, got {value!r}", param="logit_bias")
        if not -100 <= value <= 100:
            raise InputError(f"logit_bias[{key!r}] must be in [-100, 100], got {value}", param="logit_bias")
        checked[token] = float(value)
    return checked


# Used when neither the caller nor the model's generation config says otherwise (transformers' defaults).
FALLBACKS: dict[str, Any] = {
    "min_tokens": 0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "stop": [],
    "stop_token_ids": [],
    # DRY as llama.cpp sets it: off, and when on, base 1.75, repeats of 2 tokens allowed, the whole context.
    "dry_multiplier": 0.0,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "dry_penalty_last_n": -1,
}
