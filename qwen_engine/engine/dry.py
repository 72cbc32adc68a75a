"""DRY ("don't repeat yourself"): a penalty on the token that would extend a repetition of earlier text.

Repetition penalties push down every token seen before, which also hurts text that must repeat (code, tables);
DRY pushes down only the token that would continue a sequence the context already holds, and more the longer
that sequence is. Its author's rule (p-e-w's DRY, as in text-generation-webui and llama.cpp): for each earlier
occurrence of the context's last token, measure how far the match with the context's end reaches backwards (at
most 50 tokens, never through a sequence breaker such as a newline); the token that followed that occurrence
gets, for its longest match n >= allowed_length, the penalty multiplier * base ** (n - allowed_length),
subtracted from its logit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_BREAKERS = ("\n", ":", '"', "*")
MAX_MATCH = 50  # longer matches count as 50, so the penalty cannot overflow


def breaker_ids(tokenizer, breakers: Sequence[str]) -> frozenset[int]:
    """The token ids of the sequence breakers: each string's last token when it follows a letter (so that "\\n"
    is the newline token a word is followed by, not a merged one)."""
    return frozenset(tokenizer.encode("a" + text)[-1] for text in breakers)


def dry_penalties(
    context: Sequence[int],
    breakers: frozenset[int],
    multiplier: float,
    base: float,
    allowed_length: int,
    last_n: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, penalties) for the next token after `context` (prompt and answer so far): the amounts to
    subtract from those tokens' logits. `last_n` > 0 looks at the last `last_n` tokens only."""
    ids = list(context[-last_n:]) if last_n > 0 else list(context)
    nothing = torch.empty(0, dtype=torch.long), torch.empty(0)
    if len(ids) < 2 or ids[-1] in breakers:
        return nothing
    ctx = torch.tensor(ids, dtype=torch.long)
    n = len(ids)
    starts = torch.nonzero(ctx[:-1] == ids[-1]).flatten()  # earlier occurrences of the last token
    following = ctx[starts + 1]
    if breakers:
        keep = ~torch.isin(following, torch.tensor(sorted(breakers), dtype=torch.long))
        starts, following = starts[keep], following[keep]
    if len(starts) == 0:
        return nothing
    length = torch.ones_like(starts)
    active = torch.ones(len(starts), dtype=torch.bool)
    for back in range(1, min(MAX_MATCH, n - 1)):  # a match can reach back to position 0 at most
        previous = ids[n - 1 - back]  # the context's tail, one further back
        if previous in breakers:
            break
        at = starts - back
        active &= (at >= 0) & (ctx[at.clamp(min=0)] == previous)
        if not bool(active.any()):
            break
        length += active
    tokens, which = torch.unique(following, return_inverse=True)
    longest = torch.zeros(len(tokens), dtype=torch.long).scatter_reduce(0, which, length, "amax")
    hit = longest >= allowed_length
    exponent = (longest[hit] - allowed_length).to(torch.float64)
    return tokens[hit], (multiplier * torch.pow(torch.tensor(base, dtype=torch.float64), exponent)).float()
