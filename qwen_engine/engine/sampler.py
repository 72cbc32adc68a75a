"""Turns next-token logits into token ids: one row per sequence, each row with its own settings.

The pipeline per row is: logit_bias -> penalties -> DRY -> (greedy: argmax) | (temperature -> top_k -> top_p -> min_p -> draw).
Every step is a tensor op over the whole batch; Python only loops over rows to gather their token ids for
the penalties and to draw one uniform number per row from that row's generator. Drawing by inverse CDF
with one number per row keeps a seeded request's output independent of which other requests share its
batch. Full-vocabulary sorts are avoided where possible (top_k by threshold, top_p on the top candidates).

Ties are always broken toward the lower token id (as torch.argmax does), so top_k=1 equals greedy exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .. import kernels
from .dry import dry_penalties
from .sampling_params import FALLBACKS, SamplingParams

# Softmax of float32 logits is only accurate to ~1e-7; without some slack a token sitting exactly on a
# top_p / min_p boundary would be kept or dropped by rounding luck.
_BOUNDARY_TOL = 1e-6

# How many of the most probable tokens are tried for a nucleus before sorting the whole vocabulary.
_NUCLEUS_PREFETCH = 512

# Rows with at most this many surviving tokens are drawn from a gathered candidate list instead of the whole
# vocabulary, which saves several full-vocabulary passes per row.
_CANDIDATE_WIDTHS = (64, 256, 1024)

RowValues = Sequence[float] | Sequence[int] | torch.Tensor


def _setting(params: SamplingParams, name: str) -> float:
    # The engine passes resolved params; fall back rather than crash if one slipped through unresolved.
    value = getattr(params, name)
    return FALLBACKS[name] if value is None else value


def _row_tensor(values: RowValues, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"expected {batch} per-row values, got shape {tuple(t.shape)}")
    return t


def _check_2d(logits: torch.Tensor) -> tuple[int, int]:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    return logits.shape[0], logits.shape[1]


def _row_col_index(
    id_lists: Sequence[Sequence[int]], rows: Sequence[int], vocab: int, device: torch.device
) -> torch.Tensor:
    """Flat positions row * vocab + id of every listed id of the given rows (repeats kept)."""
    row_idx: list[int] = []
    col_idx: list[int] = []
    for i in rows:
        ids = id_lists[i]
        row_idx.extend([i] * len(ids))
        col_idx.extend(ids)
    r = torch.tensor(row_idx, dtype=torch.long, device=device)
    c = torch.tensor(col_idx, dtype=torch.long, device=device)
    # Ids the logits have no column for (e.g. tokenizer extras beyond the LM head) cannot be penalised.
    valid = (c >= 0) & (c < vocab)
    return r[valid] * vocab + c[valid]


def _has_penalties(params: Sequence[SamplingParams]) -> bool:
    return any(
        bool(p.logit_bias)
        or _setting(p, "repetition_penalty") != 1.0
        or _setting(p, "presence_penalty") != 0.0
        or _setting(p, "frequency_penalty") != 0.0
        for p in params
    )


def _penalise_(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> bool:
    """Apply logit_bias and the penalties to `logits` in place; False when no row has any (logits untouched).

    Works on the (row, token) pairs that occur, never on whole vocabulary rows: a few thousand ids per row
    against ~150k columns.
    """
    batch, vocab = _check_2d(logits)
    if not len(params) == len(prompt_ids) == len(output_ids) == batch:
        raise ValueError("params, prompt_ids and output_ids need one entry per logits row")
    biased = _add_logit_bias_(logits, params)
    rep = [float(_setting(p, "repetition_penalty")) for p in params]
    pres = [float(_setting(p, "presence_penalty")) for p in params]
    freq = [float(_setting(p, "frequency_penalty")) for p in params]
    rep_rows = [i for i in range(batch) if rep[i] != 1.0]
    add_rows = [i for i in range(batch) if pres[i] != 0.0 or freq[i] != 0.0]
    if not rep_rows and not add_rows:
        return biased
    device = logits.device
    flat = logits.view(-1)

    if rep_rows:
        seen = torch.cat(
            [
                _row_col_index(prompt_ids, rep_rows, vocab, device),
                _row_col_index(output_ids, rep_rows, vocab, device),
            ]
        ).unique()
        p = torch.tensor(rep, dtype=logits.dtype, device=device)[seen // vocab]
        values = flat[seen]
        flat[seen] = torch.where(values > 0, values / p, values * p)
    if add_rows:
        pos, counts = _row_col_index(output_ids, add_rows, vocab, device).unique(return_counts=True)
        row = pos // vocab
        f = torch.tensor(freq, dtype=logits.dtype, device=device)[row]
        pr = torch.tensor(pres, dtype=logits.dtype, device=device)[row]
        flat[pos] -= f * counts.to(logits.dtype) + pr
    return True


def _add_logit_bias_(logits: torch.Tensor, params: Sequence[SamplingParams]) -> bool:
    vocab = logits.shape[1]
    pos: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        for token, bias in (p.logit_bias or {}).items():
            if token < vocab:  # the engine rejects ids beyond the vocabulary; the LM head may be wider
                pos.append(row * vocab + token)
                values.append(bias)
    if not pos:
        return False
    flat = logits.view(-1)
    index = torch.tensor(pos, dtype=torch.long, device=logits.device)
    flat[index] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
    return True


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Return a penalised copy of `logits` [B, V]; the input is not modified.

    First each row's logit_bias is added. Then repetition_penalty p (transformers / vLLM): every distinct token of prompt + output gets
    logit / p if the logit is > 0, else logit * p. Then, OpenAI style, over the output only:
    logit -= frequency_penalty * count + presence_penalty * (count > 0).
    """
    out = logits.clone()
    _penalise_(out, params, prompt_ids, output_ids)
    return out


