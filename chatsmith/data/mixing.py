"""Mixing several data sources with sampling weights (`--data a.json:0.7 --data b.json:0.3`).

The mixture has as many examples as all sources together; source i contributes
round(w_i / sum(w) * total). A source with fewer records than its share is upsampled: every record
appears once before any appears twice. Everything is decided by one seeded RNG.
"""

from __future__ import annotations

import math
import random
from typing import Any

from chatsmith.data.conversation import Conversation
from chatsmith.errors import ChatsmithError


def mixture_sizes(sizes: list[int], weights: list[float | None]) -> list[int]:
    """How many examples each source contributes. All weights None: each source's own size.

    A None weight next to given ones counts as 1.0, so "a.json b.json:2" means b twice as often as a.
    """
    if len(sizes) != len(weights):
        raise ChatsmithError(f"{len(sizes)} data sources but {len(weights)} weights")
    if all(w is None for w in weights):
        return list(sizes)
    ws = [1.0 if w is None else float(w) for w in weights]
    for i, w in enumerate(ws):
        if not math.isfinite(w) or w <= 0:
            raise ChatsmithError(f"data source {i + 1}: weight must be a positive number, got {weights[i]!r}")
    total, wsum = sum(sizes), sum(ws)
    counts = [round(w / wsum * total) for w in ws]
    for i, (n, size) in enumerate(zip(counts, sizes, strict=True)):
        if n > 0 and size == 0:
            raise ChatsmithError(f"data source {i + 1} has no records but weight {ws[i]}")
    return counts


def sample_indices(size: int, count: int, rng: random.Random) -> list[int]:
    """`count` indices into range(size): without replacement when possible, else whole passes first."""
    full, rest = divmod(count, size) if size else (0, 0)
    out: list[int] = []
    for _ in range(full):  # each record once per pass before any record repeats a pass
        out += rng.sample(range(size), size)
    out += rng.sample(range(size), rest)
    return out


def mix(results: list[list[Conversation]], weights: list[float | None], seed: int) -> list[Conversation]:
    """Mix sources by weight and shuffle with `seed`; all weights None means plain concatenation.

    Upsampled records are the same `Conversation` objects repeated (not copies).
    """
    counts = mixture_sizes([len(r) for r in results], weights)
    if all(w is None for w in weights):
        return [c for r in results for c in r]
    rng = random.Random(seed)
    mixed = [r[i] for r, n in zip(results, counts, strict=True) for i in sample_indices(len(r), n, rng)]
    rng.shuffle(mixed)
    return mixed


def split_eval(items: list[Any], eval_split: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(kept, held out): `eval_split` is a fraction (< 1) or a count (>= 1) of items, chosen by `seed`."""
    if not eval_split or eval_split <= 0:
        return items, []
    n = int(eval_split) if eval_split >= 1 else max(1, int(round(len(items) * eval_split)))
    if n >= len(items):
        raise ChatsmithError(f"--eval-split {eval_split} leaves no training data ({len(items)} records)")
    order = list(range(len(items)))
    random.Random(seed + 17).shuffle(order)
    held = set(order[:n])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]
