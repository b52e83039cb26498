"""Reward model training: the `chatsmith rm` stage (stage 2 of the InstructGPT recipe).

Efficiency: all answers of a micro-batch (both sides of every pair, all K answers of a ranking) go
through the model in ONE padding-free packed row (data/packing.py); position ids restart at each
sequence and each sequence attends only to itself (segment attention, models/attention.py). A
ranking of K answers costs K sequences in that one forward and trains on all C(K,2) pairs (or on
the Plackett-Luce likelihood of the order). The model itself (build, save, load, score) is
models/reward.py; comparing models under a reward model is eval/rm_compare.py.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from chatsmith.config import RMConfig
from chatsmith.data.packing import collate_preferences
from chatsmith.data.preference import encode_rankings
from chatsmith.errors import ChatsmithError
from chatsmith.models.attention import enable_segment_attention
from chatsmith.models.reward import PackedScorer, load_backbone_with_head, save_reward_model, sequence_scores
from chatsmith.train.loop import Objective, Trainer
from chatsmith.train.losses import bradley_terry_loss, plackett_luce_loss
from chatsmith.train.plots import plot_preference_metrics
from chatsmith.train.prepare import (
    fit_and_save,
    load_rankings,
    plan_for,
    prepare_run_dir,
    say,
    split_or_eval_data,
    write_json,
)


def rm_loss(model: Any, batch: dict[str, Any], loss: str = "pairwise",
            margin: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed Bradley-Terry loss over pairs (or Plackett-Luce over rankings), with summed pairwise
    accuracy and margin (per pair; per ranking the mean over its pairs in listwise mode)."""
    scores = sequence_scores(model, batch)
    pairs = batch["pairs"]
    better, worse = scores[pairs[:, 0]], scores[pairs[:, 1]]
    m = torch.nan_to_num(batch["margins"], nan=margin)
    correct = (better > worse).float().detach()
    gap = (better - worse).detach()
    if loss == "pairwise":
        total = bradley_terry_loss(better, worse, m if (m != 0).any() else None).sum()
        return total, {"accuracy": float(correct.sum()), "margin": float(gap.sum())}
    total = scores.new_zeros(())
    acc = mar = 0.0
    for gi, (g0, k) in enumerate(batch["groups"]):
        total = total + plackett_luce_loss(scores[g0:g0 + k])
        sel = batch["pair_group"] == gi
        if sel.any():
            acc += float(correct[sel].mean())
            mar += float(gap[sel].mean())
    return total, {"accuracy": acc, "margin": mar}


def prepare_reward_trainable(model: Any, cfg: RMConfig) -> Any:
    """full/freeze as for SFT (the head always trains), head: only the head, lora/dora: adapters on
    the backbone plus a fully trained head (peft's SEQ_CLS task keeps `score` trainable)."""
    if cfg.method in ("lora", "dora"):
        import peft

        targets: Any = cfg.lora_targets
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        pcfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=targets, use_dora=cfg.method == "dora", task_type="SEQ_CLS")
        return peft.get_peft_model(model, pcfg)
    if cfg.method == "head":
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        from chatsmith.models.adapters import prepare_trainable

        model = prepare_trainable(model, cfg)
    for p in model.score.parameters():
        p.requires_grad_(True)
    return model


def run_rm(cfg: RMConfig) -> Path:
    """Train a reward model and write the run directory (final/, metrics, plots, summary.json); returns it."""
    from transformers import set_seed

    from chatsmith.models.adapters import trainable_parameters
    from chatsmith.train.prepare import add_template_tokens

    set_seed(cfg.seed)
    if cfg.method in ("qlora", "prompt", "prefix", "adapter"):
        raise ChatsmithError(f"--method {cfg.method} is not available for reward models; use full, freeze, head or lora")
    run = prepare_run_dir(cfg)
    records = load_rankings(cfg)
    train_recs, eval_recs = split_or_eval_data(cfg, records, partial(load_rankings, cfg))
    model, tokenizer = load_backbone_with_head(cfg.model, trust_remote_code=cfg.trust_remote_code)
    add_template_tokens(model, tokenizer, cfg.template)
    t0 = time.perf_counter()
    train_ex, trunc = encode_rankings(tokenizer, train_recs, cfg.template, cfg.max_length)
    eval_ex, _ = encode_rankings(tokenizer, eval_recs, cfg.template, cfg.max_length)
    n_pairs = sum(len(r.pairs()) for r in train_recs)
    say(f"rendered {len(train_ex)} training records ({n_pairs} pairs) / {len(eval_ex)} held out in "
        f"{time.perf_counter() - t0:.1f}s; {trunc} answers truncated at --max-length {cfg.max_length}")
    plan = plan_for(cfg, train_ex)
    model = prepare_reward_trainable(model, cfg)
    # Answers packed in one row attend only to themselves, and share one copy of their prompt.
    share = enable_segment_attention(model)
    scorer = PackedScorer(model)   # the training forward: packed row -> one score per sequence
    n_train, n_total = trainable_parameters(model)
    say(f"method {cfg.method}: training {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.2f}%); "
        f"{len(plan)} steps, {cfg.loss} loss")
    unit = "pairs" if cfg.loss == "pairwise" else "examples"
    objective = Objective("rm", partial(rm_loss, loss=cfg.loss, margin=cfg.margin),
                          partial(collate_preferences, unit=unit, share_prefix=share), unit=unit)
    trainer = Trainer(model=scorer, objective=objective, train_examples=train_ex, plan=plan, cfg=cfg,
                      run_dir=run, eval_examples=eval_ex)
    result = fit_and_save(trainer, lambda scorer: save_reward_model(scorer.model, tokenizer, cfg, run))
    final = run / "final"
    plot_preference_metrics(run, ["accuracy", "margin"], "reward model")
    summary = {"steps": result.steps, "resumed_from": result.resumed_from, "train_records": len(train_ex),
               "train_pairs": n_pairs, "eval_records": len(eval_ex),
               "eval_pairs": sum(len(r.pairs()) for r in eval_recs), "truncated": trunc,
               "final": result.final_metrics, "eval_start": result.start_metrics, "eval": result.eval_metrics,
               "eval_time_s": result.eval_time_s}
    write_json(run / "summary.json", summary)
    if result.eval_metrics:
        start = result.start_metrics
        say(f"held-out pairwise accuracy {result.eval_metrics.get('eval_accuracy', 0):.3f}, mean margin "
            f"{result.eval_metrics.get('eval_margin', 0):.3f} on {summary['eval_pairs']} pairs"
            + (f" (step 0: accuracy {start['eval_accuracy']:.3f})" if "eval_accuracy" in start else ""))
    say(f"done: {final}  (score with: chatsmith rm score {run} --prompt ... --response ...)")
    return run
