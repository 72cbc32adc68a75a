"""The generation loop for one sequence: prefill the prompt, then sample token by token until a stop.

Text is produced here too, incrementally, because stop strings are defined on text: a delta is held back
while it could still be the start of a stop string, so a stream never shows part of one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import ContextLengthError, InputError
from ..text.detokenizer import IncrementalDetokenizer
from .kv_cache import KVCache
from .sampler import Sampler
from .sampling_params import SamplingParams

PREFILL_CHUNK = 1024  # tokens per prefill step: bounds the attention scores' memory on long prompts


@dataclass
class Step:
    """One generated token: its id, the text it completed (may be empty), and why generation ended, if it did."""

    token_id: int
    text: str
    finish_reason: str | None = None


class Generator:
    def __init__(self, model: torch.nn.Module, tokenizer, eos_token_ids: list[int], max_model_len: int):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = max_model_len
        self.sampler = Sampler()
        cfg = model.config
        self._cache_shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise InputError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens, but the model's context holds {self.max_model_len} "
                f"(including at least one generated token)"
            )
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(*self._cache_shape, capacity=capacity, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Run the tokens after the cache's contents; logits of the last token (or of every token)."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        outputs = []
        for start in range(0, len(token_ids), PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK]
            positions = torch.arange(cache.length, cache.length + len(chunk), device=self.device)
            hidden = self.model(chunk, positions, cache)
            cache.commit(len(chunk))
            outputs.append(self.model.compute_logits(hidden if all_logits else hidden[-1:]))
        return torch.cat(outputs) if all_logits else outputs[-1][-1]

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Step]:
        """Yield one Step per generated token. `params` must be resolved (no None sampling fields)."""
        self.check_prompt(prompt_ids)
        room = self.max_model_len - len(prompt_ids)
        max_tokens = min(params.max_tokens or room, room)
        cache = self.new_cache(len(prompt_ids) + max_tokens)
        stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        stops = StopStrings(params.stop or [])
        output: list[int] = []

        logits = self.prefill(prompt_ids, cache)
        while True:
            token = int(self.sampler(logits[None], [params], [prompt_ids], [output], [generator])[0])
            output.append(token)
            if token in stop_ids:
                yield Step(token, stops.flush(detok.flush()), "stop")
                return
            text, hit = stops.feed(detok.add(token))
            if hit:
                yield Step(token, text, "stop")
                return
            if len(output) >= max_tokens:
                yield Step(token, text + stops.flush(detok.flush()), "length")
                return
            yield Step(token, text)
            logits = self.prefill([token], cache)


class StopStrings:
    """Cuts the text at the first stop string; holds back a tail that might be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = self._partial_tail()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self, text: str = "") -> str:
        """The rest of the text at the end of generation (a held-back tail was not a stop string after all)."""
        out, hit = self.feed(text)
        if hit:
            return out
        rest, self.pending = self.pending, ""
        return out + rest

    def _partial_tail(self) -> int:
        # Longest suffix of the pending text that is a proper prefix of some stop string.
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best
