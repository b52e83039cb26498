"""The run's data order: a deterministic plan of optimizer steps, each a list of micro-batches of
example indices, fixed by the seed so that a resumed run sees the same batches."""

from __future__ import annotations

import math
import random

Plan = list[list[list[int]]]   # steps -> micro-batches -> example indices


def epoch_micro_batches(lengths: list[int], batch_size: int, token_budget: int | None, rng: random.Random) -> list[list[int]]:
    """One epoch: a shuffled order cut into micro-batches of `batch_size` examples, or, with a
    token budget (packing), into micro-batches filled up to `token_budget` tokens."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if token_budget is None:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        if cur and used + lengths[i] > token_budget:
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    if cur:
        batches.append(cur)
    return batches


def plan_steps(lengths: list[int], *, batch_size: int, grad_accum: int, max_steps: int, epochs: float,
               seed: int, token_budget: int | None = None, processes: int = 1) -> Plan:
    """The whole run's data order, fixed by the seed, so a resumed run sees the same batches.

    Each optimizer step holds `grad_accum x processes` micro-batches (process r runs the r-th,
    (r+P)-th, ...), so P processes with accumulation A see exactly the micro-batches one process
    with accumulation A x P sees, and an epoch is one pass over the data whatever P is.
    """
    if not lengths:
        return []
    grad_accum = grad_accum * max(1, processes)
    per_epoch = len(epoch_micro_batches(lengths, batch_size, token_budget, random.Random(seed)))
    if max_steps and max_steps > 0:
        total_steps = max_steps
    else:
        total_steps = max(1, math.ceil(epochs * per_epoch / grad_accum))
    micro: list[list[int]] = []
    epoch = 0
    while len(micro) < total_steps * grad_accum:
        micro.extend(epoch_micro_batches(lengths, batch_size, token_budget, random.Random(seed * 1000003 + epoch)))
        epoch += 1
    micro = micro[: total_steps * grad_accum]
    return [micro[s * grad_accum:(s + 1) * grad_accum] for s in range(total_steps)]
