"""Turn rendered examples into a deterministic plan of optimizer steps and into model inputs.

Two layouts:
- packed rows (default): a micro-batch's examples are concatenated into one row with position
  ids restarting at 0 for each example; attention runs causally within each example's span
  (train/attention.py; without it transformers builds a block-diagonal mask from the restarts), so
  attention never crosses examples, and no pad token is computed.
- padded rows: for methods that prepend virtual tokens to every sequence (prompt/prefix tuning,
  LLaMA-Adapter), examples are right-padded into a [B, T] batch with an attention mask.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from chatsmith.train.attention import segment_bounds


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        # The first token is never predicted (nothing precedes it).
        return sum(self.loss_mask[1:])


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
               seed: int, token_budget: int | None = None) -> Plan:
    """The whole run's data order, fixed by the seed, so a resumed run sees the same batches."""
    if not lengths:
        return []
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


def collate_packed(examples: list[Example]) -> dict[str, Any]:
    """One row of concatenated examples: input_ids/position_ids [1, L]; the positions whose next
    token is a target, and those targets [N]; each example's (start, end) span in the row, for
    segment attention (train/attention.py)."""
    ids: list[int] = []
    pos: list[int] = []
    tpos: list[int] = []
    tgt: list[int] = []
    for ex in examples:
        start = len(ids)
        ids.extend(ex.input_ids)
        pos.extend(range(len(ex.input_ids)))
        for t in range(1, len(ex.input_ids)):
            if ex.loss_mask[t]:
                tpos.append(start + t - 1)
                tgt.append(ex.input_ids[t])
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "target_positions": torch.tensor(tpos, dtype=torch.long),
        "targets": torch.tensor(tgt, dtype=torch.long),
        "segment_bounds": segment_bounds([len(ex.input_ids) for ex in examples]),
        "n_tokens": len(ids),
        "n_targets": len(tgt),
    }


def collate_padded(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded [B, T] batch with attention_mask and next-token labels (-100 = ignored)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex)
        ids[b, :n] = torch.tensor(ex.input_ids)
        att[b, :n] = 1
        m = torch.tensor(ex.loss_mask, dtype=torch.bool)
        labels[b, :n] = torch.where(m, ids[b, :n], torch.tensor(-100))
    return {
        "input_ids": ids,
        "attention_mask": att,
        "labels": labels,
        "n_tokens": int(att.sum()),
        "n_targets": sum(e.n_targets for e in examples),
    }
