"""Rollouts -> training batches for the one loop: RL episodes packed into padding-free rows
(prompt + completion of every episode in one row, position ids restarting per episode, logits only
at the completion positions), and `RolloutBatches`, the batch source of the PPO/GRPO loops.

Shape of an RL run inside the loop (STYLE.md, principle 2): the loop asks `RolloutBatches` for
this process's micro-batches of each optimizer step. Every `ppo_epochs * num_minibatches` steps it
collects a fresh rollout with the CURRENT policy (the engine runs the live module, `sync_weights()`
after each update), then serves that rollout's minibatches epoch by epoch. The rollout of step s is
fully determined by the seed and s, so a resumed run regenerates it with the restored weights.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Episode:
    """One prompt x completion pair of a rollout, with its per-token training targets."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]                 # behaviour policy log p(token), one per completion token
    record: dict[str, Any]
    group: int = 0                        # index of the prompt within its rollout
    text: str = ""
    finish_reason: str = "length"
    reward: float = 0.0
    ref_logprobs: list[float] | None = None
    values: list[float] | None = None
    advantages: list[float] = field(default_factory=list)   # one per completion token
    returns: list[float] | None = None


@dataclass
class RLBatchSpec:
    """How rollouts become per-token training batches."""

    aggregation: str = "token"        # token | sequence | dr_grpo
    max_new_tokens: int = 32
    # Put each distinct prompt in the row once and let its completions attend to that copy (needs
    # segment attention on the model): a GRPO group of G answers then costs 1 prompt, not G.
    share_prompts: bool = False


def collate_episodes(episodes: Sequence[Episode], spec: RLBatchSpec) -> dict[str, Any]:
    """One packed row: input_ids/position_ids [1, L]; completion positions, targets and the
    per-token tensors (old/ref log-probs, advantages, returns, old values) [N]; seq_index [N]."""
    import torch

    from chatsmith.train.losses import rl_loss_units

    ids: list[int] = []
    pos: list[int] = []
    tpos: list[int] = []
    tgt: list[int] = []
    seq: list[int] = []
    old: list[float] = []
    ref: list[float] = []
    adv: list[float] = []
    ret: list[float] = []
    val: list[float] = []
    have_ref = all(e.ref_logprobs is not None for e in episodes)
    have_val = all(e.values is not None and e.returns is not None for e in episodes)
    bounds: list[tuple[int, ...]] = []
    prompt_span: dict[tuple[int, ...], tuple[int, int]] = {}
    for s, e in enumerate(episodes):
        start, n_prompt = len(ids), len(e.prompt_ids)
        if spec.share_prompts:
            key = tuple(e.prompt_ids)
            if key not in prompt_span:
                ids.extend(e.prompt_ids)
                pos.extend(range(n_prompt))
                prompt_span[key] = (start, len(ids))
                bounds.append((start, len(ids)))
            ps, pe = prompt_span[key]
            start = len(ids)
            ids.extend(e.completion_ids)
            pos.extend(range(n_prompt, n_prompt + len(e.completion_ids)))
            bounds.append((start, len(ids), ps, pe))
            # The first completion token is predicted at the shared prompt's last position.
            tpos.append(pe - 1)
            tpos.extend(range(start, start + len(e.completion_ids) - 1))
        else:
            full = e.prompt_ids + e.completion_ids
            ids.extend(full)
            pos.extend(range(len(full)))
            tpos.extend(range(start + n_prompt - 1, start + len(full) - 1))
            bounds.append((start, len(ids)))
        tgt.extend(e.completion_ids)
        seq.extend([s] * len(e.completion_ids))
        old.extend(e.logprobs)
        adv.extend(e.advantages)
        if have_ref:
            ref.extend(e.ref_logprobs or [])
        if have_val:
            ret.extend(e.returns or [])
            val.extend(e.values or [])
    batch: dict[str, Any] = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "target_positions": torch.tensor(tpos, dtype=torch.long),
        "targets": torch.tensor(tgt, dtype=torch.long),
        "seq_index": torch.tensor(seq, dtype=torch.long),
        "old_logprobs": torch.tensor(old, dtype=torch.float32),
        "advantages": torch.tensor(adv, dtype=torch.float32),
        "n_seqs": len(episodes),
        # per-episode causal attention instead of one masked [L, L] product (models/attention.py)
        "segment_bounds": bounds,
        "n_tokens": len(ids),
        "n_targets": rl_loss_units(len(tgt), len(episodes), spec.aggregation, spec.max_new_tokens),
    }
    if have_ref:
        batch["ref_logprobs"] = torch.tensor(ref, dtype=torch.float32)
    if have_val:
        batch["returns"] = torch.tensor(ret, dtype=torch.float32)
        batch["old_values"] = torch.tensor(val, dtype=torch.float32)
    return batch


class RolloutBatches:
    """Serves the loop's optimizer steps from rollouts collected on demand.

    make_rollout(rollout_index) -> (episodes with advantages, rollout metrics). Each rollout gives
    ppo_epochs x num_minibatches optimizer steps; each step's minibatch is cut into grad_accum
    micro-batches (collated packed rows).
    """

    def __init__(self, make_rollout: Callable[[int], tuple[list[Episode], dict[str, float]]], *,
                 spec: RLBatchSpec, ppo_epochs: int, num_minibatches: int, grad_accum: int, seed: int,
                 after_update: Callable[[], None] | None = None) -> None:
        self.make_rollout = make_rollout
        self.spec = spec
        self.ppo_epochs = max(1, ppo_epochs)
        self.num_minibatches = max(1, num_minibatches)
        self.grad_accum = max(1, grad_accum)
        self.seed = seed
        self.after_update = after_update
        self.steps_per_rollout = self.ppo_epochs * self.num_minibatches
        self._index: int | None = None
        self._schedule: list[list[list[Episode]]] = []
        self.rollout_metrics: dict[str, float] = {}
        self.rollout_time = 0.0
        self.rollouts = 0
        self.step = 0

    def __call__(self, step: int) -> list[dict[str, Any]]:
        index, k = divmod(step, self.steps_per_rollout)
        self.step = step
        if step > 0 and self.after_update is not None:
            self.after_update()           # the previous step changed the weights
        if index != self._index:
            t0 = time.perf_counter()
            episodes, metrics = self.make_rollout(index)
            self.rollout_time = time.perf_counter() - t0
            self.rollouts += 1
            self.rollout_metrics = {**metrics, "rollout_time_s": self.rollout_time, "rollout": float(index)}
            self._schedule = self._minibatches(episodes, index)
            self._index = index
        micro = self._schedule[k]
        return [collate_episodes(m, self.spec) for m in micro]

    def _minibatches(self, episodes: list[Episode], index: int) -> list[list[list[Episode]]]:
        rng = random.Random(self.seed * 7919 + index)
        out = []
        for _ in range(self.ppo_epochs):
            order = list(range(len(episodes)))
            rng.shuffle(order)
            size = math.ceil(len(order) / self.num_minibatches)
            for m in range(self.num_minibatches):
                chunk = [episodes[i] for i in order[m * size:(m + 1) * size]] or [episodes[order[-1]]]
                per = math.ceil(len(chunk) / self.grad_accum)
                out.append([chunk[j:j + per] for j in range(0, len(chunk), per)])
        return out

    def metrics(self) -> dict[str, float]:
        """The current rollout's statistics (reward, length, KL..., time)."""
        return dict(self.rollout_metrics)
