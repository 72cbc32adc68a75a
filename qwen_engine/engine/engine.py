"""The engine: requests in, one batched model step at a time, tokens and text out.

    engine = Engine(model, tokenizer, eos_token_ids, max_model_len)
    seq = engine.add_request(prompt_ids, params)
    while engine.has_work():
        for seq in engine.step(): ...   # sequences that produced tokens this step
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import ContextLengthError, InputError
from ..models.heap import settle_thresholds
from ..models.qwen import VisualRows
from ..vision.prompt import Prompt, VisionItem
from .block_manager import BlockManager
from .dry import DEFAULT_BREAKERS, breaker_ids
from .kv_cache import KVCache, PagedBatch, PagedKVCache, SequenceSlice
from .recurrent_state import RecurrentBatch, RecurrentStatePool
from .sampler import Sampler, compute_logprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence


class Guide(Protocol):
    """Constrains sampling to a grammar (see engine/guided.py)."""

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor: ...  # [vocab] → [vocab], banned = -inf

    def accept(self, token_id: int) -> None: ...


DEFAULT_KV_CACHE_MEMORY = 1 << 30  # 1 GiB: ~43k tokens of the 0.5B demo model in float32


@dataclass
class EngineConfig:
    max_model_len: int
    kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY
    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_tokens_alone: int = 2048  # a step's token budget when a single sequence runs (a lone prompt's prefill)
    enable_prefix_caching: bool = True
    vision_cache_memory: int = 256 << 20  # bytes of vision encoder outputs kept for reuse
    # Keys and values stored in this type (None: the model's). float16/bfloat16 for a float32 model halve the
    # cache's memory and what a decode step reads of it; lossy (kv_cache.py). bfloat16: bf16 decode products.
    kv_cache_dtype: torch.dtype | None = None
    # Hybrid models (Qwen3.5) with prefix caching: how many recurrent states to keep at block boundaries for later
    # requests to resume from (engine/recurrent_state.py); each is the size of one sequence's state.
    state_snapshots: int = 16


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, eos_token_ids: list[int], config: EngineConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.config = config
        settle_thresholds()  # prefill activations reuse freed heap blocks, not fresh mappings (models/heap.py)
        cfg = model.config
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.kv_dtype = config.kv_cache_dtype or self.dtype
        kv_layers = len(cfg.attention_layers)  # hybrid models keep keys and values in their attention layers only
        self.states = None
        if cfg.linear_attention is not None:
            # Each running sequence holds one slot of recurrent state; prefix caching resumes only where a state
            # was saved (engine/recurrent_state.py).
            snapshots = config.state_snapshots if config.enable_prefix_caching else 0
            self.states = RecurrentStatePool(cfg.linear_attention, config.max_num_seqs, self.dtype, self.device,
                                             snapshots)
        per_block = PagedKVCache.bytes_per_block(
            kv_layers, cfg.num_kv_heads, cfg.head_dim, config.block_size, self.kv_dtype
        )
        num_blocks = config.kv_cache_memory // per_block
        if num_blocks < 2:
            raise InputError(
                f"kv cache memory of {config.kv_cache_memory} bytes holds fewer than 2 blocks "
                f"({per_block} bytes each)"
            )
        self.cache = PagedKVCache(
            kv_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks, config.block_size, self.kv_dtype, self.device
        )
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.blocks, config.max_num_seqs, config.max_num_batched_tokens, config.max_tokens_alone,
            on_release=self.states.release if self.states is not None else None,
            resumable=self.states.has_snapshot if self.states is not None else None,
        )
        self.sampler = Sampler()
        # Encoder outputs by content hash: the same image in another request (or turn) is not encoded again.
        self.vision_cache: OrderedDict[bytes, tuple[torch.Tensor, list[torch.Tensor]]] = OrderedDict()
        self.vision_cache_bytes = config.vision_cache_memory

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    # -- requests --------------------------------------------------------------------------------------------

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams | None = None) -> None:
        """Raise InputError for a request that can never run: callers check before queueing anything."""
        if not prompt_ids:
            raise InputError("the prompt is empty")
        limit = self.config.max_model_len
        if len(prompt_ids) >= limit:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens, but the model's context holds {limit} "
                f"(including at least one generated token)"
            )
        if len(prompt_ids) >= self.capacity_tokens:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens, but the whole KV cache holds {self.capacity_tokens}; "
                f"give it more memory (kv_cache_memory)"
            )
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InputError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        bad = next((t for t in (params.logit_bias or {}) if t >= vocab), None) if params is not None else None
        if bad is not None:
            raise InputError(f"logit_bias names token id {bad}, outside the vocabulary (0..{vocab - 1})",
                             param="logit_bias")

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        guide: Guide | None = None,
        vision: Prompt | None = None,
    ) -> Sequence:
        """Queue a request. `params` must be resolved (see SamplingParams.with_defaults). A `guide` constrains
        which tokens may be sampled (structured output). `vision` is the Prompt whose images and videos
        `prompt_ids` holds (its token_ids), with their M-RoPE positions."""
        self.check_prompt(prompt_ids, params)
        self._check_vision(prompt_ids, vision)
        room = self.config.max_model_len - len(prompt_ids)
        stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        seq = Sequence(prompt_ids, params, self.tokenizer, stop_ids, request_id, self.device)
        seq.max_tokens = min(params.max_tokens or room, room)
        seq.guide = guide
        if params.dry_multiplier:
            breakers = params.dry_sequence_breakers
            seq.dry_breakers = breaker_ids(self.tokenizer, DEFAULT_BREAKERS if breakers is None else breakers)
        if vision is not None and vision.positions is not None:
            seq.vision = vision
            seq.block_extras = vision.block_extras(self.config.block_size)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Cancel a request: its blocks are free at once."""
        if not seq.finished:
            seq.end("abort")
        self.scheduler.finish(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _save_state(self, seq: Sequence) -> None:
        """Save a hybrid model's recurrent state where a later request may resume: at the prompt's last block
        boundary, and at the newest block boundary of the answer (replacing the one before)."""
        bs, done = self.blocks.block_size, seq.num_computed
        if done % bs or not done:
            return
        boundary = self.scheduler.state_boundary(seq)
        if done == boundary:
            self.states.save(seq, seq.table.hashes[done // bs - 1])
        elif done > boundary:
            self.states.save(seq, seq.table.hashes[done // bs - 1], replaces_latest=True)

    # -- one step --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run one batched forward pass; return the sequences that gained a token (or finished) in it."""
        chunks = self.scheduler.schedule()
        ended, self.scheduler.forced = self.scheduler.forced, []
        if not chunks:
            return ended
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        visual: list[tuple[int, VisionItem, torch.Tensor]] = []  # (batch row of item row 0, item, rows used)
        writes, slices, sample_rows, sampled, state_rows = [], [], [], [], []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed
            end = start + chunk.num_tokens
            if self.states is not None:
                # (A prefix from the prefix cache ends where a state was saved: BlockManager.match_prefix.)
                resumes = start and id(seq) not in self.states.owner
                resume = seq.table.hashes[start // self.blocks.block_size - 1] if resumes else None
                state_rows.append((len(ids), len(ids) + chunk.num_tokens, self.states.slot_for(seq, start == 0, resume)))
            visual.extend((len(ids) - start, item, used) for item, used in _items_in(seq.vision, start, end))
            ids.extend(seq.token_ids[start:end])
            positions.append(_positions(seq, start, end))
            context = self.cache.slots(seq.table.block_ids, 0, end)
            writes.append(context[start:end])
            row = len(ids)
            slices.append(SequenceSlice(row - chunk.num_tokens, row, context))
            if end == seq.num_tokens:  # the chunk reaches the end: its last row's logits pick the next token
                sample_rows.append(row - 1)
                sampled.append(seq)
        recurrent = None
        if self.states is not None:
            recurrent = RecurrentBatch.build(self.states.conv, self.states.delta, state_rows)
        batch = PagedBatch(self.cache, torch.cat(writes), slices, recurrent)
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=self.device),
            _stack_positions(positions).to(self.device),
            batch,
            self._visual_rows(visual),
        )
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed += chunk.num_tokens
            self.blocks.register_full_blocks(seq.table, seq.token_ids, seq.num_computed, seq.block_extras)
            if self.states is not None and self.config.enable_prefix_caching:
                self._save_state(seq)
        if not sampled:
            return ended
        logits = self.model.compute_logits(hidden[sample_rows])
        wants_logprobs = [row for row, seq in enumerate(sampled) if seq.params.logprobs is not None]
        raw = logits[wants_logprobs].clone() if wants_logprobs else None  # before penalties and grammar masks
        for row, seq in enumerate(sampled):
            if seq.guide is not None:
                logits[row] = seq.guide.mask_logits(logits[row])
            if len(seq.output_ids) < (seq.params.min_tokens or 0):
                self._hold_off_the_end(logits, row, seq)
        tokens = self.sampler(
            logits,
            [s.params for s in sampled],
            [s.prompt_ids for s in sampled],
            [s.output_ids for s in sampled],
            [s.generator for s in sampled],
            [s.dry_breakers for s in sampled],
        )
        if wants_logprobs:
            self._record_logprobs([sampled[r] for r in wants_logprobs], raw, tokens[wants_logprobs])
        for seq, token in zip(sampled, tokens.tolist(), strict=True):
            if seq.guide is not None:
                seq.guide.accept(token)
            seq.append(token)
            if seq.finished:
                self.scheduler.finish(seq)
        return ended + sampled
    @staticmethod
    def _hold_off_the_end(logits: torch.Tensor, row: int, seq: Sequence) -> None:
        # min_tokens: the ending tokens are banned, unless nothing else is left (a grammar that is complete).
        ending = [t for t in seq.stop_token_ids if 0 <= t < logits.shape[1]]
        if ending:
            masked = logits[row].clone()
            masked[ending] = -torch.inf
            if bool(torch.isfinite(masked).any()):
                logits[row] = masked

    @staticmethod
    def _record_logprobs(seqs: list[Sequence], raw: torch.Tensor, tokens: torch.Tensor) -> None:
        top_n = max(seq.params.logprobs for seq in seqs)
        result = compute_logprobs(raw, tokens, top_n)
        for i, seq in enumerate(seqs):
            n = seq.params.logprobs
            top = list(zip(result.top_ids[i, :n].tolist(), result.top_logprobs[i, :n].tolist(), strict=True))
            seq.pending_logprobs.append((float(result.token_logprobs[i]), top))

    # -- vision ---------------------------------------------------------------------------------------------

    def _check_vision(self, prompt_ids: list[int], vision: Prompt | None) -> None:
        if vision is None or not vision.items:
            return
        if getattr(self.model, "visual", None) is None:
            raise InputError("this model takes text only; it cannot read images or videos")
        if list(prompt_ids) != list(vision.token_ids) or vision.positions is None:
            raise InputError("prompt_ids must be the vision prompt's token_ids, with its positions")

    def encode_vision(self, item: VisionItem) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder's output for one image or video, computed once per content (LRU by content hash)."""
        cached = self.vision_cache.get(item.content_hash)
        if cached is not None:
            self.vision_cache.move_to_end(item.content_hash)
            return cached
        visual = self.model.visual
        pixels = item.pixel_values.to(device=self.device, dtype=self.dtype)
        grid = torch.tensor([item.grid_thw], dtype=torch.long)
        embeds, deepstack = visual.encode(pixels, grid)
        if embeds.shape[0] != item.num_tokens:
            raise InputError(f"the vision encoder gave {embeds.shape[0]} rows for {item.num_tokens} tokens")
        result = (embeds, list(deepstack))
        self.vision_cache[item.content_hash] = result
        size = lambda r: sum(t.numel() * t.element_size() for t in [r[0], *r[1]])  # noqa: E731
        while len(self.vision_cache) > 1 and sum(map(size, self.vision_cache.values())) > self.vision_cache_bytes:
            self.vision_cache.popitem(last=False)
        return result

    def _visual_rows(self, visual: list[tuple[int, VisionItem, torch.Tensor]]) -> VisualRows | None:
        if not visual:
            return None
        rows, embeds, deepstack = [], [], []
        for base, item, used in visual:
            item_embeds, item_deep = self.encode_vision(item)
            local = used.to(self.device)
            rows.append(item.rows[used].to(self.device) + base)
            embeds.append(item_embeds[local])
            deepstack.append([d[local] for d in item_deep])
        depth = min(len(d) for d in deepstack)
        return VisualRows(
            torch.cat(rows), torch.cat(embeds), [torch.cat([d[k] for d in deepstack]) for k in range(depth)]
        )

    @torch.inference_mode()
    def logits(self, token_ids: list[int] | Prompt, chunk: int = 1024) -> torch.Tensor:
        """float32 [len(token_ids), vocab] next-token logits at every position, outside the block pool.
        A Prompt brings its images, videos and M-RoPE positions."""
        vision = None
        if isinstance(token_ids, Prompt):
            vision, token_ids = token_ids, token_ids.token_ids
            self._check_vision(token_ids, vision)
        if not token_ids:
            raise InputError("token_ids is empty")
        if len(token_ids) > self.config.max_model_len:
            raise ContextLengthError(
                f"{len(token_ids)} tokens do not fit the model's context of {self.config.max_model_len}"
            )
        return torch.cat(list(self._logits_by_chunk(token_ids, vision, chunk)))

    @torch.inference_mode()
    def prompt_logprobs(
        self, token_ids: list[int], top_n: int = 0, chunk: int = 128
    ) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """Each prompt token's log-prob given the tokens before it, with the top_n (id, log-prob) there; the
        first token has none (None, []). Computed in chunks, so memory stays at chunk x vocab floats."""
        self.check_prompt(token_ids)
        out: list[tuple[float | None, list[tuple[int, float]]]] = [(None, [])]
        nexts = torch.tensor(token_ids[1:], dtype=torch.long, device=self.device)
        start = 0
        for logits in self._logits_by_chunk(token_ids[:-1], None, chunk):
            logp = torch.log_softmax(logits, dim=-1)
            rows = len(logp)
            chosen = logp.gather(1, nexts[start : start + rows, None]).squeeze(1).tolist()
            top = torch.topk(logp, top_n, dim=-1) if top_n else None
            for i in range(rows):
                alternatives = list(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True)) if top else []
                out.append((chosen[i], alternatives))
            start += rows
        return out

    def _logits_by_chunk(self, token_ids: list[int], vision: Prompt | None, chunk: int) -> Iterator[torch.Tensor]:
        cfg = self.model.config
        cache = KVCache.for_model(cfg, max(len(token_ids), 1), self.kv_dtype, self.device, self.dtype)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        for start in range(0, len(token_ids), chunk):
            piece = ids[start : start + chunk]
            end = start + len(piece)
            if vision is not None and vision.positions is not None:
                positions = vision.positions[:, start:end].to(self.device)
            else:
                positions = torch.arange(start, end, device=self.device)
            visual = self._visual_rows([(-start, item, used) for item, used in _items_in(vision, start, end)])
            yield self.model.compute_logits(self.model(piece, positions, cache, visual))
            cache.commit(len(piece))


def _items_in(vision: Prompt | None, start: int, end: int) -> list[tuple[VisionItem, torch.Tensor]]:
    """The items with tokens in [start, end), each with the indices (into its rows) of those tokens."""
    if vision is None:
        return []
    found = []
    for item in vision.items:
        if int(item.rows[0]) >= end or int(item.rows[-1]) < start:
            continue
        used = torch.nonzero((item.rows >= start) & (item.rows < end)).flatten()
        if used.numel():
            found.append((item, used))
    return found


def _positions(seq: Sequence, start: int, end: int) -> torch.Tensor:
    """Positions of tokens [start, end): the prompt's M-RoPE table, then i + rope_delta for generated ones."""
    vision = seq.vision
    if vision is None:
        return torch.arange(start, end)
    table = vision.positions
    prompt_len = table.shape[1]
    known = table[:, start : min(end, prompt_len)]
    if end <= prompt_len:
        return known
    later = torch.arange(max(start, prompt_len), end) + vision.rope_delta
    return torch.cat([known, later.expand(3, -1)], dim=1)


def _stack_positions(pieces: list[torch.Tensor]) -> torch.Tensor:
    if all(p.dim() == 1 for p in pieces):
        return torch.cat(pieces)
    return torch.cat([p if p.dim() == 2 else p.expand(3, -1) for p in pieces], dim=1)