def apply_dry_(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    breakers: Sequence[frozenset[int]],
) -> bool:
    """Subtract DRY's penalties (engine/dry.py) in place from the rows that ask for it; False when none does.
    The context is the prompt and the answer so far."""
    vocab = logits.shape[1]
    touched = False
    for row, p in enumerate(params):
        multiplier = float(_setting(p, "dry_multiplier"))
        if multiplier <= 0:
            continue
        tokens, penalties = dry_penalties(
            list(prompt_ids[row]) + list(output_ids[row]), breakers[row], multiplier,
            float(_setting(p, "dry_base")), int(_setting(p, "dry_allowed_length")),
            int(_setting(p, "dry_penalty_last_n")),
        )
        keep = tokens < vocab
        if bool(keep.any()):
            logits[row, tokens[keep].to(logits.device)] -= penalties[keep].to(logits.device, logits.dtype)
            touched = True
    return touched


def apply_temperature(logits: torch.Tensor, temperatures: RowValues) -> torch.Tensor:
    """Return logits [B, V] divided row-wise by temperature; rows with temperature 0 (greedy) are unchanged."""
    batch, _ = _check_2d(logits)
    t = _row_tensor(temperatures, batch, logits.dtype, logits.device)
    t = torch.where(t > 0, t, torch.ones_like(t))
    return logits / t[:, None]


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: RowValues, top_p: RowValues, min_p: RowValues
) -> torch.Tensor:
    """Return a copy of logits [B, V] with filtered-out tokens set to -inf, each row with its own values.

    top_k: keep the k largest (0, -1 or >= V: off; ties go to the lower id so exactly k stay).
    top_p: of what top_k left, keep the smallest most-probable set whose probability sums to >= top_p
    (1: off; the most probable token always stays; ties again go to the lower id). min_p: drop tokens whose
    probability is below min_p * the most probable token's (0: off); being a ratio, it does not care about
    renormalisation. Boundary cases within 1e-6 count as reaching the threshold.
    """
    out = logits.clone()
    _filter_(out, top_k, top_p, min_p)
    return out


def _filter_(logits: torch.Tensor, top_k: RowValues, top_p: RowValues, min_p: RowValues) -> None:
    """apply_top_k_top_p_min_p in place."""
    batch, vocab = _check_2d(logits)
    device = logits.device
    k = _row_tensor(top_k, batch, torch.long, device)
    k = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)
    p = _row_tensor(top_p, batch, torch.float64, device)
    m = _row_tensor(min_p, batch, torch.float64, device)

    if bool((k < vocab).any()):
        logits.masked_fill_(_top_k_drop(logits, k), -math.inf)

    nucleus = p < 1
    if bool(nucleus.any()):
        # Only the survivors of top_k need ordering. Rows without top_k first try the top few hundred
        # tokens, which usually hold the nucleus; only rows where they do not are sorted in full.
        with_k = torch.nonzero(nucleus & (k < vocab)).flatten()
        if len(with_k) > 0:
            _top_p_rows_(logits, with_k, p[with_k], int(k[with_k].max()), complete=True)
        rest = torch.nonzero(nucleus & (k >= vocab)).flatten()
        if len(rest) > 0 and vocab >= 4 * _NUCLEUS_PREFETCH:
            rest = _top_p_rows_(logits, rest, p[rest], _NUCLEUS_PREFETCH, complete=False)
        if len(rest) > 0:
            _top_p_rows_(logits, rest, p[rest], vocab, complete=True)

    if bool((m > 0).any()):
        # p_i / p_max == exp(l_i - l_max): a per-row logit threshold, no softmax needed. log(0) = -inf
        # switches a row off.
        best = logits.amax(dim=-1, keepdim=True).to(torch.float64)
        threshold = best + (torch.log(m) - _BOUNDARY_TOL)[:, None]
        logits.masked_fill_(logits < threshold.to(logits.dtype), -math.inf)


