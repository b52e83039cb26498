"""The run's data order: a deterministic plan of optimizer steps, each a list of micro-batches of
example indices, fixed by the seed so that a resumed run sees the same batches."""

from __future__ import annotations

import heapq
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


def balance_step(step: list[list[int]], lengths: list[int], processes: int) -> list[list[int]]:
    """One optimizer step's examples dealt again so that every process gets about the same number
    of tokens (not the same number of examples), and each process's micro-batches about the same
    share of its tokens. Returns the step in the loop's layout: process r runs micro-batches r,
    r + P, r + 2P, ... (as many as before, each non-empty).

    Longest first to the least-loaded process (LPT, Graham 1969: the largest load is within 4/3 of
    the best possible), then the same within each process over its micro-batches. The step's set
    of examples is unchanged and every loss divides by the units of the whole step, so the update
    is the same as the naive split's up to float rounding.
    """
    per_rank = len(step) // processes
    items = sorted((i for mb in step for i in mb), key=lambda i: (-lengths[i], i))
    if len(items) < per_rank * processes:    # too few examples to give every micro-batch one
        return step

    def lpt(xs: list[int], bins: int) -> list[list[int]]:
        heap = [(0, b) for b in range(bins)]
        out: list[list[int]] = [[] for _ in range(bins)]
        for i in xs:
            load, b = heapq.heappop(heap)
            out[b].append(i)
            heapq.heappush(heap, (load + lengths[i], b))
        return out

    ranks = lpt(items, processes)
    # Each process needs one example per micro-batch: a process short of them takes the shortest
    # examples of the process with the most (rare: a few very long examples in a small step).
    for r in ranks:
        while len(r) < per_rank:
            donor = max(ranks, key=len)
            r.append(donor.pop())
    micro = [lpt(sorted(r, key=lambda i: (-lengths[i], i)), per_rank) for r in ranks]
    return [sorted(micro[r][a]) for a in range(per_rank) for r in range(processes)]


def rank_tokens(step: list[list[int]], lengths: list[int], processes: int) -> list[int]:
    """Tokens each process gets in one optimizer step (process r: micro-batches r, r + P, ...)."""
    return [sum(lengths[i] for mb in step[r::processes] for i in mb) for r in range(processes)]


def plan_steps(lengths: list[int], *, batch_size: int, grad_accum: int, max_steps: int, epochs: float,
               seed: int, token_budget: int | None = None, processes: int = 1, balance: bool = True) -> Plan:
    """The whole run's data order, fixed by the seed, so a resumed run sees the same batches.

    Each optimizer step holds `grad_accum x processes` micro-batches (process r runs the r-th,
    (r+P)-th, ...), so P processes with accumulation A see exactly the examples one process with
    accumulation A x P sees, and an epoch is one pass over the data whatever P is. With `balance`,
    each step's examples are dealt by tokens (`balance_step`) over the processes and then over each
    process's micro-batches, unless that would put more tokens in a micro-batch than a naive one
    can hold (memory stays bounded). Dealing one process's A x P micro-batches gives the very
    micro-batches that P processes with A each get, so the two runs compute the same sums.
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
    steps = [micro[s * grad_accum:(s + 1) * grad_accum] for s in range(total_steps)]
    if balance and grad_accum > 1:   # (grad_accum here counts every process's micro-batches)
        # A balanced micro-batch may hold more examples than --batch-size, never more tokens than a
        # naive one could: batch_size x the longest example, or the token budget.
        limit = max(token_budget, max(lengths)) if token_budget else batch_size * max(lengths)
        steps = [_balanced_within(step, lengths, processes, limit) for step in steps]
    return steps


def _balanced_within(step: list[list[int]], lengths: list[int], processes: int, limit: int) -> list[list[int]]:
    out = balance_step(step, lengths, processes)
    return out if max(sum(lengths[i] for i in mb) for mb in out) <= limit else step
