"""What `chatsmith ppo` and `chatsmith grpo` share around their loops: reading the prompts and the
rewards, loading the policy (and its reference) and the engine, the held-out evaluation (an
evaluator of the one loop: step 0, every --eval-every steps, the end), the plot and the summary.
Each stage adds its rollout and its loss.

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
    engine: Any                      # infer.engine.Engine over `model` (infer.vllm_engine.VllmEngine with vllm)
    stops: set[int]
    prompts: list[Any]               # data.prompts.Prompt, training
    held: list[Any]                  # held out
    dropped: int
    limit: int
    steps: int
    evaluate: Callable[..., dict[str, Any]] | None = None   # held-out evaluation (main process only)
    timings: dict[str, float] = field(default_factory=dict)
    samples: dict[int, list[Any]] = field(default_factory=dict)   # step -> a few held-out answers

    def evaluators(self) -> list[Callable[[Any, int], dict[str, float]]]:
        """The loop's evaluators: greedy held-out rewards (keeping three sample answers per step), then
        the --eval-suite task suite (grpo)."""
        from chatsmith.train.prepare import suite_evaluators

        out: list[Callable[[Any, int], dict[str, float]]] = []
        if self.held:
            out.append(self._held_out_rewards)
        return out + suite_evaluators(self.cfg, self.tokenizer)

    def _held_out_rewards(self, model: Any, step: int) -> dict[str, float]:
        # The engine runs the live policy module, so `model` (the same weights) is not needed here.
        result = self.evaluate(samples=3) if self.evaluate is not None else {}
        self.samples[step] = result.pop("samples", [])
        return result

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
    from chatsmith.train.prepare import check_eval_suite, prepare_run_dir
    from chatsmith.train.rollout import load_policy, total_steps

    set_seed(cfg.seed)
    if cfg.rollout_engine == "vllm":   # fail on a missing vllm or GPU before loading anything heavy
        from chatsmith.infer.vllm_engine import import_vllm

        import_vllm()
    rewards = load_rewards(cfg.reward)   # fail on a bad --reward before loading anything heavy
    train_records, held_records = load_prompt_records(cfg)
    if cfg.eval_data:
        held_records = load_eval_prompt_records(cfg)
    check_eval_suite(cfg)
    run = prepare_run_dir(cfg)
    model, tokenizer, ref = load_policy(cfg, need_reference=need_reference)
    stops = stop_token_ids(tokenizer, cfg.template)
    prompts, held, dropped, limit = render_prompt_splits(cfg, tokenizer, train_records, held_records)
    # Every rollout fits --max-length (longer prompts were dropped): slots of the model's whole context
    # would cost generation_batch_size x context of KV cache, allocated up front on a GPU.
    if cfg.rollout_engine == "vllm":
        from chatsmith.infer.vllm_engine import VllmEngine

        # Colocated with the trainer on one GPU: vLLM takes 30% of its memory (TRL's colocate default).
        engine: Any = VllmEngine(model, tokenizer, max_batch_size=cfg.generation_batch_size,
                                 max_sequence_tokens=cfg.max_length, gpu_memory_utilization=0.3, seed=cfg.seed)
    else:
        engine = Engine(model, tokenizer, max_batch_size=cfg.generation_batch_size, max_sequence_tokens=cfg.max_length)
    evaluate = partial(evaluate_rewards, engine, rewards, held, max_new_tokens=cfg.max_new_tokens,
                       stop_ids=stops) if held and is_main() else None
    return RLSetup(cfg, run, rewards, model, tokenizer, ref, engine, stops, prompts, held, dropped, limit,
                   total_steps(cfg, len(prompts)), evaluate)


def load_eval_prompt_records(cfg: Any) -> list[dict[str, Any]]:
    """The held-out prompt records of --eval-data: a builtin:TASK's held-out split or prompt files
    (any format --data takes), at most --eval-prompts of them (0: all)."""
    from chatsmith.data.prompts import read_prompt_file
    from chatsmith.data.spec import parse_data_spec
    from chatsmith.data.tasks import parse_task_spec, task_records
    from chatsmith.errors import ChatsmithError
    from chatsmith.train.prepare import say

    held: list[dict[str, Any]] = []
    for spec in cfg.eval_data:
        task = parse_task_spec(spec)
        if task:
            held += task_records(task, "test", seed=0)
            continue
        src = parse_data_spec(spec)
        if src.weight is not None:
            raise ChatsmithError(f"--eval-data {spec}: a held-out file is read whole; drop the ':{src.weight:g}' weight")
        held += read_prompt_file(src.path, cfg.columns or None)
    held = held[: cfg.eval_prompts] if cfg.eval_prompts else held
    say(f"--eval-data: {len(held)} held-out prompts from {', '.join(cfg.eval_data)}")
    return held


def train_rl(setup: RLSetup, trainer: Any, title: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """`trainer.fit()` (which evaluates on the held-out prompts at step 0, every --eval-every steps
    and after the last step) and the rl.png plot. Returns (loop result, before, after): the step-0
    and final evaluations with three sample answers each (a resumed run's "before" is the step-0
    record of metrics.jsonl, without samples; {} with --no-eval-at-start)."""
    from chatsmith.train.dist import is_main
    from chatsmith.train.plots import plot_rl_metrics
    from chatsmith.train.prepare import say, say_suite

    t1 = time.perf_counter()
    result = trainer.fit()
    setup.timings["eval_time_s"] = result.eval_time_s
    setup.timings["train_time_s"] = time.perf_counter() - t1 - result.eval_time_s
    before, after = dict(result.start_metrics), dict(result.eval_metrics)
    for rec, step in ((before, 0), (after, setup.steps)):
        if rec and setup.samples.get(step):
            rec["samples"] = setup.samples[step]
    if "eval_reward" in after:
        say(f"held-out reward {after['eval_reward']:.3f} on {after['eval_prompts']} prompts"
            + (f" (step 0: {before['eval_reward']:.3f})" if "eval_reward" in before else ""))
    say_suite(before, after)
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
