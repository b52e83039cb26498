"""The one training loop. Every stage (sft, rm, dpo, ppo, grpo) supplies its batches and its loss;
gradient accumulation, precision, checkpoints and resume, evaluation, logging, plots and progress
live here once (STYLE.md, principle 2). Devices, precision, distribution, checkpoint state and
TensorBoard come from accelerate.

Loss normalisation: an objective returns a SUM over its units (target tokens, pairs...). The loop
divides by the number of units in the whole optimizer step, summed over every micro-batch of every
process, so batch 8 x 1 accumulation, batch 2 x 4 accumulation and 2 processes x batch 4 produce
the same gradient.

Several processes (`accelerate launch`): each optimizer step of the plan holds `grad_accum x
processes` micro-batches (train/plan.py), and process r runs micro-batches r, r + P, r + 2P, ...:
whole micro-batches of distinct data, the same number on every process, so every process calls
backward equally often. With a `batch_source` (RL) each process makes its own micro-batches. Only
the main process writes files.

Evaluation: before the first step (step 0: the starting model, unless --no-eval-at-start or the run
resumes), every --eval-every steps and after the last step. The objective's held-out loss is split
over the processes; the stage's evaluators (a task suite, held-out rewards) run on the main process
while the others wait. Evaluation runs on forked random states, so it never changes what training
draws: the weights are the same with evaluation on or off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatsmith.errors import ChatsmithError
from chatsmith.train.dist import all_sum
from chatsmith.train.launch import check_world
from chatsmith.train.plan import Plan

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


@dataclass
class Objective:
    """What a stage plugs into the loop.

    loss(model, batch) -> (sum of the loss over the batch's units, {metric name: summed value})
    collate(list of examples) -> batch dict with at least "n_targets" (units) and "n_tokens".
    """

    name: str
    loss: Callable[[Any, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]
    collate: Callable[[list[Any]], dict[str, Any]]
    unit: str = "tokens"


@dataclass
class LoopResult:
    """What `Trainer.fit` returns: steps run, the last step's metrics, the last evaluation's, and the
    step a resumed run started from (None when it started afresh)."""

    steps: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    start_metrics: dict[str, float] = field(default_factory=dict)   # the evaluation at step 0 (the starting model)
    eval_time_s: float = 0.0                                         # seconds this process spent evaluating


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run (checkpoints/step-N), or None."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def precision_mode(precision: str) -> str:
    """accelerate's mixed_precision for a --precision value: "no" (fp32), "bf16" or "fp16"."""
    if precision == "fp32":
        return "no"
    if precision in ("bf16", "fp16"):
        if not torch.cuda.is_available():
            raise ChatsmithError(f"--precision {precision} needs a GPU here; use fp32 (or auto) on the CPU")
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


class Trainer:
    """The one training loop: `fit()` runs the plan's optimizer steps on `model` with `objective`.

    `eval_examples` give the objective's held-out loss; each of `evaluators(model, step) -> metrics`
    adds numbers to every evaluation, called on the main process only with the unwrapped model in
    eval mode under no_grad (the other processes wait). `extra_metrics(steps_done)` adds numbers to
    each step's record; `batch_source(step)` makes a step's
    collated micro-batches on the fly (RL rollouts; the plan then only fixes the number of steps);
    `checkpoint_objects` (each with state_dict/load_state_dict) are saved in every checkpoint and
    restored on resume, beside the weights, optimizer, scheduler and random states.
    """

    def __init__(self, *, model: Any, objective: Objective, train_examples: Sequence[Any], plan: Plan,
                 cfg: Any, run_dir: Path, eval_examples: Sequence[Any] = (), eval_batch_size: int | None = None,
                 extra_metrics: Callable[[int], dict[str, float]] | None = None,
                 batch_source: Callable[[int], list[dict[str, Any]]] | None = None,
                 checkpoint_objects: Sequence[Any] = (),
                 evaluators: Sequence[Callable[[Any, int], dict[str, float]]] = ()) -> None:
        from accelerate.utils import ProjectConfiguration

        from chatsmith.train import sharding

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.objective = objective
        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.eval_batch_size = eval_batch_size or cfg.batch_size
        self.plan = plan
        self.extra_metrics = extra_metrics
        self.batch_source = batch_source
        self.evaluators = list(evaluators)
        self.eval_time_s = 0.0
        # Without a GPU, processes launched by `accelerate launch`/torchrun train together over gloo
        # (accelerate only does so when told the run is a CPU one); FSDP runs there too (sharding.py).
        self.accelerator = sharding.accelerator(
            max_grad_norm=cfg.max_grad_norm, batch_size=cfg.batch_size,
            mixed_precision=precision_mode(cfg.precision),
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "tb")),
        )
        check_world(self.accelerator)
        world = self.accelerator.num_processes
        self.sharded = sharding.is_sharded(self.accelerator)
        if self.sharded and batch_source is not None:
            raise ChatsmithError("PPO and GRPO do not run sharded yet (each process generates its own rollouts, and a "
                                 "sharded model needs every process in every forward): use recipes/accelerate/ddp.yaml")
        self._zero3 = self.sharded and self.accelerator.distributed_type.value == "DEEPSPEED"
        if self._zero3 and self.evaluators:
            # A ZeRO-3 layer gathers its weights from every process in each forward, and gathering them
            # all up front (GatheredParameters) still hung here when the main process generated alone.
            raise ChatsmithError("task suites (--eval-suite) do not run under DeepSpeed ZeRO-3 yet: evaluate final/ "
                                 "with chatsmith eval afterwards, or use recipes/accelerate/fsdp.yaml (evaluates "
                                 "while sharded) or zero2.yaml; the held-out loss (--eval-split) does run")
        if batch_source is None and any(len(step) % world for step in plan):
            raise ChatsmithError(f"the plan's steps must hold a multiple of {world} micro-batches (one share per "
                                 "process); build it with plan_steps(..., processes=world_size())")
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ChatsmithError("nothing to train: every parameter is frozen")
        self.trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
        from transformers import get_scheduler

        total = max(1, len(plan))
        scheduler = get_scheduler(
            "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
            optimizer, num_warmup_steps=int(round(cfg.warmup_ratio * total)), num_training_steps=total)
        # Sharded: keep the model's shape (no weights) to load the consolidated weights into at the end.
        self._shape = sharding.skeleton(model) if self.sharded else None
        self._final: Any = None
        if self.sharded and self.accelerator.is_main_process:
            print(f"sharded over {world} processes ({self.accelerator.distributed_type.value}): checkpoints are "
                  "sharded, final/ is gathered whole", file=sys.stderr, flush=True)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        # Checkpoints hold only what trains (a LoRA checkpoint is megabytes, not the whole base).
        self.accelerator.register_save_state_pre_hook(self._keep_trainable_weights)
        for obj in checkpoint_objects:
            self.accelerator.register_for_checkpointing(obj)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.history: list[dict[str, float]] = []

    # -- checkpoints ---------------------------------------------------------------------------
    def _keep_trainable_weights(self, models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        for i, sd in enumerate(weights):
            unwrapped = self.accelerator.unwrap_model(models[i])
            names = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in sd.items() if k in names}

    def save_checkpoint(self, step: int) -> Path:
        """Write checkpoints/step-N atomically (trainable weights, optimizer, scheduler, RNG and registered
        states), keep the last --keep-checkpoints; returns its path."""
        root = self.run_dir / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:06d}"
        tmp = root / f".tmp-step-{step:06d}"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()   # the main process has cleared tmp before anyone writes
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()   # every process has written its part before the rename
        if self.accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "total_steps": len(self.plan)}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)   # atomic: a checkpoint is either whole or absent
            kept = sorted((p for p in root.iterdir() if p.name.startswith("step-")),
                          key=lambda p: int(p.name.split("-")[1]))
            for old in kept[: -max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def _resume(self) -> int:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return 0
        # (a LoRA checkpoint holds only the adapter: the frozen base comes from the model as loaded)
        strict = "load_module_strict" if self.accelerator.distributed_type.value == "DEEPSPEED" else "strict"
        self.accelerator.load_state(str(ckpt), **{strict: False})
        step = json.loads((ckpt / STATE_FILE).read_text())["step"]
        # Drop metrics a crashed run logged after this checkpoint: they will be logged again.
        if self.metrics_path.is_file() and self.accelerator.is_main_process:
            kept = [ln for ln in self.metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in kept))
            self.history = [json.loads(ln) for ln in kept]
        return step

    # -- logging ---------------------------------------------------------------------------------
    def _log(self, record: dict[str, float]) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's mean loss (and per-unit metrics) on the held-out examples: each process
        takes every P-th batch with the unwrapped model (no collective in a forward), then the sums
        are added up over processes. Under ZeRO-3 a forward gathers each layer from every process,
        so every process runs as many forwards: one short of batches repeats one and drops it."""
        if not self.eval_examples:
            return {}
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        model.eval()
        total, units, sums = 0.0, 0, {}
        batches = [self.objective.collate(list(self.eval_examples[i:i + self.eval_batch_size]))
                   for n, i in enumerate(range(0, len(self.eval_examples), self.eval_batch_size))
                   if n % acc.num_processes == acc.process_index or self._zero3]
        if self._zero3:   # the same forwards everywhere: this process's share, the rest as fillers
            useful = [b for b in batches if b["n_targets"] > 0]
            mine = useful[acc.process_index::acc.num_processes]
            rounds = -(-len(useful) // acc.num_processes)
            batches = mine + [None] * (rounds - len(mine))
            filler = useful[0] if useful else None
        for batch in batches:
            if batch is None:   # ZeRO-3 filler: keeps the gathers in step, counts nothing
                self.objective.loss(model, _to_device(filler, acc.device))
                continue
            if batch["n_targets"] == 0:
                continue
            loss_sum, extra = self.objective.loss(model, _to_device(batch, acc.device))
            total += float(loss_sum)
            units += batch["n_targets"]
            for k, v in extra.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        model.train()
        total, units, sums = _sum_over_processes(total, units, sums)
        if units == 0:
            return {}
        out = {"eval_loss": total / units}
        if self.objective.unit == "tokens":
            out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
        out.update({f"eval_{k}": v / units for k, v in sums.items()})
        return out

    @property
    def has_evaluation(self) -> bool:
        """Whether there is anything to evaluate (held-out examples or an evaluator)."""
        return bool(self.eval_examples) or bool(self.evaluators)

    def evaluate_all(self, step: int) -> dict[str, float]:
        """Every evaluation at `step`: the objective's held-out metrics (all processes), then each
        evaluator's on the main process (the others wait at a barrier). Random states are forked, so
        training draws the same numbers whether or not (and however often) it evaluates."""
        acc = self.accelerator
        t0 = time.perf_counter()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        from chatsmith.train.sharding import full_weights

        # Sharded layers are gathered once on every process, so forwards need no other process.
        with torch.random.fork_rng(devices=devices), full_weights(self.model):
            out = self.evaluate()
            if self.evaluators:
                if acc.is_main_process:
                    model = acc.unwrap_model(self.model)
                    model.eval()
                    try:
                        with torch.no_grad():
                            for evaluator in self.evaluators:
                                out.update(evaluator(model, step))
                    finally:
                        model.train()
                acc.wait_for_everyone()
        self.eval_time_s += time.perf_counter() - t0
        return out

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> LoopResult:
        """Run the remaining steps (from the last checkpoint with cfg.resume), evaluate, checkpoint,
        plot; returns the LoopResult. Ctrl-C saves a checkpoint and says how to continue."""
        from tqdm.auto import tqdm

        acc = self.accelerator
        acc.init_trackers("tb")
        start = self._resume() if self.cfg.resume else 0
        resumed = start if start else None
        if start:
            if acc.is_main_process:
                print(f"resumed from checkpoint at step {start} of {len(self.plan)}", file=sys.stderr)
        else:   # a fresh start: records of an earlier attempt that left no checkpoint do not belong here
            self.history = []
            if acc.is_main_process:
                self.metrics_path.unlink(missing_ok=True)
        if start == 0 and getattr(self.cfg, "eval_at_start", True) and self.has_evaluation:
            first = self.evaluate_all(0)
            if first:   # step 0 of every eval curve: the starting model
                self._log({"step": 0, **first})
                if acc.is_main_process:
                    print("step 0 (starting model): " + _describe(first), file=sys.stderr, flush=True)
        self.model.train()
        world = acc.num_processes
        bar = tqdm(total=len(self.plan), initial=start, desc=self.objective.name, unit="step",
                   disable=not acc.is_main_process, dynamic_ncols=True, file=sys.stderr)
        last: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        tokens_seen = 0
        t_start = time.perf_counter()
        step = start
        try:
            for step in range(start, len(self.plan)):
                t0 = time.perf_counter()
                if self.batch_source is not None:   # this process's micro-batches, made now
                    mine = self.batch_source(step)
                else:                               # this process's share of the step's micro-batches
                    mine = [self.objective.collate([self.train_examples[i] for i in mb])
                            for mb in self.plan[step][acc.process_index::world]]
                # Units in the whole step across all processes: the loss denominator.
                local_units = sum(b["n_targets"] for b in mine)
                denom = all_sum([local_units])[0] if world > 1 else local_units
                loss_total = 0.0
                sums: dict[str, float] = {}
                n_tokens = 0
                for j, batch in enumerate(mine):
                    n_tokens += batch["n_tokens"]
                    if batch["n_targets"] == 0 and world == 1:
                        continue   # nothing to learn; with several processes every one must still call backward
                    batch = _to_device(batch, acc.device)
                    sync = j == len(mine) - 1
                    ctx = acc.no_sync(self.model) if (world > 1 and not sync) else _nullcontext()
                    # DeepSpeed's engine steps inside backward at an accumulation boundary: the last micro-batch.
                    acc.gradient_state._set_sync_gradients(sync)
                    with ctx:
                        loss_sum, extra = self.objective.loss(self.model, batch)
                        # DDP averages gradients over processes; scale so the result is sum/denom.
                        acc.backward(loss_sum * world / max(denom, 1))
                    loss_total += float(loss_sum.detach())
                    for k, v in extra.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                acc.gradient_state._set_sync_gradients(True)   # (the optimizer wrapper steps only when set)
                if world > 1:
                    loss_total, n_tokens, sums = _sum_over_processes(loss_total, n_tokens, sums)
                    n_tokens = int(n_tokens)
                grad_norm = None
                if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                tokens_seen += n_tokens
                loss = loss_total / max(denom, 1)
                last = {"step": step + 1, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                        "tokens": n_tokens, "tokens_per_s": n_tokens / max(dt, 1e-9), "step_time_s": dt}
                if grad_norm is not None:
                    # (FSDP2 returns the norm as a DTensor)
                    last["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                                              else grad_norm)
                last.update({k: v / max(denom, 1) for k, v in sums.items()})
                done = step + 1
                if self.extra_metrics:
                    last.update(self.extra_metrics(done))
                evaluated = (self.has_evaluation and self.cfg.eval_every and done % self.cfg.eval_every == 0
                             and done < len(self.plan))
                if evaluated:
                    eval_metrics = self.evaluate_all(done)
                    last.update(eval_metrics)
                if evaluated or done % max(1, self.cfg.log_every) == 0 or done == len(self.plan):
                    self._log(last)
                elapsed = time.perf_counter() - t_start
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
                bar.update(1)
                if self.cfg.save_every and done % self.cfg.save_every == 0 and done < len(self.plan):
                    self.save_checkpoint(done)
        except KeyboardInterrupt:
            bar.close()
            path = self.save_checkpoint(step)
            raise ChatsmithError(f"interrupted at step {step}; saved {path}. Continue with the same command "
                                 "and --resume") from None
        bar.close()
        if self.has_evaluation:
            eval_metrics = self.evaluate_all(len(self.plan))
            if eval_metrics:
                rec = {"step": len(self.plan), **eval_metrics}
                self._log(rec)
        if self.cfg.save_every:
            self.save_checkpoint(len(self.plan))
        if self.sharded:   # gathered while the processes can still talk (end_training closes the group)
            from chatsmith.train.sharding import consolidated

            self._final = consolidated(acc, self.model, self._shape)
        acc.end_training()
        self.plot()
        # On a resumed run the step-0 record comes back from metrics.jsonl (main process).
        start_metrics = next(({k: v for k, v in r.items() if k != "step"} for r in self.history
                              if r.get("step") == 0), {})
        return LoopResult(len(self.plan), last, eval_metrics, resumed, start_metrics, self.eval_time_s)

    def plot(self) -> None:
        """Write loss.png from metrics.jsonl (main process only)."""
        if not self.accelerator.is_main_process:
            return
        from chatsmith.train.plots import plot_metrics

        records = [json.loads(ln) for ln in self.metrics_path.read_text().splitlines() if ln.strip()] \
            if self.metrics_path.is_file() else self.history
        plot_metrics(records, self.run_dir / "loss.png", title=f"{self.objective.name}: {self.run_dir.name}")

    def unwrapped(self) -> Any:
        """The trained model without accelerate's wrappers (what to save)."""
        return self.accelerator.unwrap_model(self.model)

    def final_model(self) -> Any | None:
        """The trained model to save, whole (after `fit`): the unwrapped model, or for a sharded run
        the weights gathered from every process at the end of `fit` into a plain copy
        (sharding.consolidated): on the main process, None on the others."""
        return self._final if self.sharded else self.unwrapped()


def _describe(metrics: dict[str, float]) -> str:
    """A short line of metrics for the terminal."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _sum_over_processes(a: float, b: float, sums: dict[str, float]) -> tuple[float, float, dict[str, float]]:
    """(a, b, sums) added up over all processes; a metric a process did not report counts as 0."""
    from chatsmith.train.dist import all_gather, world_size

    if world_size() == 1:
        return a, b, sums
    keys = sorted(set(all_gather(sorted(sums))))
    a, b, *values = all_sum([a, b, *(sums.get(k, 0.0) for k in keys)])
    return a, b, dict(zip(keys, values))


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None
