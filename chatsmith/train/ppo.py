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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from chatsmith.config import PPOConfig
from chatsmith.errors import ChatsmithError
from chatsmith.train.dist import unwrap
from chatsmith.train.losses import (
    aggregate_token_loss,
    clipped_policy_loss,
    clipped_value_loss,
    gae_advantages,
    nll_sum,
    token_logprobs,
    token_logprobs_and_entropy,
    whiten,
)


class AdaptiveKLController:
    """kl_coef <- kl_coef (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon) (Ziegler et al. 2019, Sec. 2.2)."""

    def __init__(self, init: float, target: float | None, horizon: int) -> None:
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_episodes: int) -> float:
        """Move the coefficient towards the target after a rollout of n_episodes with mean KL `kl`."""
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.value *= 1.0 + error * n_episodes / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        """The coefficient, saved in every checkpoint (a resumed run continues from it)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue from a checkpoint's coefficient."""
        self.value = float(state["value"])


@dataclass
class RunningMoments:
    """Running mean/std of scores (Chan et al. parallel update), for reward normalisation."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-4

    def update(self, xs: list[float]) -> None:
        """Merge a batch of scores into the running mean and variance."""
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
        """The running standard deviation (at least 1e-4)."""
        return math.sqrt(max(self.var, 1e-8))

    def state_dict(self) -> dict[str, float]:
        """The moments, saved in every checkpoint (a resumed run continues from them)."""
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue from a checkpoint's moments."""
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


