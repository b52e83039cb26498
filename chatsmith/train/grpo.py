"""Group-relative policy optimisation: the `chatsmith grpo` stage (and RLOO with --estimator rloo).

For each rollout: G completions per prompt from the current policy, rewards, advantages relative
to the group (DeepSeekMath, Shao et al. 2024; RLOO, Ahmadian et al. 2024), then the clipped
objective with an optional k3 KL to the reference. No critic. The one training loop runs the
updates; this module supplies the rollouts (as its batch source) and the loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from chatsmith.config import GRPOConfig
from chatsmith.train.losses import aggregate_token_loss, clipped_policy_loss, kl_k3


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) [N] and the entropy of each position's distribution [N] (fp32)."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():   # entropy is only logged here; it costs nothing to keep it out of the graph
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


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
                 scale_rewards: bool = True, kl_coef: float = 0.0, tokenizer: Any = None) -> tuple[list[Any], dict[str, float]]:
    """Sample G completions per prompt with the current policy, score them (`score` fills each
    episode's reward and returns component means), and attach group advantages and, when
    kl_coef > 0, reference log-probs. Returns (episodes, rollout metrics)."""
    from chatsmith.train.losses import group_advantages
    from chatsmith.train.rollout import generate_episodes, reference_logprobs

    t0 = time.perf_counter()
    episodes = generate_episodes(engine, tokenizer, prompts, group_size=group_size, params=params, stop_ids=stop_ids)
    gen_s = time.perf_counter() - t0
    parts = score(episodes)
    r = torch.tensor([e.reward for e in episodes])
    adv = group_advantages(r, group_size, estimator, scale=scale_rewards)
    for e, a in zip(episodes, adv.tolist()):
        e.advantages = [a] * len(e.completion_ids)
    if kl_coef > 0:
        for e, lp in zip(episodes, reference_logprobs(policy, ref, episodes)):
            e.ref_logprobs = lp
    lengths = [len(e.completion_ids) for e in episodes]
    groups = r.view(-1, group_size)
    return episodes, {
        "reward_mean": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
        "response_length": sum(lengths) / len(lengths),
        "stopped_frac": sum(e.finish_reason == "stop" for e in episodes) / len(episodes),
        # Groups whose completions all scored the same give zero advantage: no learning signal.
        "zero_std_groups": float((groups.std(dim=1) == 0).float().mean()),
        "generation_time_s": gen_s, "gen_tokens_per_s": sum(lengths) / max(gen_s, 1e-9),
        **parts,
    }


def grpo_trainer(cfg: GRPOConfig, model: Any, ref: Any, engine: Any, prompts: list[Any], *, steps: int,
                 score: Callable[[list[Any]], dict[str, float]], run: Path, stop_ids: set[int], tokenizer: Any = None,
                 evaluate: Callable[[], dict[str, Any]] | None = None) -> tuple[Any, Any]:
    """The one training loop wired to GRPO rollouts: returns (Trainer, RolloutBatches)."""
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.models.attention import segment_attention_enabled
    from chatsmith.train.loop import Objective, Trainer
    from chatsmith.train.rollout import RLBatchSpec, RolloutBatches, prompt_order

    def make_rollout(index: int) -> tuple[list, dict[str, float]]:
        chosen = [prompts[i] for i in prompt_order(len(prompts), index, cfg.batch_size, cfg.seed)]
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 100_003 + index)
        return grpo_rollout(engine, model, ref, chosen, params=params, group_size=cfg.group_size, stop_ids=stop_ids,
                            score=score, estimator=cfg.estimator, scale_rewards=cfg.scale_rewards,
                            kl_coef=cfg.kl_coef, tokenizer=tokenizer)

    # The G answers of a prompt share one copy of it in the training row (segment attention).
    spec = RLBatchSpec(cfg.loss_aggregation, cfg.max_new_tokens, share_prompts=segment_attention_enabled(model))
    source = RolloutBatches(make_rollout, spec=spec,
                            ppo_epochs=cfg.ppo_epochs, num_minibatches=cfg.num_minibatches, grad_accum=cfg.grad_accum,
                            seed=cfg.seed, after_update=engine.sync_weights)

    def extra_metrics() -> dict[str, float]:
        out = source.metrics()
        done = source.step + 1
        if evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
            out.update({k: v for k, v in evaluate().items() if k != "samples"})
        return out

    objective = Objective("grpo" if cfg.estimator == "grpo" else "rloo",
                          partial(grpo_loss, clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                  kl_coef=cfg.kl_coef, aggregation=cfg.loss_aggregation,
                                  max_new_tokens=cfg.max_new_tokens),
                          collate=lambda x: x, unit="sequences")
    trainer = Trainer(model=model, objective=objective, train_examples=[], plan=[[[]]] * steps, cfg=cfg, run_dir=run,
                      extra_metrics=extra_metrics, batch_source=source)
    return trainer, source


def run_grpo(cfg: GRPOConfig) -> Path:
    """Train and write the run directory (metrics.jsonl, rl.png, summary.json, final/)."""
    from transformers import set_seed

    from chatsmith.data.template import stop_token_ids
    from chatsmith.eval.rewards import load_rewards
    from chatsmith.models.adapters import trainable_parameters
    from chatsmith.models.attention import disable_segment_attention
    from chatsmith.models.saving import save_final
    from chatsmith.train.prepare import prepare_run_dir, say, write_json
    from chatsmith.train.rollout import (
        append_metrics,
        evaluate_prompts,
        load_policy,
        load_prompt_records,
        make_engine,
        plot_rl_metrics,
        prompt_text,
        render_prompt_splits,
        score_episodes,
        total_steps,
    )

    set_seed(cfg.seed)
    rewards = load_rewards(cfg.reward)   # fail on a bad --reward before loading anything heavy
    train_records, held_records = load_prompt_records(cfg)
    run = prepare_run_dir(cfg)
    model, tokenizer, ref = load_policy(cfg, need_reference=cfg.kl_coef > 0)
    stops = stop_token_ids(tokenizer, cfg.template)
    prompts, held, dropped, limit = render_prompt_splits(cfg, tokenizer, train_records, held_records)
    steps = total_steps(cfg, len(prompts))
    n_train, n_total = trainable_parameters(model)
    say(f"{len(prompts)} training prompts ({dropped} longer than {limit} tokens dropped), {len(held)} held out; "
        f"method {cfg.method}: training {n_train:,} of {n_total:,} parameters; {steps} steps of "
        f"{cfg.batch_size} prompts x {cfg.group_size} completions ({cfg.estimator})")
    engine = make_engine(model, tokenizer, max_batch_size=cfg.generation_batch_size)
    evaluate = partial(evaluate_prompts, engine, tokenizer, rewards, held, max_new_tokens=cfg.max_new_tokens,
                       stop_ids=stops)
    trainer, source = grpo_trainer(
        cfg, model, ref, engine, prompts, steps=steps, run=run, stop_ids=stops, tokenizer=tokenizer,
        score=lambda eps: score_episodes(rewards, eps, [prompt_text(e) for e in eps]),
        evaluate=evaluate if held else None)
    t0 = time.perf_counter()
    before = evaluate(samples=3) if held else {}
    eval_s = time.perf_counter() - t0
    if before:
        say(f"held-out before: reward {before['eval_reward']:.3f} on {before['eval_prompts']} prompts")
        if not cfg.resume:   # step 0 of the curve: the policy before any update
            append_metrics(trainer, {"step": 0, **{k: v for k, v in before.items() if k != "samples"}})
    t1 = time.perf_counter()
    result = trainer.fit()
    train_s = time.perf_counter() - t1
    after = evaluate(samples=3) if held else {}
    if after:
        say(f"held-out after:  reward {after['eval_reward']:.3f} (before {before['eval_reward']:.3f})")
        append_metrics(trainer, {"step": steps, **{k: v for k, v in after.items() if k != "samples"}})
    plot_rl_metrics(trainer.history, run / "rl.png", f"{trainer.objective.name}: {run.name}")
    disable_segment_attention(trainer.unwrapped())
    save_final(trainer.unwrapped(), tokenizer, cfg, run)
    summary = {"steps": result.steps, "resumed_from": result.resumed_from, "train_prompts": len(prompts),
               "heldout_prompts": len(held), "dropped_prompts": dropped, "rollouts": source.rollouts,
               "train_time_s": train_s, "eval_time_s": eval_s, "before": before, "after": after,
               "final": result.final_metrics}
    write_json(run / "summary.json", summary)
    say(f"done: {run}/final  (chat with it: chatsmith chat {run})")
    return run
