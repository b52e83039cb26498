"""Supervised fine-tuning: the `chatsmith sft` stage.

It supplies the loop with rendered examples, a collate function and the loss; everything else
(accumulation, checkpoints, resume, logging) is the one loop's.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from chatsmith.config import SFTConfig
from chatsmith.data.packing import collate_packed, collate_padded
from chatsmith.data.template import Rendered, render_conversation
from chatsmith.errors import ChatsmithError
from chatsmith.models.attention import enable_segment_attention
from chatsmith.models.saving import save_final
from chatsmith.train.loop import Objective, Trainer
from chatsmith.train.losses import nll_sum
from chatsmith.train.prepare import (
    add_template_tokens,
    check_eval_suite,
    fit_and_save,
    load_conversations,
    plan_for,
    prepare_run_dir,
    say,
    say_suite,
    split_or_eval_data,
    suite_evaluators,
    write_json,
)


def sft_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed next-token NLL over the trained (assistant) tokens."""
    if "position_ids" in batch:
        # Packed row: ask only for the logits at positions whose next token is trained. The LM
        # head over a 49k vocabulary costs as much as several blocks, and most positions are
        # prompt tokens that never enter the loss.
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    logits_to_keep=batch["target_positions"], use_cache=False,
                    segment_bounds=batch["segment_bounds"])
        return nll_sum(out.logits[0], batch["targets"]), {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits
    labels = batch["labels"]
    if logits.shape[1] > labels.shape[1]:   # prompt tuning prepends virtual tokens
        logits = logits[:, logits.shape[1] - labels.shape[1]:]
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return nll_sum(logits[keep], labels[keep]), {}


def render_examples(tokenizer: Any, conversations: list, cfg: Any) -> tuple[list[Rendered], dict[str, int]]:
    """Conversations rendered to training examples; returns (examples, {truncated, dropped_no_targets})."""
    examples, truncated, empty = [], 0, 0
    for conv in conversations:
        r = render_conversation(tokenizer, conv, template=cfg.template, max_length=cfg.max_length)
        truncated += int(r.truncated)
        if r.n_targets == 0:
            empty += 1
            continue
        examples.append(r)
    return examples, {"truncated": truncated, "dropped_no_targets": empty}


def sft_objective(method: str, pad_id: int) -> Objective:
    """The SFT objective: packed rows for most methods, padded rows for virtual-token methods."""
    from chatsmith.models.adapters import uses_packed_rows

    collate = collate_packed if uses_packed_rows(method) else partial(collate_padded, pad_id=pad_id)
    return Objective("sft", sft_loss, collate, unit="tokens")


def run_sft(cfg: SFTConfig, conversations: list | None = None) -> Path:
    """Train and write the run directory. `conversations` replaces --data (used by quickstart)."""
    from transformers import set_seed

    from chatsmith.models import load_model
    from chatsmith.models.adapters import prepare_trainable, trainable_parameters, uses_packed_rows
    from chatsmith.models.seq2seq import (
        collate_seq2seq,
        is_encoder_decoder,
        render_seq2seq_examples,
        seq2seq_loss,
    )

    set_seed(cfg.seed)
    check_eval_suite(cfg)
    run = prepare_run_dir(cfg)
    convs = conversations if conversations is not None else load_conversations(cfg)
    train_convs, eval_convs = split_or_eval_data(cfg, convs, partial(load_conversations, cfg))

    device = "cuda" if torch.cuda.is_available() else None
    model, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code,
                                  quantization="4bit" if cfg.method == "qlora" else None,
                                  device=device if cfg.method == "qlora" else None,
                                  dtype=torch.float32 if cfg.precision != "fp16" else None)
    add_template_tokens(model, tokenizer, cfg.template)
    t0 = time.perf_counter()
    seq2seq = is_encoder_decoder(model)   # T5/mT5: prompt in the encoder, answer in the decoder
    render = render_seq2seq_examples if seq2seq else render_examples
    train_ex, counts = render(tokenizer, train_convs, cfg)
    eval_ex, _ = render(tokenizer, eval_convs, cfg)
    if not train_ex:
        raise ChatsmithError("no training example has a trained token (are there assistant turns?)")
    if cfg.eval_data and not eval_ex:
        raise ChatsmithError(f"--eval-data {' '.join(cfg.eval_data)}: no held-out example has an assistant turn to "
                             "score (after truncation at --max-length)")
    say(f"rendered {len(train_ex)} training / {len(eval_ex)} eval examples in {time.perf_counter() - t0:.1f}s; "
        f"{counts['truncated']} truncated at --max-length {cfg.max_length}"
        + (f", {counts['dropped_no_targets']} dropped (nothing left to train after truncation)"
           if counts["dropped_no_targets"] else ""))

    if cfg.packing and not uses_packed_rows(cfg.method):
        raise ChatsmithError(f"--packing does not work with --method {cfg.method} (virtual tokens are per sequence)")
    plan = plan_for(cfg, train_ex, token_budget=cfg.batch_size * cfg.max_length if cfg.packing else None)
    model = prepare_trainable(model, cfg)
    if uses_packed_rows(cfg.method) and not seq2seq:
        enable_segment_attention(model)
    n_train, n_total = trainable_parameters(model)
    say(f"method {cfg.method}: training {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.2f}%); "
        f"{len(plan)} steps")
    objective = sft_objective(cfg.method, tokenizer.pad_token_id) if not seq2seq else Objective(
        "sft", seq2seq_loss, partial(collate_seq2seq, pad_id=tokenizer.pad_token_id,
                                     start_id=model.config.decoder_start_token_id), unit="tokens")
    trainer = Trainer(model=model, objective=objective, train_examples=train_ex, plan=plan, cfg=cfg,
                      run_dir=run, eval_examples=eval_ex, evaluators=suite_evaluators(cfg, tokenizer))
    result = fit_and_save(trainer, lambda model: save_final(model, tokenizer, cfg, run))
    summary = {"steps": result.steps, "resumed_from": result.resumed_from, "train_examples": len(train_ex),
               "eval_examples": len(eval_ex), **counts, "final": result.final_metrics,
               "eval_start": result.start_metrics, "eval": result.eval_metrics, "eval_time_s": result.eval_time_s}
    write_json(run / "summary.json", summary)
    if "eval_loss" in result.eval_metrics:
        say(f"eval loss {result.eval_metrics['eval_loss']:.4f}, perplexity {result.eval_metrics.get('eval_ppl', 0):.2f}"
            + (f" (step 0: {result.start_metrics['eval_loss']:.4f})" if "eval_loss" in result.start_metrics else ""))
    say_suite(result.start_metrics, result.eval_metrics)
    say(f"done: {run}/final  (chat with it: chatsmith chat {run})")
    return run