def ppo_loss(model: Any, batch: dict[str, Any], *, clip_eps: float, clip_eps_high: float | None, value_clip: float,
             vf_coef: float, ent_coef: float, ptx_coef: float, aggregation: str,
             max_new_tokens: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over the batch's units of policy loss + vf_coef value loss - ent_coef entropy, plus
    ptx_coef x (mean SFT NLL on the attached ptx batch) x units (so the step mean weighs it ptx_coef)."""
    logits, values = model(batch["input_ids"], batch["position_ids"], batch["target_positions"],
                           segment_bounds=batch["segment_bounds"])
    if ent_coef == 0:   # the entropy is only logged: log-probs by row chunks, no [N, V] log-softmax kept
        logp, entropy = token_logprobs_and_entropy(logits, batch["targets"])
    else:               # the entropy bonus needs its gradient
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
        policy = unwrap(model).policy
        out = policy(input_ids=batch["ptx_input_ids"], position_ids=batch["ptx_position_ids"],
                     logits_to_keep=batch["ptx_target_positions"], use_cache=False,
                     segment_bounds=batch["ptx_segment_bounds"])
        ptx = nll_sum(out.logits[0], batch["ptx_targets"]) / max(1, batch["ptx_targets"].numel())
        loss = loss + ptx_coef * ptx * batch["n_targets"]
        metrics["ptx_loss"] = float(ptx.detach()) * batch["n_targets"]
    return loss, metrics


def values_and_logprobs(model: Any, episodes: list[Any], chunk: int = 16) -> tuple[list[list[float]], list[list[float]]]:
    """Current policy log-probs and critic values of each episode's completion tokens (no gradient)."""
    from chatsmith.train.rl_batches import RLBatchSpec, collate_episodes

    dev = next(model.parameters()).device
    lps, vals = [], []
    with torch.no_grad():
        for i in range(0, len(episodes), chunk):
            part = episodes[i:i + chunk]
            b = collate_episodes(part, RLBatchSpec())
            logits, v = model(b["input_ids"].to(dev), b["position_ids"].to(dev), b["target_positions"].to(dev),
                              segment_bounds=b["segment_bounds"])
            lp = token_logprobs(logits, b["targets"].to(dev))
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
    Returns the rollout's KL and explained-variance statistics. With several processes the
    whitening and the statistics are over every process's episodes."""
    from chatsmith.train.dist import all_sum

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
    adv, ret, val = torch.cat(all_adv).double(), torch.cat(all_ret).double(), torch.cat(all_val).double()
    err = ret - val
    n, a1, a2, r1, r2, e1, e2, kl_sum, n_eps = all_sum(
        [adv.numel(), float(adv.sum()), float((adv * adv).sum()), float(ret.sum()), float((ret * ret).sum()),
         float(err.sum()), float((err * err).sum()), sum(kls), len(kls)])
    if whiten_advantages:
        mean = a1 / n
        flat = whiten(adv.float(), mean=mean, var=max(a2 / n - mean * mean, 0.0))
        start = 0
        for e in episodes:
            k = len(e.completion_ids)
            e.advantages = flat[start:start + k].tolist()
            start += k
    var = r2 / n - (r1 / n) ** 2
    explained = 1.0 - (e2 / n - (e1 / n) ** 2) / var if var > 1e-12 else 0.0
    return {"kl": kl_sum / n_eps, "explained_variance": explained}


def ppo_rollout(engine: Any, model: Any, ref: Any, prompts: list[Any], *, params: Any, stop_ids: set[int],
                score: Callable[[list[Any]], dict[str, float]], cfg: PPOConfig, kl_ctl: AdaptiveKLController,
                moments: RunningMoments, first_sequence: int = 0) -> tuple[list[Any], dict[str, float]]:
    """Generate, score, evaluate critic and reference, build PPO targets; update the KL coefficient.
    With several processes the reward moments, the KL coefficient and the statistics follow every
    process's episodes (`first_sequence`: this process's first sequence of the rollout)."""
    from chatsmith.train.dist import all_gather, world_size
    from chatsmith.train.rollout import episode_stats, generate_episodes, reference_logprobs

    t0 = time.perf_counter()
    episodes = generate_episodes(engine, prompts, group_size=1, params=params, stop_ids=stop_ids,
                                 first_sequence=first_sequence)
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
        moments.update(all_gather(raw))   # the same update on every process
        scores = [(s - moments.mean) / moments.std for s in raw]
    if cfg.reward_clip > 0:
        scores = [max(-cfg.reward_clip, min(cfg.reward_clip, s)) for s in scores]
    coef = kl_ctl.value
    stats = ppo_targets(episodes, scores, kl_coef=coef, gamma=cfg.gamma, lam=cfg.lam,
                        whiten_advantages=cfg.whiten_advantages)
    kl_ctl.update(stats["kl"], len(episodes) * world_size())
    generated = sum(len(e.completion_ids) for e in episodes)
    return episodes, {**episode_stats(episodes, parts), "kl_coef": coef, "generation_time_s": gen_s,
                      "gen_tokens_per_s": generated / max(gen_s, 1e-9), **stats}


def ptx_batches(cfg: PPOConfig, tokenizer: Any, steps: int) -> Callable[[int, int], dict[str, Any]] | None:
    """PPO-ptx: the SFT examples of --ptx-data, one packed micro-batch per (step, micro-batch)."""
    if not cfg.ptx_data or cfg.ptx_coef <= 0:
        return None
    from types import SimpleNamespace

    from chatsmith.data.packing import collate_packed
    from chatsmith.train.dist import rank, world_size
    from chatsmith.train.plan import plan_steps
    from chatsmith.train.prepare import load_conversations, say
    from chatsmith.train.sft import render_examples

    shim = SimpleNamespace(data=cfg.ptx_data, columns=cfg.columns, skip_bad=cfg.skip_bad,
                           system_prompt=cfg.system_prompt, seed=cfg.seed)
    examples, _ = render_examples(tokenizer, load_conversations(shim), cfg)
    if not examples:
        raise ChatsmithError(f"--ptx-data {' '.join(cfg.ptx_data)}: no example has a trained (assistant) token")
    plan = plan_steps([len(e) for e in examples], batch_size=cfg.ptx_batch_size, grad_accum=cfg.grad_accum,
                      max_steps=steps, epochs=1, seed=cfg.seed + 1, processes=world_size())
    say(f"PPO-ptx: {len(examples)} SFT examples from {', '.join(cfg.ptx_data)}, coefficient {cfg.ptx_coef}")

    def get(step: int, micro: int) -> dict[str, Any]:
        mbs = plan[step][rank()::world_size()]   # this process's share of the step's SFT micro-batches
        b = collate_packed([examples[i] for i in mbs[micro % len(mbs)]])
        return {"ptx_input_ids": b["input_ids"], "ptx_position_ids": b["position_ids"],
                "ptx_target_positions": b["target_positions"], "ptx_targets": b["targets"],
                "ptx_segment_bounds": b["segment_bounds"]}

    return get


def ppo_trainer(cfg: PPOConfig, model: Any, ref: Any, engine: Any, prompts: list[Any], *, steps: int,
                score: Callable[[list[Any]], dict[str, float]], run: Path, stop_ids: set[int],
                extra_metrics: Callable[[int], dict[str, float]] | None = None,
                ptx: Callable[[int, int], dict[str, Any]] | None = None,
                evaluators: Sequence[Callable[[Any, int], dict[str, float]]] = ()) -> tuple[Any, Any, AdaptiveKLController]:
    """The one training loop wired to PPO rollouts. `model` is a PolicyWithValueHead. The KL
    controller and the reward moments are saved in every checkpoint. With P processes each
    rollout takes batch_size x P prompts and this process generates its share."""
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.train.dist import rank, world_size
    from chatsmith.train.loop import Objective, Trainer
    from chatsmith.train.rl_batches import RLBatchSpec, RolloutBatches
    from chatsmith.train.rollout import prompt_order

    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)
    moments = RunningMoments()

    def make_rollout(index: int) -> tuple[list, dict[str, float]]:
        chosen = [prompts[i] for i in prompt_order(len(prompts), index, cfg.batch_size, cfg.seed,
                                                   processes=world_size(), rank=rank())]
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 100_003 + index)
        return ppo_rollout(engine, model, ref, chosen, params=params, stop_ids=stop_ids, score=score, cfg=cfg,
                           kl_ctl=kl_ctl, moments=moments, first_sequence=rank() * cfg.batch_size)

    rollouts = RolloutBatches(make_rollout, spec=RLBatchSpec(cfg.loss_aggregation, cfg.max_new_tokens),
                              ppo_epochs=cfg.ppo_epochs, num_minibatches=cfg.num_minibatches,
                              grad_accum=cfg.grad_accum, seed=cfg.seed, after_update=engine.sync_weights)

    def source(step: int) -> list[dict[str, Any]]:
        batches = rollouts(step)
        if ptx is not None:
            for j, b in enumerate(batches):
                b.update(ptx(step, j))
        return batches

    def metrics(done: int) -> dict[str, float]:
        return {**rollouts.metrics(), **(extra_metrics(done) if extra_metrics else {})}

    objective = Objective("ppo", partial(ppo_loss, clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                         value_clip=cfg.value_clip, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef,
                                         ptx_coef=cfg.ptx_coef if ptx is not None else 0.0,
                                         aggregation=cfg.loss_aggregation, max_new_tokens=cfg.max_new_tokens),
                          collate=lambda x: x, unit="tokens")
    trainer = Trainer(model=model, objective=objective, train_examples=[], plan=[[[]]] * steps, cfg=cfg, run_dir=run,
                      extra_metrics=metrics, batch_source=source, checkpoint_objects=[kl_ctl, moments],
                      evaluators=evaluators)
    return trainer, rollouts, kl_ctl


