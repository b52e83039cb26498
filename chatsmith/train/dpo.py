"""Direct preference optimisation and its RL-free relatives: the `chatsmith dpo` stage.

`--loss` picks one pure function from train/losses.py: dpo, ipo, cdpo (need a reference), kto
(unpaired feedback, needs a reference), orpo, simpo and rrhf (no reference model is loaded).

Efficiency: every answer of a micro-batch (chosen and rejected, or the K ranked answers) goes
through the policy in ONE padding-free packed row, and the LM head runs only at answer positions.
The reference costs no second copy of the weights: with LoRA it is the same model with the adapter
disabled; with full or freeze fine-tuning its log-probs are computed once before training and
cached with the examples.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from chatsmith.config import DPOConfig
from chatsmith.data.packing import collate_preferences
from chatsmith.data.preference import PreferenceExample, encode_feedback, encode_rankings, read_feedback
from chatsmith.errors import ChatsmithError
from chatsmith.models.attention import enable_segment_attention
from chatsmith.train.dist import unwrap
from chatsmith.train.loop import Objective, Trainer
from chatsmith.train.losses import (
    dpo_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    rrhf_loss,
    simpo_loss,
    token_logprobs,
)
from chatsmith.train.plots import plot_preference_metrics
from chatsmith.train.prepare import (
    check_eval_suite,
    fit_and_save,
    load_rankings,
    plan_for,
    prepare_run_dir,
    read_data_specs,
    say,
    say_suite,
    split_or_eval_data,
    suite_evaluators,
    write_json,
)

REFERENCE_FREE = ("orpo", "simpo", "rrhf")
PEFT = ("lora", "dora")


def sequence_logps(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Summed log-prob of each packed sequence's answer tokens [S] (fp32)."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                logits_to_keep=batch["target_positions"], use_cache=False,
                segment_bounds=batch.get("segment_bounds"))
    tok = token_logprobs(out.logits[0], batch["targets"])                        # [N]
    return torch.zeros(batch["n_seqs"], device=tok.device, dtype=tok.dtype).index_add(0, batch["target_seq"], tok)


def reference_logps(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Reference log-probs [S]: cached ones, else the policy with its adapter disabled."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    inner = unwrap(model)   # no gradient: no need to go through a data-parallel wrapper
    if not hasattr(inner, "disable_adapter"):
        raise ChatsmithError("online reference log-probs need a LoRA/DoRA model; use --ref-logps precompute")
    with torch.no_grad(), inner.disable_adapter():
        return sequence_logps(inner, batch)


def preference_loss(model: Any, batch: dict[str, Any], cfg: DPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed loss over the batch's units (pairs; examples for kto and rrhf) and summed metrics:
    implicit-reward accuracy, chosen/rejected rewards and log-probs, margin."""
    logps = sequence_logps(model, batch)
    lengths = batch["n_answer_tokens"]
    avg = logps / lengths.clamp(min=1)
    loss = cfg.loss
    if loss == "kto":
        ref = reference_logps(model, batch)
        kl_batch = batch["kl"]
        with torch.no_grad():
            kl_pol = sequence_logps(unwrap(model), kl_batch)
            kl_ref = reference_logps(model, kl_batch)
            # z0: the batch's KL estimate from mismatched pairs, clamped at 0 (KTO paper, Sec. 4.1)
            kl = (kl_pol - kl_ref).mean().clamp(min=0)
        losses, rewards = kto_loss(logps, ref, batch["desirable"], kl, cfg.beta, cfg.desirable_weight,
                                   cfg.undesirable_weight)
        d = batch["desirable"]
        signed = torch.where(d, rewards, -rewards)
        return losses.sum(), {"accuracy": float((signed > 0).float().sum()), "kl": float(kl) * len(d),
                              "rewards_signed": float(signed.sum())}
    if loss == "rrhf":
        total = logps.new_zeros(())
        acc = best = 0.0
        for g0, k in batch["groups"]:
            p, r = avg[g0:g0 + k], batch["scores"][g0:g0 + k]
            total = total + rrhf_loss(p, r, -avg[g0], cfg.rrhf_weight)   # answers are stored best first
            worse = r.unsqueeze(1) < r.unsqueeze(0)
            acc += float((p.unsqueeze(1) < p.unsqueeze(0))[worse].float().mean()) if worse.any() else 0.0
            best += float(avg[g0].detach())
        # per ranking: the fraction of its pairs ordered right by length-normalised log-prob
        return total, {"accuracy": acc, "avg_logps_best": best}
    c, w = batch["pairs"][:, 0], batch["pairs"][:, 1]
    if loss in ("dpo", "cdpo", "ipo"):
        ref = reference_logps(model, batch)
        if loss == "ipo":
            losses, cr, rr = ipo_loss(logps[c], logps[w], ref[c], ref[w], cfg.beta, lengths[c], lengths[w])
        else:
            losses, cr, rr = dpo_loss(logps[c], logps[w], ref[c], ref[w], cfg.beta,
                                      cfg.label_smoothing if loss == "cdpo" else 0.0)
    elif loss == "orpo":
        losses, cr, rr = orpo_loss(avg[c], avg[w], -avg[c], cfg.beta)
    elif loss == "simpo":
        losses, cr, rr = simpo_loss(avg[c], avg[w], cfg.beta, cfg.simpo_gamma)
    else:
        raise ChatsmithError(f"unknown --loss {loss}")
    return losses.sum(), {
        "accuracy": float((cr > rr).float().sum()),
        "rewards_chosen": float(cr.sum()), "rewards_rejected": float(rr.sum()),
        "margin": float((cr - rr).sum()),
        "logps_chosen": float(logps[c].detach().sum()), "logps_rejected": float(logps[w].detach().sum()),
    }


