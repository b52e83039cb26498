"""The one training loop. Every stage (sft, rm, dpo, ppo, grpo) supplies its batches and its loss;
gradient accumulation, precision, checkpoints and resume, evaluation, logging, plots and progress
live here once (STYLE.md, principle 2). Devices, precision, distribution, checkpoint state and
TensorBoard come from accelerate.

Loss normalisation: an objective returns a SUM over its units (target tokens, pairs...). The loop
divides by the number of units in the whole optimizer step (known in advance from the plan), so
batch 8 x 1 accumulation and batch 2 x 4 accumulation produce the same gradient.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatsmith.errors import ChatsmithError
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
    steps: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def precision_mode(precision: str) -> str:
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
    def __init__(self, *, model: Any, objective: Objective, train_examples: Sequence[Any], plan: Plan,
                 cfg: Any, run_dir: Path, eval_examples: Sequence[Any] = (), eval_batch_size: int | None = None,
                 extra_metrics: Callable[[], dict[str, float]] | None = None,
                 batch_source: Callable[[int], list[dict[str, Any]]] | None = None) -> None:
        """batch_source(step) -> that step's collated micro-batches, for stages whose batches are
        made on the fly (RL rollouts); the plan then only fixes the number of steps."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.objective = objective
        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.eval_batch_size = eval_batch_size or cfg.batch_size
        self.plan = plan
        self.extra_metrics = extra_metrics
        self.batch_source = batch_source
        self.accelerator = Accelerator(
            mixed_precision=precision_mode(cfg.precision),
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "tb")),
        )
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
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        # Checkpoints hold only what trains (a LoRA checkpoint is megabytes, not the whole base).
        self.accelerator.register_save_state_pre_hook(self._keep_trainable_weights)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.history: list[dict[str, float]] = []

    # -- checkpoints ---------------------------------------------------------------------------
    def _keep_trainable_weights(self, models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        for i, sd in enumerate(weights):
            unwrapped = self.accelerator.unwrap_model(models[i])
            names = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in sd.items() if k in names}

    def save_checkpoint(self, step: int) -> Path:
        root = self.run_dir / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:06d}"
        tmp = root / f".tmp-step-{step:06d}"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.save_state(str(tmp))
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
        self.accelerator.load_state(str(ckpt), strict=False)
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
        if not self.eval_examples:
            return {}
        self.model.eval()
        total, units, sums = 0.0, 0, {}
        for i in range(0, len(self.eval_examples), self.eval_batch_size):
            batch = self.objective.collate(list(self.eval_examples[i:i + self.eval_batch_size]))
            if batch["n_targets"] == 0:
                continue
            loss_sum, extra = self.objective.loss(self.model, _to_device(batch, self.accelerator.device))
            total += float(loss_sum)
            units += batch["n_targets"]
            for k, v in extra.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.model.train()
        if units == 0:
            return {}
        out = {"eval_loss": total / units}
        if self.objective.unit == "tokens":
            out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
        out.update({f"eval_{k}": v / units for k, v in sums.items()})
        return out

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> LoopResult:
        from tqdm.auto import tqdm

        acc = self.accelerator
        acc.init_trackers("tb")
        start = self._resume() if self.cfg.resume else 0
        resumed = start if start else None
        if start:
            print(f"resumed from checkpoint at step {start} of {len(self.plan)}", file=sys.stderr)
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
                micro = self.plan[step]
                t0 = time.perf_counter()
                # Units in the whole step across all processes: the loss denominator.
                if self.batch_source is not None:
                    batches = self.batch_source(step)
                else:
                    batches = [self.objective.collate([self.train_examples[i] for i in mb]) for mb in micro]
                denom = sum(b["n_targets"] for b in batches)
                mine = batches[acc.process_index::world]
                loss_total = torch.zeros((), device=acc.device)
                sums: dict[str, float] = {}
                n_tokens = 0
                for j, batch in enumerate(mine):
                    n_tokens += batch["n_tokens"]
                    if batch["n_targets"] == 0:
                        continue
                    batch = _to_device(batch, acc.device)
                    sync = j == len(mine) - 1
                    ctx = acc.no_sync(self.model) if (world > 1 and not sync) else _nullcontext()
                    with ctx:
                        loss_sum, extra = self.objective.loss(self.model, batch)
                        # DDP averages gradients over processes; scale so the result is sum/denom.
                        acc.backward(loss_sum * world / max(denom, 1))
                    loss_total += loss_sum.detach()
                    for k, v in extra.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                grad_norm = None
                if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                tokens_seen += n_tokens * world
                loss = float(acc.reduce(loss_total, reduction="sum")) / max(denom, 1)
                last = {"step": step + 1, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                        "tokens": n_tokens * world, "tokens_per_s": n_tokens * world / max(dt, 1e-9),
                        "step_time_s": dt}
                if grad_norm is not None:
                    last["grad_norm"] = float(grad_norm)
                last.update({k: v / max(denom, 1) for k, v in sums.items()})
                if self.extra_metrics:
                    last.update(self.extra_metrics())
                done = step + 1
                if self.eval_examples and self.cfg.eval_every and done % self.cfg.eval_every == 0 and done < len(self.plan):
                    eval_metrics = self.evaluate()
                    last.update(eval_metrics)
                if done % max(1, self.cfg.log_every) == 0 or done == len(self.plan):
                    self._log(last)
                elapsed = time.perf_counter() - t_start
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
                bar.update(1)
                if self.cfg.save_every and done % self.cfg.save_every == 0 and done < len(self.plan):
                    self.save_checkpoint(done)
                if os.environ.get("CHATSMITH_FAULT_KILL_AT_STEP") == str(done):
                    # Fault injection for the crash-resume test: die like `kill -9` would.
                    os.kill(os.getpid(), signal.SIGKILL)
        except KeyboardInterrupt:
            bar.close()
            path = self.save_checkpoint(step)
            raise ChatsmithError(f"interrupted at step {step}; saved {path}. Continue with the same command "
                                 "and --resume") from None
        bar.close()
        if self.eval_examples:
            eval_metrics = self.evaluate()
            if eval_metrics:
                rec = {"step": len(self.plan), **eval_metrics}
                self._log(rec)
        if self.cfg.save_every:
            self.save_checkpoint(len(self.plan))
        acc.end_training()
        self.plot()
        return LoopResult(len(self.plan), last, eval_metrics, resumed)

    def plot(self) -> None:
        if not self.accelerator.is_main_process:
            return
        from chatsmith.train.plots import plot_metrics

        records = [json.loads(ln) for ln in self.metrics_path.read_text().splitlines() if ln.strip()] \
            if self.metrics_path.is_file() else self.history
        plot_metrics(records, self.run_dir / "loss.png", title=f"{self.objective.name}: {self.run_dir.name}")

    def unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None