def run_ppo(cfg: PPOConfig) -> Path:
    """Train and write the run directory (metrics.jsonl, rl.png, summary.json, final/, value_head.safetensors)."""
    from safetensors.torch import save_file

    from chatsmith.models.adapters import trainable_parameters
    from chatsmith.models.attention import disable_segment_attention
    from chatsmith.models.saving import save_final
    from chatsmith.models.value_head import PolicyWithValueHead
    from chatsmith.train.dist import is_main
    from chatsmith.train.prepare import say, write_json
    from chatsmith.train.rl import describe_prompts, prepare_rl, rl_summary, train_rl

    setup = prepare_rl(cfg, need_reference=True)
    model = PolicyWithValueHead(setup.model)
    n_train, n_total = trainable_parameters(model)
    say(f"{describe_prompts(setup)}; method {cfg.method} + value head: training {n_train:,} of {n_total:,} "
        f"parameters; {setup.steps} steps ({cfg.batch_size} prompts per rollout, {cfg.ppo_epochs} epochs x "
        f"{cfg.num_minibatches} minibatches)")
    trainer, rollouts, kl_ctl = ppo_trainer(
        cfg, model, setup.ref, setup.engine, setup.prompts, steps=setup.steps, run=setup.run, stop_ids=setup.stops,
        score=setup.score, evaluators=setup.evaluators(), ptx=ptx_batches(cfg, setup.tokenizer, setup.steps))
    result, before, after = train_rl(setup, trainer, "ppo")
    if is_main():
        unwrapped = trainer.unwrapped()
        disable_segment_attention(unwrapped.policy)
        save_file({k: v.detach().contiguous() for k, v in unwrapped.value_head.state_dict().items()},
                  str(setup.run / "value_head.safetensors"))
        save_final(unwrapped.policy, setup.tokenizer, cfg, setup.run)
        kls = [r["kl"] for r in trainer.history if "kl" in r]
        write_json(setup.run / "summary.json", rl_summary(
            setup, result, before, after, rollouts.rollouts, kl_target=cfg.kl_target,
            kl_max=max(kls) if kls else None, kl_last=kls[-1] if kls else None, kl_coef_final=kl_ctl.value))
    say(f"done: {setup.run}/final  (chat with it: chatsmith chat {setup.run})")
    return setup.run
