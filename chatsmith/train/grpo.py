"""Group-relative policy optimisation: the `chatsmith grpo` stage (and RLOO with --estimator rloo).

For each rollout: G completions per prompt from the current policy, rewards, advantages relative
to the group (DeepSeekMath, Shao et al. 2024; RLOO, Ahmadian et al. 2024), then the clipped
objective with an optional k3 KL to the reference. No critic. The one training loop runs the
updates; this module supplies the rollouts (as its batch source) and the loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from chatsmith.config import GRPOConfig
from chatsmith.train.losses import (
    aggregate_token_loss,
    clipped_policy_loss,
    kl_k3,
    token_logprobs_and_entropy,
)


def grpo_loss(model: Any, batch: dict[str, Any], *, clip_eps: float, clip_eps_high: float | None,
              kl_coef: float, aggregation: str, max_new_tokens: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over the batch's units of -min(rho A, clip(rho) A) + beta k3 (see losses.py)."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                logits_to_keep=batch["target_positions"], use_cache=False, segment_bounds=batch["segment_bounds"])
    logp, entropy = token_logprobs_and_entropy(out.logits[0], batch["targets"])
    per_token, clipped = clipped_policy_loss(logp, batch["old_logprobs"], batch["advantages"], clip_eps, clip_eps_high)
    agg = partial(aggregate_token_loss, seq_index=batch["seq_index"], n_seqs=batch["n_seqs"], mode=aggregation,
                  max_new_tokens=max_new_tokens)
    metrics = {"clip_frac": float(agg(clipped)), "entropy": float(agg(entropy))}
    if kl_coef > 0:
        kl = kl_k3(logp, batch["ref_logprobs"])
        per_token = per_token + kl_coef * kl
        metrics["kl"] = float(agg(kl.detach()))
    loss = agg(per_token)
    metrics["policy_loss"] = float(loss.detach())
    return loss, metrics


def grpo_rollout(engine: Any, policy: Any, ref: Any, prompts: list[Any], *, params: Any, group_size: int,
                 stop_ids: set[int], score: Callable[[list[Any]], dict[str, float]], estimator: str = "grpo",
                 scale_rewards: bool = True, kl_coef: float = 0.0,
                 first_sequence: int = 0) -> tuple[list[Any], dict[str, float]]:
    """Sample G completions per prompt with the current policy, score them (`score` fills each
    episode's reward and returns component means), and attach group advantages and, when
    kl_coef > 0, reference log-probs. Returns (episodes, rollout metrics over every process).
    `first_sequence`: this process's first sequence in the whole rollout (it fixes the seeds)."""
    from chatsmith.train.losses import group_advantages
    from chatsmith.train.rollout import episode_stats, generate_episodes, reference_logprobs

    t0 = time.perf_counter()
    episodes = generate_episodes(engine, prompts, group_size=group_size, params=params, stop_ids=stop_ids,
                                 first_sequence=first_sequence)
    gen_s = time.perf_counter() - t0
    parts = score(episodes)
    r = torch.tensor([e.reward for e in episodes])
    adv = group_advantages(r, group_size, estimator, scale=scale_rewards)
    for e, a in zip(episodes, adv.tolist()):
        e.advantages = [a] * len(e.completion_ids)
    if kl_coef > 0:
        for e, lp in zip(episodes, reference_logprobs(policy, ref, episodes)):
            e.ref_logprobs = lp
    generated = sum(len(e.completion_ids) for e in episodes)
    return episodes, {**episode_stats(episodes, parts, group_size),
                      "generation_time_s": gen_s, "gen_tokens_per_s": generated / max(gen_s, 1e-9)}


def grpo_trainer(cfg: GRPOConfig, model: Any, ref: Any, engine: Any, prompts: list[Any], *, steps: int,
                 score: Callable[[list[Any]], dict[str, float]], run: Path, stop_ids: set[int],
                 extra_metrics: Callable[[int], dict[str, float]] | None = None,
                 evaluators: Sequence[Callable[[Any, int], dict[str, float]]] = ()) -> tuple[Any, Any]:
    """The one training loop wired to GRPO rollouts: returns (Trainer, RolloutBatches). With P
    processes, each rollout takes batch_size x P prompts and this process generates its share."""
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.models.attention import segment_attention_enabled
    from chatsmith.train.dist import rank, world_size
    from chatsmith.train.loop import Objective, Trainer
    from chatsmith.train.rl_batches import RLBatchSpec, RolloutBatches
    from chatsmith.train.rollout import prompt_order

    def make_rollout(index: int) -> tuple[list, dict[str, float]]:
        chosen = [prompts[i] for i in prompt_order(len(prompts), index, cfg.batch_size, cfg.seed,
                                                   processes=world_size(), rank=rank())]
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 100_003 + index)
        return grpo_rollout(engine, model, ref, chosen, params=params, group_size=cfg.group_size, stop_ids=stop_ids,
                            score=score, estimator=cfg.estimator, scale_rewards=cfg.scale_rewards,
                            kl_coef=cfg.kl_coef, first_sequence=rank() * cfg.batch_size * cfg.group_size)

    # The G answers of a prompt share one copy of it in the training row (segment attention).
    spec = RLBatchSpec(cfg.loss_aggregation, cfg.max_new_tokens, share_prompts=segment_attention_enabled(model))
    source = RolloutBatches(make_rollout, spec=spec,
                            ppo_epochs=cfg.ppo_epochs, num_minibatches=cfg.num_minibatches, grad_accum=cfg.grad_accum,
                            seed=cfg.seed, after_update=engine.sync_weights)

    def metrics(done: int) -> dict[str, float]:
        return {**source.metrics(), **(extra_metrics(done) if extra_metrics else {})}

    objective = Objective("grpo" if cfg.estimator == "grpo" else "rloo",
                          partial(grpo_loss, clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                  kl_coef=cfg.kl_coef, aggregation=cfg.loss_aggregation,
                                  max_new_tokens=cfg.max_new_tokens),
                          collate=lambda x: x, unit="sequences")
    trainer = Trainer(model=model, objective=objective, train_examples=[], plan=[[[]]] * steps, cfg=cfg, run_dir=run,
                      extra_metrics=metrics, evaluators=evaluators, batch_source=source)
    return trainer, source