def _top_p_rows_(
    logits: torch.Tensor, rows: torch.Tensor, p: torch.Tensor, width: int, complete: bool
) -> torch.Tensor:
    """Apply top_p in place to `rows`, looking at their `width` most probable tokens only; returns the rows
    that could not be decided from those (always none when `complete`: every survivor is among them)."""
    vocab = logits.shape[1]
    sub = logits[rows]
    values, ids = _by_value_then_id(sub, width)
    # The nucleus is measured against the whole row's mass, not just the candidates'.
    log_total = torch.logsumexp(values if complete else sub, dim=-1).to(torch.float64)
    probs = torch.exp(values.to(torch.float64) - log_total[:, None])
    drop = (probs.cumsum(dim=-1) - probs) >= (p - _BOUNDARY_TOL)[:, None]
    drop[:, 0] = False
    if complete or width >= vocab:
        decided = torch.ones(len(rows), dtype=torch.bool, device=logits.device)
    else:
        # Exact when every kept candidate ranks strictly above the smallest candidate: nothing outside the
        # candidates (all <= that value) can then come before a kept token.
        decided = (drop | (values > values[:, -1:])).all(dim=-1)
    if bool(decided.any()):
        # Tokens outside the candidates rank below every kept one (or are -inf already): all dropped.
        mask = torch.ones_like(sub[decided], dtype=torch.bool).scatter_(1, ids[decided], drop[decided])
        logits[rows[decided]] = sub[decided].masked_fill_(mask, -math.inf)
    return rows[~decided]


