"""Rollouts for online RL (ppo, grpo): prompts -> the engine -> completions with their log-probs,
rewards, and the log-probs of the trainer's own forward (for the reference and PPO's critic).
Rollouts come from `chatsmith.infer.engine.Engine`, the engine that serves: the same sampling,
stop conditions and detokenizer, always with the current weights. Turning episodes into training
batches is train/rl_batches.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from chatsmith.data.prompts import Prompt
from chatsmith.errors import ChatsmithError
from chatsmith.train.rl_batches import Episode


def generate_episodes(engine: Any, prompts: Sequence[Prompt], *, group_size: int, params: Any,
                      stop_ids: set[int], first_sequence: int = 0) -> list[Episode]:
    """G completions per prompt, laid out prompt by prompt (episode i belongs to prompt i // G).

    With `params.seed`, sequence k of this call samples with seed + first_sequence + k: a process
    that generates the sequences first_sequence.. of a rollout draws exactly what one process
    generating the whole rollout would draw for them.
    """
    ids = [p.ids for p in prompts for _ in range(group_size)]
    comps = engine.generate(ids, params, stop_ids=stop_ids, seed_offset=first_sequence)
    episodes = []
    for i, c in enumerate(comps):
        p = prompts[i // group_size]
        episodes.append(Episode(list(p.ids), list(c.token_ids), list(c.logprobs), p.record, group=i // group_size,
                                text=c.text, finish_reason=c.finish_reason))
    if any(len(e.completion_ids) == 0 for e in episodes):
        raise ChatsmithError("the engine returned an empty completion; check --max-new-tokens")
    return episodes


def score_episodes(rewards: Any, episodes: Sequence[Episode], prompts_text: Sequence[str]) -> dict[str, float]:
    """Fill episode.reward with the weighted reward; return the mean of each component."""
    from chatsmith.eval.rewards import reward_fields

    fields = reward_fields([e.record for e in episodes], [len(e.completion_ids) for e in episodes])
    total, parts = rewards.score(list(prompts_text), [e.text for e in episodes], fields)
    for e, r in zip(episodes, total):
        e.reward = float(r)
    return {f"reward_{k}": sum(v) / len(v) for k, v in parts.items()} if len(parts) > 1 else {}


def episode_stats(episodes: Sequence[Episode], parts: dict[str, float], group_size: int = 1) -> dict[str, float]:
    """Rollout statistics over the episodes of every process: reward mean and (sample) std, mean
    response length, the fraction that stopped by themselves, the reward components' means
    (`parts`: this process's means; every process holds as many episodes), and with groups the
    fraction of groups whose completions all scored the same (no learning signal)."""
    from chatsmith.train.dist import all_sum, world_size

    r = [e.reward for e in episodes]
    groups = [r[i:i + group_size] for i in range(0, len(r), group_size)]
    keys = sorted(parts)
    n, s, ss, length, stopped, flat, n_groups, *part_sums = all_sum(
        [len(r), sum(r), sum(x * x for x in r), sum(len(e.completion_ids) for e in episodes),
         sum(e.finish_reason == "stop" for e in episodes), sum(max(g) == min(g) for g in groups), len(groups),
         *(parts[k] for k in keys)])
    mean = s / n
    out = {"reward_mean": mean, "reward_std": math.sqrt(max(ss - n * mean * mean, 0.0) / (n - 1)) if n > 1 else 0.0,
           "response_length": length / n, "stopped_frac": stopped / n,
           **{k: v / world_size() for k, v in zip(keys, part_sums)}}
    if group_size > 1:
        out["zero_std_groups"] = flat / n_groups
    return out


def prompt_text(e: Episode) -> str:
    """The last user message of an episode's prompt (what text rewards see as the prompt)."""
    p = e.record.get("prompt")
    return p if isinstance(p, str) else str(p[-1]["content"])


def completion_logprobs(model: Any, episodes: Sequence[Episode], chunk: int = 16,
                        with_hidden: bool = False) -> tuple[list[list[float]], list[Any]]:
    """Trainer-side log p(completion token) of each episode under `model` (no gradient), from the
    same packed forward the loss uses. With with_hidden, also the last hidden state at those
    positions (the critic's input). Returns (log-probs per episode, hidden [T_i, H] per episode)."""
    import torch

    from chatsmith.train.losses import token_logprobs
    from chatsmith.train.rl_batches import RLBatchSpec, collate_episodes

    spec = RLBatchSpec()
    lps: list[list[float]] = []
    hid: list[Any] = []
    with torch.no_grad():
        for i in range(0, len(episodes), chunk):
            part = list(episodes[i:i + chunk])
            b = collate_episodes(part, spec)
            out = model(input_ids=b["input_ids"].to(_device(model)), position_ids=b["position_ids"].to(_device(model)),
                        logits_to_keep=b["target_positions"].to(_device(model)), use_cache=False,
                        output_hidden_states=with_hidden, segment_bounds=b["segment_bounds"])
            lp = token_logprobs(out.logits[0], b["targets"].to(out.logits.device)).cpu()
            h = out.hidden_states[-1][0, b["target_positions"].to(out.logits.device)].cpu() if with_hidden else None
            start = 0
            for e in part:
                n = len(e.completion_ids)
                lps.append(lp[start:start + n].tolist())
                if with_hidden:
                    hid.append(h[start:start + n])
                start += n
    return lps, hid


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def load_policy(cfg: Any, need_reference: bool) -> tuple[Any, Any, Any]:
    """(trainable policy, tokenizer, frozen reference or None).

    Memory-lean default: with LoRA/DoRA there is ONE base model in memory; the reference is that
    base with the adapter disabled (`reference_logprobs`), so no copy is made. Full and freeze
    fine-tuning change the base weights, so they keep a frozen copy when a reference is needed.
    """
    import copy

    import torch

    from chatsmith.models import load_model
    from chatsmith.models.adapters import PEFT_METHODS, prepare_trainable
    from chatsmith.models.attention import enable_segment_attention
    from chatsmith.train.prepare import add_template_tokens

    model, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)
    add_template_tokens(model, tokenizer, cfg.template)
    enable_segment_attention(model)   # packed rows: attention per episode, not over the whole row
    ref = None
    if need_reference and cfg.method not in PEFT_METHODS:
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    model = prepare_trainable(model, cfg)
    return model, tokenizer, ref


def reference_logprobs(policy: Any, ref: Any, episodes: Sequence[Episode]) -> list[list[float]]:
    """log p_ref(completion tokens): the frozen copy, or the policy with its adapter disabled."""
    if ref is not None:
        return completion_logprobs(ref, episodes)[0]
    with policy.disable_adapter():
        return completion_logprobs(policy, episodes)[0]


def prompt_order(n: int, index: int, per_rollout: int, seed: int, *, processes: int = 1, rank: int = 0) -> list[int]:
    """Indices of this process's prompts in rollout `index`: the rollout takes per_rollout x
    processes prompts, epoch by epoch through a seeded shuffle of all n, and process r takes the
    r-th run of per_rollout of them (so P processes together see what one process with
    per_rollout x P sees)."""
    out = []
    first = (index * processes + rank) * per_rollout
    for j in range(first, first + per_rollout):
        epoch, k = divmod(j, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[k])
    return out


def total_steps(cfg: Any, n_prompts: int) -> int:
    """Optimizer steps: --max-steps, or --epochs over the prompts (each rollout gives
    ppo_epochs x num_minibatches steps)."""
    if cfg.max_steps and cfg.max_steps > 0:
        return cfg.max_steps
    rollouts = max(1, math.ceil(cfg.epochs * n_prompts / cfg.batch_size))
    return rollouts * cfg.ppo_epochs * cfg.num_minibatches
