"""What `chatsmith ppo` and `chatsmith grpo` share around their loops: reading the prompts and the
rewards, loading the policy (and its reference) and the engine, the held-out evaluation before and
after training, the plot and the summary. Each stage adds its rollout and its loss.

Several processes: each process loads the policy and its own engine and generates its share of
every rollout (train/rollout.py); the held-out evaluation, the plot, the summary and final/ are
the main process's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any


@dataclass
class RLSetup:
    """Everything an RL stage needs before its trainer exists."""

    cfg: Any
    run: Path
    rewards: Any                     # eval.rewards.RewardSet
    model: Any                       # the trainable policy (a PeftModel with LoRA/DoRA)
    tokenizer: Any
    ref: Any                         # a frozen copy for full/freeze fine-tuning, else None
    engine: Any                      # infer.engine.Engine over `model`
    stops: set[int]
    prompts: list[Any]               # data.prompts.Prompt, training
    held: list[Any]                  # held out
    dropped: int
    limit: int
    steps: int
    evaluate: Callable[..., dict[str, Any]] | None = None   # held-out evaluation (main process only)
    timings: dict[str, float] = field(default_factory=dict)

    def score(self, episodes: list[Any]) -> dict[str, float]:
        """Fill each episode's reward; the components' means."""
        from chatsmith.train.rollout import prompt_text, score_episodes

        return score_episodes(self.rewards, episodes, [prompt_text(e) for e in episodes])


def prepare_rl(cfg: Any, *, need_reference: bool) -> RLSetup:
    """Check the rewards and read the prompts (before anything heavy loads), then create the run
    directory, load the policy, render the prompts and build the engine."""
    from transformers import set_seed

    from chatsmith.data.prompts import load_prompt_records, render_prompt_splits
    from chatsmith.data.template import stop_token_ids
    from chatsmith.eval.rewards import evaluate_rewards, load_rewards
    from chatsmith.infer.engine import Engine
    from chatsmith.train.dist import is_main
    from chatsmith.train.prepare import prepare_run_dir
    from chatsmith.train.rollout import load_policy, total_steps

    set_seed(cfg.seed)
    rewards = load_rewards(cfg.reward)   # fail on a bad --reward before loading anything heavy
    train_records, held_records = load_prompt_records(cfg)
    run = prepare_run_dir(cfg)
    model, tokenizer, ref = load_policy(cfg, need_reference=need_reference)
    stops = stop_token_ids(tokenizer, cfg.template)
    prompts, held, dropped, limit = render_prompt_splits(cfg, tokenizer, train_records, held_records)
    engine = Engine(model, tokenizer, max_batch_size=cfg.generation_batch_size)
    evaluate = partial(evaluate_rewards, engine, rewards, held, max_new_tokens=cfg.max_new_tokens,
                       stop_ids=stops) if held and is_main() else None
    return RLSetup(cfg, run, rewards, model, tokenizer, ref, engine, stops, prompts, held, dropped, limit,
                   total_steps(cfg, len(prompts)), evaluate)


def periodic_evaluation(setup: RLSetup) -> Callable[[int], dict[str, float]]:
    """Held-out metrics every --eval-every steps (not at the last step: `train_rl` evaluates after)."""
    cfg = setup.cfg

    def metrics(done: int) -> dict[str, float]:
        if setup.evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < setup.steps:
            return {k: v for k, v in setup.evaluate().items() if k != "samples"}
        return {}

    return metrics


def train_rl(setup: RLSetup, trainer: Any, title: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Held-out evaluation, `trainer.fit()`, held-out evaluation again, and the rl.png plot.
    Returns (loop result, before, after); the before/after records also go to metrics.jsonl."""
    from chatsmith.train.dist import is_main
    from chatsmith.train.plots import plot_rl_metrics
    from chatsmith.train.prepare import say

    evaluate = setup.evaluate
    t0 = time.perf_counter()
    before = evaluate(samples=3) if evaluate else {}
    setup.timings["eval_time_s"] = time.perf_counter() - t0
    if before:
        say(f"held-out before: reward {before['eval_reward']:.3f} on {before['eval_prompts']} prompts")
        if not setup.cfg.resume:   # step 0 of the curve: the policy before any update
            trainer.append_record({"step": 0, **{k: v for k, v in before.items() if k != "samples"}})
    t1 = time.perf_counter()
    result = trainer.fit()
    setup.timings["train_time_s"] = time.perf_counter() - t1
    after = evaluate(samples=3) if evaluate else {}
    if after:
        say(f"held-out after:  reward {after['eval_reward']:.3f} (before {before['eval_reward']:.3f})")
        trainer.append_record({"step": setup.steps, **{k: v for k, v in after.items() if k != "samples"}})
    if is_main():
        plot_rl_metrics(trainer.history, setup.run / "rl.png", f"{title}: {setup.run.name}")
    return result, before, after


def rl_summary(setup: RLSetup, result: Any, before: dict[str, Any], after: dict[str, Any],
               rollouts: int, **extra: Any) -> dict[str, Any]:
    """summary.json of an RL run."""
    return {"steps": result.steps, "resumed_from": result.resumed_from, "train_prompts": len(setup.prompts),
            "heldout_prompts": len(setup.held), "dropped_prompts": setup.dropped, "rollouts": rollouts,
            **setup.timings, "before": before, "after": after, **extra, "final": result.final_metrics}


def describe_prompts(setup: RLSetup) -> str:
    """The first line of an RL run's report: prompts used, dropped and held out."""
    return (f"{len(setup.prompts)} training prompts ({setup.dropped} longer than {setup.limit} tokens dropped), "
            f"{len(setup.held)} held out")
