"""PPO with a KL-bound reference, and PPO-ptx: the `chatsmith ppo` stage (InstructGPT stage 3).

Per rollout: one completion per prompt from the current policy; a score from the reward; a
per-token reward r_t = -kl_coef (log pi - log ref) with the score added at the last token
(Ziegler et al. 2019; Ouyang et al. 2022, Eq. 2); GAE advantages from the value head; then
ppo_epochs passes of clipped policy + clipped value loss (+ entropy bonus, + ptx SFT loss) over
minibatches, run by the one training loop. The KL coefficient adapts towards --kl-target.

Memory: one base model; LoRA for the actor, a value head on the shared trunk for the critic
(models/value_head.py says why), the reference = adapter disabled, the reward = a function or
one `chatsmith rm` model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from chatsmith.config import PPOConfig
from chatsmith.errors import ChatsmithError
from chatsmith.train.losses import (
    aggregate_token_loss,
    clipped_policy_loss,
    clipped_value_loss,
    gae_advantages,
    nll_sum,
    whiten,
)


class AdaptiveKLController:
    """kl_coef <- kl_coef (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon) (Ziegler et al. 2019, Sec. 2.2)."""

    def __init__(self, init: float, target: float | None, horizon: int) -> None:
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_episodes: int) -> float:
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.value *= 1.0 + error * n_episodes / self.horizon
        return self.value


@dataclass
class RunningMoments:
    """Running mean/std of scores (Chan et al. parallel update), for reward normalisation."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-4

    def update(self, xs: list[float]) -> None:
        n = len(xs)
        if n == 0:
            return
        m = sum(xs) / n
        v = sum((x - m) ** 2 for x in xs) / n
        delta, total = m - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + v * n + delta ** 2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))


