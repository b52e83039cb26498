"""Losses as pure functions of tensors (STYLE.md, principle 1). No trainer state in here.

Every loss returns a SUM over its units (tokens, pairs, ...), not a mean: the training loop
divides by the number of units in the whole optimizer step, so that 8 examples in one micro-batch
and 2 examples in each of 4 accumulated micro-batches give the same update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of `targets` [N] under `logits` [N, V].

    Computed in fp32: a bf16 logsumexp over a 50k vocabulary loses the small differences that
    make up the loss.
    """
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each position: logits [..., V], targets [...] -> [...] (fp32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