def run_grpo(cfg: GRPOConfig) -> Path:
    """Train and write the run directory (metrics.jsonl, rl.png, summary.json, final/)."""
    from chatsmith.models.adapters import trainable_parameters
    from chatsmith.models.attention import disable_segment_attention
    from chatsmith.models.saving import save_final
    from chatsmith.train.dist import is_main
    from chatsmith.train.prepare import say, write_json
    from chatsmith.train.rl import describe_prompts, prepare_rl, rl_summary, train_rl

    setup = prepare_rl(cfg, need_reference=cfg.kl_coef > 0)
    n_train, n_total = trainable_parameters(setup.model)
    say(f"{describe_prompts(setup)}; method {cfg.method}: training {n_train:,} of {n_total:,} parameters; "
        f"{setup.steps} steps of {cfg.batch_size} prompts x {cfg.group_size} completions ({cfg.estimator})")
    trainer, source = grpo_trainer(
        cfg, setup.model, setup.ref, setup.engine, setup.prompts, steps=setup.steps, run=setup.run,
        stop_ids=setup.stops, score=setup.score, evaluators=setup.evaluators())
    result, before, after = train_rl(setup, trainer, trainer.objective.name)
    if is_main():
        disable_segment_attention(trainer.unwrapped())
        save_final(trainer.unwrapped(), setup.tokenizer, cfg, setup.run)
        write_json(setup.run / "summary.json", rl_summary(setup, result, before, after, source.rollouts))
    say(f"done: {setup.run}/final  (chat with it: chatsmith chat {setup.run})")
    return setup.run