def _top_k_drop(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool [B, V], True outside the k[b] largest of each row (ties at the boundary go to the lower ids)."""
    vocab = logits.shape[1]
    active = k < vocab
    widest = int(k[active].max())
    # topk of the widest k gives every row's k-th value; a threshold then avoids sorting the vocabulary.
    kth = torch.topk(logits, widest, dim=-1).values.gather(1, (k.clamp(max=widest) - 1)[:, None])
    kth = torch.where(active[:, None], kth, torch.full_like(kth, -math.inf))
    drop = logits < kth
    excess = (vocab - drop.sum(dim=-1, dtype=torch.int32)) - k
    for row in torch.nonzero(excess > 0).flatten().tolist():
        # Rare: more tokens equal the k-th value than fit; keep the lowest ids among them.
        tied = logits[row] == kth[row]
        drop[row] |= tied & (tied.cumsum(dim=0) > int(tied.sum() - excess[row]))
    return drop


def _by_value_then_id(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `width` largest logits of each row and their ids, ordered by value (descending), then id."""
    if width >= logits.shape[1]:
        return torch.sort(logits, dim=-1, descending=True, stable=True)
    values, ids = torch.topk(logits, width, dim=-1)
    # topk leaves the order of equal values unspecified: order by id first, then stably by value.
    by_id = ids.argsort(dim=-1)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(1, by_value), ids.gather(1, by_value)


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    u = torch.empty(len(generators), dtype=torch.float64)
    default_rows = []
    for i, g in enumerate(generators):
        if g is None:
            default_rows.append(i)
        else:
            u[i] = torch.rand((), generator=g, dtype=torch.float64, device=g.device).cpu()
    if default_rows:
        u[default_rows] = torch.rand(len(default_rows), dtype=torch.float64)
    return u.to(device)


def _inverse_cdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column index per row where the running sum of softmax(logits), in column order, first exceeds u."""
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    # float32 probabilities are accurate enough; their running sum over 150k columns is not.
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    # Only if rounding pushes the target past the CDF's last step is idx out of range or on a zero (it
    # then lands on the trailing zeros); the last token with mass is meant.
    bad = (idx >= logits.shape[1]) | (
        probs.gather(1, idx.clamp(max=logits.shape[1] - 1)[:, None]).squeeze(1) <= 0
    )
    if bool(bad.any()):
        has_mass = probs[bad] > 0
        idx[bad] = logits.shape[1] - 1 - has_mass.flip(-1).to(torch.int8).argmax(dim=-1)
    return idx


def sample_from_logits(logits: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Draw one token id per row from softmax(logits) [B, V], using exactly one uniform from each row's
    generator (None: torch's default generator). Tokens with probability 0 (logit -inf) are never drawn.

    Each row walks the CDF of its tokens in id order. Rows with few survivors (after top_k, say) walk a
    gathered candidate list of a width fixed by their own survivor count, so a row's draw never depends on
    the other rows in the batch.
    """
    batch, vocab = _check_2d(logits)
    if len(generators) != batch:
        raise ValueError("generators needs one entry per logits row")
    u = _uniforms(generators, logits.device)
    chosen = torch.empty(batch, dtype=torch.long, device=logits.device)
    pending = torch.ones(batch, dtype=torch.bool, device=logits.device)
    widths = [w for w in _CANDIDATE_WIDTHS if w * 4 <= vocab]
    if widths:
        survivors = vocab - torch.isneginf(logits).sum(dim=-1, dtype=torch.int32)
        for width in widths:
            rows = torch.nonzero(pending & (survivors <= width)).flatten()
            if len(rows) == 0:
                continue
            sub = logits[rows]
            ids = torch.topk(sub, width, dim=-1).indices.sort(dim=-1).values
            picked = _inverse_cdf(sub.gather(1, ids), u[rows])
            chosen[rows] = ids.gather(1, picked[:, None]).squeeze(1)
            pending[rows] = False
    if bool(pending.all()):
        return _inverse_cdf(logits, u)
    rows = torch.nonzero(pending).flatten()
    if len(rows) > 0:
        chosen[rows] = _inverse_cdf(logits[rows], u[rows])
    return chosen


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator for one request: seeded when a seed is given, else None (the default generator)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class Sampler:
    """Picks the next token for every row of a batch, each row with its own SamplingParams."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        dry_breakers: Sequence[frozenset[int]] | None = None,
    ) -> torch.Tensor:
        """Return [B] int64 token ids. `logits` is not modified. `dry_breakers`: per row, the token ids DRY's
        matches stop at (none given: no breakers)."""
        batch, _ = _check_2d(logits)
        if len(generators) != batch:
            raise ValueError("generators needs one entry per logits row")
        work = logits.to(torch.float32)
        dry = any(float(_setting(p, "dry_multiplier")) > 0 for p in params)
        if _has_penalties(params) or dry:
            if work is logits:
                work = logits.clone()
            _penalise_(work, params, prompt_ids, output_ids)
            if dry:
                apply_dry_(work, params, prompt_ids, output_ids, dry_breakers or [frozenset()] * batch)
        # argmax for every row is cheap and is already the answer for greedy rows.
        native = kernels.native() if work.device.type == "cpu" else None
        chosen = native.argmax_rows(work) if hasattr(native, "argmax_rows") else work.argmax(dim=-1)

        temps = [float(_setting(p, "temperature")) for p in params]
        rows = [i for i in range(batch) if temps[i] > 0]
        if not rows:
            return chosen
        every_row = len(rows) == batch
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        sub = work if every_row else work[idx]
        # With the best logit at 0, dividing by a tiny temperature can only underflow to -inf, never
        # overflow to +inf (which would turn the softmax into NaN). `sub - max` is a fresh tensor, so
        # everything after may work in place.
        sub = sub - sub.amax(dim=-1, keepdim=True)
        sub.div_(torch.tensor([temps[i] for i in rows], dtype=sub.dtype, device=sub.device)[:, None])
        _filter_(
            sub,
            [int(_setting(params[i], "top_k")) for i in rows],
            [float(_setting(params[i], "top_p")) for i in rows],
            [float(_setting(params[i], "min_p")) for i in rows],
        )
        drawn = sample_from_logits(sub, [generators[i] for i in rows])
        if every_row:
            return drawn
        chosen[idx] = drawn
        return chosen


class TokenLogprobs(NamedTuple):
    token_logprobs: torch.Tensor  # [B] float32, log-prob of the chosen token
    top_ids: torch.Tensor  # [B, top_n] int64, most probable first
    top_logprobs: torch.Tensor  # [B, top_n] float32


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, top_n: int = 0) -> TokenLogprobs:
    """Log-probabilities from log_softmax of the logits as given, meant to be the model's raw logits:
    before penalties, temperature and top-k/top-p/min-p (what vLLM and OpenAI report by default).
    Returns the chosen tokens' log-probs and the top_n (id, log-prob) pairs per row."""
    batch, vocab = _check_2d(logits)
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    token_ids = token_ids.to(device=logits.device, dtype=torch.long).reshape(batch)
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    chosen = logp.gather(1, token_ids[:, None]).squeeze(1)
    top = torch.topk(logp, min(top_n, vocab), dim=-1)
    return TokenLogprobs(chosen, top.indices, top.values)
