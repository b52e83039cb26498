"""Loss curves and eval charts as PNG in the run folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def suite_keys(records: list[dict[str, Any]]) -> list[str]:
    """The task-suite metrics (suite/SET/accuracy, ...) logged in `records`, in first-seen order."""
    return list(dict.fromkeys(k for r in records for k in r if k.startswith("suite/")))


def _plot_suite(ax: Any, records: list[dict[str, Any]], keys: list[str]) -> None:
    """One line per task-suite metric over the evaluation steps (step 0 is the starting model)."""
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1.2, label=k.removeprefix("suite/"))
    ax.set_title("task suite", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_metrics(records: list[dict], out: Path, title: str = "training") -> Path | None:
    """Training loss per step (with a moving average) and, when present, eval loss (from step 0, the
    starting model) and a second panel with the task suite's metrics."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    suite = suite_keys(records)
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in train]
    loss = [r["loss"] for r in train]
    fig, axes = plt.subplots(1, 2 if suite else 1, figsize=(12 if suite else 7, 4), dpi=110, squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, loss, color="#9ab", lw=1, label="train loss")
    k = max(1, len(loss) // 20)
    if k > 1:
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, color="#17a", lw=2, label=f"train loss ({k}-step mean)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="#d62", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if suite:
        _plot_suite(axes[0][1], records, suite)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_preference_metrics(run: Path, keys: list[str], title: str) -> Path | None:
    """rewards.png: each logged preference metric per step (train line, held-out points)."""
    import json

    from chatsmith.train.dist import is_main

    path = run / "metrics.jsonl"
    if not is_main() or not path.is_file():
        return None
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    present = [k for k in keys if any(k in r or f"eval_{k}" in r for r in records)]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.2), dpi=100, squeeze=False)
    for ax, k in zip(axes[0], present, strict=True):
        tr = [(r["step"], r[k]) for r in records if k in r]
        ev = [(r["step"], r[f"eval_{k}"]) for r in records if f"eval_{k}" in r]
        if tr:
            ax.plot(*zip(*tr, strict=True), color="#17a", lw=1.2, label="train")
        if ev:
            ax.plot(*zip(*ev, strict=True), "o", color="#d62", label="held out")
        ax.set_title(k.replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"{title}: {run.name}")
    fig.tight_layout()
    out = run / "rewards.png"
    fig.savefig(out)
    plt.close(fig)
    return out


RL_PANELS = [("reward_mean", "reward (mean of rollout)"), ("eval_reward", "held-out reward (greedy)"),
             ("kl", "KL to reference"), ("entropy", "entropy"), ("value_loss", "value loss"),
             ("clip_frac", "clip fraction"), ("response_length", "response length (tokens)"),
             ("explained_variance", "explained variance"), ("loss", "loss")]


def plot_rl_metrics(records: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """One small panel per logged RL metric, and one for the task suite's metrics."""
    panels = [(k, label) for k, label in RL_PANELS if any(k in r for r in records)]
    suite = suite_keys(records)
    if suite:
        panels.append(("suite/", "task suite"))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), dpi=100, squeeze=False)
    for ax, (k, label) in zip(axes.flat, panels):
        if k == "suite/":
            _plot_suite(ax, records, suite)
            continue
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) < 30 else "-", ms=3, color="#17a")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