def ppo_loss(model: Any, batch: dict[str, Any], *, clip_eps: float, clip_eps_high: float | None, value_clip: float,
             vf_coef: float, ent_coef: float, ptx_coef: float, aggregation: str,
             max_new_tokens: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over the batch's units of policy loss + vf_coef value loss - ent_coef entropy, plus
    ptx_coef x (mean SFT NLL on the attached ptx batch) x units (so the step mean weighs it ptx_coef)."""
    logits, values = model(batch["input_ids"], batch["position_ids"], batch["target_positions"],
                           segment_bounds=batch["segment_bounds"])
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    pl, clipped = clipped_policy_loss(logp, batch["old_logprobs"], batch["advantages"], clip_eps, clip_eps_high)
    vl, vclipped = clipped_value_loss(values, batch["old_values"], batch["returns"], value_clip)
    per_token = pl + vf_coef * vl - ent_coef * entropy
    agg = partial(aggregate_token_loss, seq_index=batch["seq_index"], n_seqs=batch["n_seqs"], mode=aggregation,
                  max_new_tokens=max_new_tokens)
    loss = agg(per_token)
    metrics = {"policy_loss": float(agg(pl.detach())), "value_loss": float(agg(vl.detach())),
               "entropy": float(agg(entropy.detach())), "clip_frac": float(agg(clipped)),
               "value_clip_frac": float(agg(vclipped)),
               "approx_kl_old": float(agg(0.5 * (logp.detach() - batch["old_logprobs"]) ** 2))}
    if ptx_coef > 0 and "ptx_input_ids" in batch:
        policy = model.policy
        out = policy(input_ids=batch["ptx_input_ids"], position_ids=batch["ptx_position_ids"],
                     logits_to_keep=batch["ptx_target_positions"], use_cache=False,
                     segment_bounds=batch["ptx_segment_bounds"])
        ptx = nll_sum(out.logits[0], batch["ptx_targets"]) / max(1, batch["ptx_targets"].numel())
        loss = loss + ptx_coef * ptx * batch["n_targets"]
        metrics["ptx_loss"] = float(ptx.detach()) * batch["n_targets"]
    return loss, metrics


def values_and_logprobs(model: Any, episodes: list[Any], chunk: int = 16) -> tuple[list[list[float]], list[list[float]]]:
    """Current policy log-probs and critic values of each episode's completion tokens (no gradient)."""
    from chatsmith.train.rollout import RLBatchSpec, collate_episodes

    dev = next(model.parameters()).device
    lps, vals = [], []
    with torch.no_grad():
        for i in range(0, len(episodes), chunk):
            part = episodes[i:i + chunk]
            b = collate_episodes(part, RLBatchSpec())
            logits, v = model(b["input_ids"].to(dev), b["position_ids"].to(dev), b["target_positions"].to(dev),
                              segment_bounds=b["segment_bounds"])
            lp = torch.log_softmax(logits.float(), -1).gather(-1, b["targets"].to(dev).unsqueeze(-1)).squeeze(-1)
            start = 0
            for e in part:
                n = len(e.completion_ids)
                lps.append(lp[start:start + n].tolist())
                vals.append(v[start:start + n].tolist())
                start += n
    return lps, vals


def ppo_targets(episodes: list[Any], scores: list[float], *, kl_coef: float, gamma: float, lam: float,
                whiten_advantages: bool) -> dict[str, float]:
    """Per-token rewards (score at the last token minus the KL penalty), GAE advantages and
    returns, written into the episodes (which already carry logprobs, ref_logprobs, values).
    Returns the rollout's KL and explained-variance statistics."""
    kls, all_adv, all_ret, all_val = [], [], [], []
    for e, s in zip(episodes, scores):
        lp, ref, v = torch.tensor(e.logprobs), torch.tensor(e.ref_logprobs), torch.tensor(e.values)
        kl = lp - ref                               # k1 per token: its sum is the sequence KL estimate
        rewards = -kl_coef * kl
        rewards[-1] += s
        adv, ret = gae_advantages(rewards, v, gamma, lam)
        e.advantages, e.returns = adv.tolist(), ret.tolist()
        kls.append(float(kl.sum()))
        all_adv.append(adv)
        all_ret.append(ret)
        all_val.append(v)
    if whiten_advantages:
        flat = whiten(torch.cat(all_adv))
        start = 0
        for e in episodes:
            n = len(e.completion_ids)
            e.advantages = flat[start:start + n].tolist()
            start += n
    ret, val = torch.cat(all_ret), torch.cat(all_val)
    var = float(ret.var(unbiased=False))
    explained = 1.0 - float((ret - val).var(unbiased=False)) / var if var > 1e-12 else 0.0
    return {"kl": sum(kls) / len(kls), "explained_variance": explained}


def ppo_rollout(engine: Any, model: Any, ref: Any, prompts: list[Any], *, params: Any, stop_ids: set[int],
                score: Callable[[list[Any]], dict[str, float]], cfg: PPOConfig, kl_ctl: AdaptiveKLController,
                moments: RunningMoments, tokenizer: Any = None) -> tuple[list[Any], dict[str, float]]:
    """Generate, score, evaluate critic and reference, build PPO targets; update the KL coefficient."""
    from chatsmith.train.rollout import generate_episodes, reference_logprobs

    t0 = time.perf_counter()
    episodes = generate_episodes(engine, tokenizer, prompts, group_size=1, params=params, stop_ids=stop_ids)
    gen_s = time.perf_counter() - t0
    parts = score(episodes)
    raw = [e.reward for e in episodes]
    # Old log-probs come from the same packed forward the loss uses (it is needed for the values
    # anyway), so the first ratio of every minibatch is exactly 1.
    lps, vals = values_and_logprobs(model, episodes)
    refs = reference_logprobs(model.policy, ref, episodes)
    for e, lp, v, r in zip(episodes, lps, vals, refs):
        e.logprobs, e.values, e.ref_logprobs = lp, v, r
    scores = list(raw)
    if cfg.reward_norm:
        moments.update(raw)
        scores = [(s - moments.mean) / moments.std for s in raw]
    if cfg.reward_clip > 0:
        scores = [max(-cfg.reward_clip, min(cfg.reward_clip, s)) for s in scores]
    coef = kl_ctl.value
    stats = ppo_targets(episodes, scores, kl_coef=coef, gamma=cfg.gamma, lam=cfg.lam,
                        whiten_advantages=cfg.whiten_advantages)
    kl_ctl.update(stats["kl"], len(episodes))
    r = torch.tensor(raw)
    lengths = [len(e.completion_ids) for e in episodes]
    return episodes, {
        "reward_mean": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
        "kl_coef": coef, "response_length": sum(lengths) / len(lengths),
        "stopped_frac": sum(e.finish_reason == "stop" for e in episodes) / len(episodes),
        "generation_time_s": gen_s, "gen_tokens_per_s": sum(lengths) / max(gen_s, 1e-9), **stats, **parts,
    }


def ptx_batches(cfg: PPOConfig, tokenizer: Any, steps: int) -> Callable[[int, int], dict[str, Any]] | None:
    """PPO-ptx: the SFT examples of --ptx-data, one packed micro-batch per (step, micro-batch)."""
    if not cfg.ptx_data or cfg.ptx_coef <= 0:
        return None
    from types import SimpleNamespace

    from chatsmith.data.packing import collate_packed
    from chatsmith.train.plan import plan_steps
    from chatsmith.train.prepare import load_conversations, say
    from chatsmith.train.sft import render_examples

    shim = SimpleNamespace(data=cfg.ptx_data, columns=cfg.columns, skip_bad=cfg.skip_bad,
                           system_prompt=cfg.system_prompt, seed=cfg.seed)
    examples, _ = render_examples(tokenizer, load_conversations(shim), cfg)
    if not examples:
        raise ChatsmithError(f"--ptx-data {' '.join(cfg.ptx_data)}: no example has a trained (assistant) token")
    plan = plan_steps([len(e) for e in examples], batch_size=cfg.ptx_batch_size, grad_accum=cfg.grad_accum,
                      max_steps=steps, epochs=1, seed=cfg.seed + 1)
    say(f"PPO-ptx: {len(examples)} SFT examples from {', '.join(cfg.ptx_data)}, coefficient {cfg.ptx_coef}")

    def get(step: int, micro: int) -> dict[str, Any]:
        mbs = plan[step]
        b = collate_packed([examples[i] for i in mbs[micro % len(mbs)]])
        return {"ptx_input_ids": b["input_ids"], "ptx_position_ids": b["position_ids"],
                "ptx_target_positions": b["target_positions"], "ptx_targets": b["targets"],
                "ptx_segment_bounds": b["segment_bounds"]}

    return get


def ppo_trainer(cfg: PPOConfig, model: Any, ref: Any, engine: Any, prompts: list[Any], *, steps: int,
                score: Callable[[list[Any]], dict[str, float]], run: Path, stop_ids: set[int], tokenizer: Any = None,
                evaluate: Callable[[], dict[str, Any]] | None = None,
                ptx: Callable[[int, int], dict[str, Any]] | None = None) -> tuple[Any, Any, AdaptiveKLController]:
    """The one training loop wired to PPO rollouts. `model` is a PolicyWithValueHead."""
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.train.loop import Objective, Trainer
    from chatsmith.train.rollout import RLBatchSpec, RolloutBatches, prompt_order

    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)
    moments = RunningMoments()

    def make_rollout(index: int) -> tuple[list, dict[str, float]]:
        chosen = [prompts[i] for i in prompt_order(len(prompts), index, cfg.batch_size, cfg.seed)]
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 100_003 + index)
        return ppo_rollout(engine, model, ref, chosen, params=params, stop_ids=stop_ids, score=score, cfg=cfg,
                           kl_ctl=kl_ctl, moments=moments, tokenizer=tokenizer)

    rollouts = RolloutBatches(make_rollout, spec=RLBatchSpec(cfg.loss_aggregation, cfg.max_new_tokens),
                              ppo_epochs=cfg.ppo_epochs, num_minibatches=cfg.num_minibatches,
                              grad_accum=cfg.grad_accum, seed=cfg.seed, after_update=engine.sync_weights)

    def source(step: int) -> list[dict[str, Any]]:
        batches = rollouts(step)
        if ptx is not None:
            for j, b in enumerate(batches):
                b.update(ptx(step, j))
        return batches

    def extra_metrics() -> dict[str, float]:
        out = rollouts.metrics()
        done = rollouts.step + 1
        if evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
            out.update({k: v for k, v in evaluate().items() if k != "samples"})
        return out

    objective = Objective("ppo", partial(ppo_loss, clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                         value_clip=cfg.value_clip, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef,
                                         ptx_coef=cfg.ptx_coef if ptx is not None else 0.0,
                                         aggregation=cfg.loss_aggregation, max_new_tokens=cfg.max_new_tokens),
                          collate=lambda x: x, unit="tokens")
    trainer = Trainer(model=model, objective=objective, train_examples=[], plan=[[[]]] * steps, cfg=cfg, run_dir=run,
                      extra_metrics=extra_metrics, batch_source=source)
    rollouts.kl_ctl = kl_ctl
    return trainer, rollouts, kl_ctl


