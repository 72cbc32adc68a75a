"""A request inside the engine: its tokens, its blocks, how far it has been computed, and its output state."""

from __future__ import annotations

import enum
import itertools
import random

import torch

from ..text.detokenizer import IncrementalDetokenizer
from .block_manager import BlockTable
from .sampling_params import SamplingParams
from .stop_strings import StopStrings

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer,
        stop_token_ids: set[int],
        request_id: str | None = None,
        device: torch.device | str = "cpu",
    ):
        self.seq_id = next(_ids)
        self.request_id = request_id or f"req-{self.seq_id}"
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.table = BlockTable()
        self.num_computed = 0  # tokens whose k/v are in the cache
        self.num_cached_prompt = 0  # prompt tokens served by the prefix cache (for statistics)
        self.max_tokens = params.max_tokens
        self.stop_token_ids = stop_token_ids
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.stops = StopStrings(params.stop or [])
        self.finish_reason: str | None = None
        self.pending_text = ""  # text produced but not yet handed to the caller
        self.pending_ids: list[int] = []
        self.guide = None  # engine.Guide constraining the tokens, if any
        # (token log-prob, [(id, log-prob) of the most likely tokens]) per token not yet handed out
        self.pending_logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.vision = None  # vision.prompt.Prompt when the prompt holds images or videos
        self.block_extras: list[bytes] = []  # per block, content hashes mixed into its prefix-cache name
        self.dry_breakers: frozenset[int] = frozenset()  # token ids DRY's matches may not cross

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token_id: int) -> None:
        """Add a sampled token and work out its text and whether the sequence is done."""
        self.output_ids.append(token_id)
        self.pending_ids.append(token_id)
        if token_id in self.stop_token_ids:
            self._finish("stop", self.stops.flush(self.detokenizer.flush()))
            return
        if len(self.output_ids) < (self.params.min_tokens or 0):  # too early for stop strings (as in vLLM)
            text = self.detokenizer.add(token_id)
            if len(self.output_ids) >= self.max_tokens:  # the context ran out first
                self._finish("length", text + self.detokenizer.flush())
            else:
                self.pending_text += text
            return
        text, hit = self.stops.feed(self.detokenizer.add(token_id))
        if hit:
            self._finish("stop", text)
        elif len(self.output_ids) >= self.max_tokens:
            self._finish("length", text + self.stops.flush(self.detokenizer.flush()))
        else:
            self.pending_text += text

    def _finish(self, reason: str, text: str) -> None:
        self.pending_text += text
        self.finish_reason = reason
        self.status = Status.FINISHED

    def end(self, reason: str) -> None:
        """Finish from outside the token stream (cancelled, or out of room): flush whatever text is held."""
        if not self.finished:
            self._finish(reason, self.stops.flush(self.detokenizer.flush()))