@torch.no_grad()
def cache_reference_logps(model: Any, examples: list[PreferenceExample], batch_size: int) -> None:
    """Compute the reference's log-probs once (before any update) and store them with the examples."""
    was_training = model.training
    model.eval()
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else _null()
    with ctx:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            lp = sequence_logps(model, collate_preferences(chunk, unit="answers")).tolist()
            for ex in chunk:
                ex.ref_logps, lp = lp[:len(ex.answers)], lp[len(ex.answers):]
            if chunk[0].kl_answer is not None:
                kl = collate_preferences([PreferenceExample([ex.kl_answer], [0.0]) for ex in chunk], unit="answers")
                for ex, v in zip(chunk, sequence_logps(model, kl).tolist(), strict=True):
                    ex.ref_kl_logp = v
    model.train(was_training)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def read_records(cfg: DPOConfig, specs: list[str] | None = None) -> list[Any]:
    """Every --data file (or each of `specs`: held-out files) as validated records: Feedback for kto
    (pairs are unpaired), else Ranking."""
    if cfg.loss != "kto":
        return load_rankings(cfg, specs)

    def describe(records: list[Any]) -> str:
        good = sum(r.desirable for r in records)
        return f"{len(records)} feedback records ({good} desirable, {len(records) - good} not)"

    return read_data_specs(cfg, read_feedback, describe, "{messages, label} feedback or pairs", specs)


def encode_examples(cfg: DPOConfig, tokenizer: Any, train: list[Any], held: list[Any]
                    ) -> tuple[list[PreferenceExample], list[PreferenceExample], int]:
    """(train, held-out, answers truncated): the records rendered."""
    if cfg.loss == "kto":
        tr, t = encode_feedback(tokenizer, train, cfg.template, cfg.max_length, cfg.seed)
        ev, _ = encode_feedback(tokenizer, held, cfg.template, cfg.max_length, cfg.seed) if held else ([], 0)
        return tr, ev, t
    tr, t = encode_rankings(tokenizer, train, cfg.template, cfg.max_length)
    ev, _ = encode_rankings(tokenizer, held, cfg.template, cfg.max_length)
    return tr, ev, t