def run_ppo(cfg: PPOConfig) -> Path:
    """Train and write the run directory (metrics.jsonl, rl.png, summary.json, final/, value_head.safetensors)."""
    from safetensors.torch import save_file
    from transformers import set_seed

    from chatsmith.data.template import stop_token_ids
    from chatsmith.eval.rewards import load_rewards
    from chatsmith.models.adapters import trainable_parameters
    from chatsmith.models.attention import disable_segment_attention
    from chatsmith.models.saving import save_final
    from chatsmith.models.value_head import PolicyWithValueHead
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
    rewards = load_rewards(cfg.reward)
    train_records, held_records = load_prompt_records(cfg)
    run = prepare_run_dir(cfg)
    policy, tokenizer, ref = load_policy(cfg, need_reference=True)
    model = PolicyWithValueHead(policy)
    stops = stop_token_ids(tokenizer, cfg.template)
    prompts, held, dropped, limit = render_prompt_splits(cfg, tokenizer, train_records, held_records)
    steps = total_steps(cfg, len(prompts))
    n_train, n_total = trainable_parameters(model)
    say(f"{len(prompts)} training prompts ({dropped} longer than {limit} tokens dropped), {len(held)} held out; "
        f"method {cfg.method} + value head: training {n_train:,} of {n_total:,} parameters; {steps} steps "
        f"({cfg.batch_size} prompts per rollout, {cfg.ppo_epochs} epochs x {cfg.num_minibatches} minibatches)")
    engine = make_engine(policy, tokenizer, max_batch_size=cfg.generation_batch_size)
    evaluate = partial(evaluate_prompts, engine, tokenizer, rewards, held, max_new_tokens=cfg.max_new_tokens,
                       stop_ids=stops)
    trainer, rollouts, kl_ctl = ppo_trainer(
        cfg, model, ref, engine, prompts, steps=steps, run=run, stop_ids=stops, tokenizer=tokenizer,
        score=lambda eps: score_episodes(rewards, eps, [prompt_text(e) for e in eps]),
        evaluate=evaluate if held else None, ptx=ptx_batches(cfg, tokenizer, steps))
    before = evaluate(samples=3) if held else {}
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
    plot_rl_metrics(trainer.history, run / "rl.png", f"ppo: {run.name}")
    unwrapped = trainer.unwrapped()
    disable_segment_attention(unwrapped.policy)
    save_file({k: v.detach().contiguous() for k, v in unwrapped.value_head.state_dict().items()},
              str(run / "value_head.safetensors"))
    save_final(unwrapped.policy, tokenizer, cfg, run)
    kls = [r["kl"] for r in trainer.history if "kl" in r]
    summary = {"steps": result.steps, "resumed_from": result.resumed_from, "train_prompts": len(prompts),
               "heldout_prompts": len(held), "dropped_prompts": dropped, "rollouts": rollouts.rollouts,
               "train_time_s": train_s, "before": before, "after": after, "kl_target": cfg.kl_target,
               "kl_max": max(kls) if kls else None, "kl_last": kls[-1] if kls else None,
               "kl_coef_final": kl_ctl.value, "final": result.final_metrics}
    write_json(run / "summary.json", summary)
    say(f"done: {run}/final  (chat with it: chatsmith chat {run})")
    return run