def run_dpo(cfg: DPOConfig) -> Path:
    """Train and write the run directory (final/ loads like any SFT run)."""
    from transformers import set_seed

    from chatsmith.models import load_model
    from chatsmith.models.adapters import prepare_trainable, trainable_parameters
    from chatsmith.models.saving import save_final
    from chatsmith.train.prepare import add_template_tokens

    set_seed(cfg.seed)
    if cfg.loss == "cdpo" and not 0 < cfg.label_smoothing < 0.5:
        raise ChatsmithError(f"--loss cdpo needs 0 < --label-smoothing < 0.5, got {cfg.label_smoothing}")
    needs_ref = cfg.loss not in REFERENCE_FREE
    mode = cfg.ref_logps
    if mode == "auto":
        mode = "online" if cfg.method in PEFT else "precompute"
    if needs_ref and mode == "online" and cfg.method not in PEFT:
        raise ChatsmithError(f"--ref-logps online needs --method lora or dora (the reference is the model with "
                             f"its adapter disabled); with --method {cfg.method} use --ref-logps precompute")
    check_eval_suite(cfg)
    run = prepare_run_dir(cfg)
    # bad data stops the run before the model loads
    train_recs, held_recs = split_or_eval_data(cfg, read_records(cfg), partial(read_records, cfg))
    model, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)
    add_template_tokens(model, tokenizer, cfg.template)
    t0 = time.perf_counter()
    train_ex, eval_ex, trunc = encode_examples(cfg, tokenizer, train_recs, held_recs)
    if not train_ex:
        raise ChatsmithError("no training records left after holding out --eval-split")
    unit = "examples" if cfg.loss in ("kto", "rrhf") else "pairs"
    say(f"rendered {len(train_ex)} training / {len(eval_ex)} held-out records in {time.perf_counter() - t0:.1f}s; "
        f"{trunc} answers truncated at --max-length {cfg.max_length}")
    plan = plan_for(cfg, train_ex)
    model = prepare_trainable(model, cfg)
    # Answers packed in one row attend only to themselves, and share one copy of their prompt.
    share = enable_segment_attention(model)
    if needs_ref and mode == "precompute":
        t0 = time.perf_counter()
        cache_reference_logps(model, list(train_ex) + list(eval_ex), max(cfg.batch_size, 8))
        say(f"reference log-probs computed once for {len(train_ex) + len(eval_ex)} records "
            f"in {time.perf_counter() - t0:.1f}s")
    n_train, n_total = trainable_parameters(model)
    ref_text = "no reference model" if not needs_ref else (
        "reference = adapter disabled" if mode == "online" else "reference log-probs cached")
    say(f"--loss {cfg.loss}, method {cfg.method}: training {n_train:,} of {n_total:,} parameters "
        f"({100 * n_train / n_total:.2f}%); {len(plan)} steps; {ref_text}")
    objective = Objective(f"dpo-{cfg.loss}", partial(preference_loss, cfg=cfg),
                          partial(collate_preferences, unit=unit, share_prefix=share), unit=unit)
    trainer = Trainer(model=model, objective=objective, train_examples=train_ex, plan=plan, cfg=cfg,
                      run_dir=run, eval_examples=eval_ex, evaluators=suite_evaluators(cfg, tokenizer))
    result = fit_and_save(trainer, lambda model: save_final(model, tokenizer, cfg, run))
    plot_preference_metrics(run, ["accuracy", "margin", "rewards_chosen", "rewards_rejected",
                                  "logps_chosen", "logps_rejected", "kl", "rewards_signed"], f"dpo --loss {cfg.loss}")
    summary = {"steps": result.steps, "loss": cfg.loss, "resumed_from": result.resumed_from,
               "train_records": len(train_ex), "eval_records": len(eval_ex), "truncated": trunc,
               "final": result.final_metrics, "eval_start": result.start_metrics, "eval": result.eval_metrics,
               "eval_time_s": result.eval_time_s}
    write_json(run / "summary.json", summary)
    if "eval_accuracy" in result.eval_metrics:
        start = result.start_metrics
        say(f"held-out implicit reward accuracy {result.eval_metrics['eval_accuracy']:.3f}"
            + (f", margin {result.eval_metrics['eval_margin']:.3f}" if "eval_margin" in result.eval_metrics else "")
            + (f" (step 0: accuracy {start['eval_accuracy']:.3f})" if "eval_accuracy" in start else ""))
    say_suite(result.start_metrics, result.eval_metrics)
    say(f"done: {run}/final  (chat with it: chatsmith chat {run})")
    return run
