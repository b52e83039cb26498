"""Reward model: the `chatsmith rm` stage (stage 2 of the InstructGPT recipe), and scoring.

A reward model is the causal LM's backbone with a scalar head (transformers'
`*ForSequenceClassification` with one label, so the saved model loads anywhere). The score of a
prompt + answer is the head applied to the hidden state of the answer's last token.

Efficiency: all answers of a micro-batch (both sides of every pair, all K answers of a ranking) go
through the model in ONE padding-free packed row; position ids restart at each sequence and each
sequence attends only to itself (segment attention, train/attention.py). A ranking of K answers costs K sequences in
that one forward and trains on all C(K,2) pairs (or on the Plackett-Luce likelihood of the order).
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from chatsmith.config import RMConfig
from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.packing import collate_preferences
from chatsmith.data.preference import PreferenceExample, encode_answer, encode_rankings, read_preferences
from chatsmith.errors import ChatsmithError
from chatsmith.train.attention import disable_segment_attention, enable_segment_attention
from chatsmith.train.loop import Objective, Trainer
from chatsmith.train.losses import bradley_terry_loss, plackett_luce_loss
from chatsmith.train.prepare import prepare_run_dir, say, split_eval, write_json

REWARD_CONFIG = "reward_config.json"


# ---- the scalar-head model --------------------------------------------------------------------

def _parts(model: Any) -> tuple[Any, Any]:
    """(backbone, score head) of a *ForSequenceClassification model, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", "model")
    return getattr(base, prefix), base.score


def sequence_scores(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Scalar reward of each packed sequence [S], read at its last answer token."""
    backbone, head = _parts(model)
    hidden = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                      segment_bounds=batch.get("segment_bounds")).last_hidden_state[0]   # [L, H]
    return head(hidden[batch["last_positions"]]).squeeze(-1).float()  # [S]


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


def load_backbone_with_head(spec: str, *, dtype: Any = None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A *ForSequenceClassification model (one label) from any model argument, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    from chatsmith.models.loading import _quiet_transformers, load_tokenizer, local_path
    from chatsmith.models.registry import resolve_model

    _quiet_transformers()
    resolved = resolve_model(spec)
    if resolved.adapter:
        raise ChatsmithError(f"{spec} is an adapter; train the reward model from a full model directory "
                             "(merge the adapter first, or pass the run's final/ directory)")
    path = local_path(resolved)
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


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


# ---- the stage --------------------------------------------------------------------------------

def read_data_specs(cfg: Any, reader: Any, describe: Any, what: str) -> list[Any]:
    """Every --data spec read with `reader(path, skip_bad)` (a PreferenceData), each file summarised
    with `describe(records)`; `what` names the expected records in the no-data error."""
    from chatsmith.data.preference import BUILTIN_PREFIX
    from chatsmith.data.spec import parse_data_spec

    if not cfg.data:
        raise ChatsmithError(f"no training data: pass --data FILE ({what})")
    records: list[Any] = []
    for spec in cfg.data:
        path = spec if spec.startswith(BUILTIN_PREFIX) else parse_data_spec(spec).path
        res = reader(path, skip_bad=cfg.skip_bad)
        if res.skipped:
            say(f"{path}: skipped {len(res.skipped)} malformed record(s) (--skip-bad); first: {res.skipped[0]}")
        say(f"{path}: {describe(res.records)}")
        records.extend(res.records)
    return records


def _describe_rankings(records: list[Any]) -> str:
    kinds = sorted({len(r.responses) for r in records})
    return f"{len(records)} preference records ({'pairs' if kinds == [2] else f'K = {kinds}'})"


def load_rankings(cfg: Any) -> list[Any]:
    return read_data_specs(cfg, read_preferences, _describe_rankings,
                           "pairs or rankings; or builtin:identity-preferences")


def run_rm(cfg: RMConfig) -> Path:
    from transformers import set_seed

    from chatsmith.models.adapters import trainable_parameters
    from chatsmith.train.plan import plan_steps
    from chatsmith.train.prepare import add_template_tokens

    set_seed(cfg.seed)
    if cfg.method in ("qlora", "prompt", "prefix", "adapter"):
        raise ChatsmithError(f"--method {cfg.method} is not available for reward models; use full, freeze, head or lora")
    run = prepare_run_dir(cfg)
    records = load_rankings(cfg)
    train_recs, eval_recs = split_eval(records, cfg.eval_split, cfg.seed)
    model, tokenizer = load_backbone_with_head(cfg.model, trust_remote_code=cfg.trust_remote_code)
    add_template_tokens(model, tokenizer, cfg.template)
    t0 = time.perf_counter()
    train_ex, trunc = encode_rankings(tokenizer, train_recs, cfg.template, cfg.max_length)
    eval_ex, _ = encode_rankings(tokenizer, eval_recs, cfg.template, cfg.max_length)
    n_pairs = sum(len(r.pairs()) for r in train_recs)
    say(f"rendered {len(train_ex)} training records ({n_pairs} pairs) / {len(eval_ex)} held out in "
        f"{time.perf_counter() - t0:.1f}s; {trunc} answers truncated at --max-length {cfg.max_length}")
    plan = plan_steps([len(e) for e in train_ex], batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                      max_steps=cfg.max_steps, epochs=cfg.epochs, seed=cfg.seed)
    model = prepare_reward_trainable(model, cfg)
    # Answers packed in one row attend only to themselves, and share one copy of their prompt.
    share = enable_segment_attention(model)
    n_train, n_total = trainable_parameters(model)
    say(f"method {cfg.method}: training {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.2f}%); "
        f"{len(plan)} steps, {cfg.loss} loss")
    unit = "pairs" if cfg.loss == "pairwise" else "examples"
    objective = Objective("rm", partial(rm_loss, loss=cfg.loss, margin=cfg.margin),
                          partial(collate_preferences, unit=unit, share_prefix=share), unit=unit)
    trainer = Trainer(model=model, objective=objective, train_examples=train_ex, plan=plan, cfg=cfg,
                      run_dir=run, eval_examples=eval_ex)
    result = trainer.fit()
    disable_segment_attention(trainer.unwrapped())
    final = save_reward_model(trainer.unwrapped(), tokenizer, cfg, run)
    from chatsmith.train.dpo import plot_preference_metrics

    plot_preference_metrics(run, ["accuracy", "margin"], "reward model")
    summary = {"steps": result.steps, "resumed_from": result.resumed_from, "train_records": len(train_ex),
               "train_pairs": n_pairs, "eval_records": len(eval_ex),
               "eval_pairs": sum(len(r.pairs()) for r in eval_recs), "truncated": trunc,
               "final": result.final_metrics, "eval": result.eval_metrics}
    write_json(run / "summary.json", summary)
    if result.eval_metrics:
        say(f"held-out pairwise accuracy {result.eval_metrics.get('eval_accuracy', 0):.3f}, mean margin "
            f"{result.eval_metrics.get('eval_margin', 0):.3f} on {summary['eval_pairs']} pairs")
    say(f"done: {final}  (score with: chatsmith rm score {run} --prompt ... --response ...)")
    return run


def save_reward_model(model: Any, tokenizer: Any, cfg: Any, run: Path) -> Path:
    from chatsmith.data.template import template_source

    final = run / "final"
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(run / "adapter")
        model = model.merge_and_unload()
    if cfg.template:
        tokenizer.chat_template = template_source(tokenizer, cfg.template)
    model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    (final / REWARD_CONFIG).write_text(json.dumps({"max_length": cfg.max_length, "loss": cfg.loss}, indent=2))
    return final


# ---- scoring ----------------------------------------------------------------------------------

class RewardModel:
    """A trained reward model: `score(prompts, responses)` -> one float per pair, higher is better."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 2048) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    def _example(self, prompt: str | list[dict[str, str]], response: str) -> PreferenceExample:
        if isinstance(prompt, str):
            msgs = [Message("user", prompt)]
        else:
            msgs = [Message(m["role"], m["content"], False if m["role"] == "assistant" else None) for m in prompt]
        conv = Conversation(msgs + [Message("assistant", response)])
        ex, _ = encode_answer(self.tokenizer, conv, None, self.max_length)
        return PreferenceExample([ex], [0.0])

    @torch.no_grad()
    def score(self, prompts: list[str | list[dict[str, str]]], responses: list[str], batch_size: int = 16) -> list[float]:
        """Scores of (prompt, response) pairs. A prompt is a user message or a list of {role, content};
        batches are packed rows where each sequence attends only to itself, so a batch scores as one by one."""
        if len(prompts) != len(responses):
            raise ChatsmithError(f"{len(prompts)} prompts but {len(responses)} responses: pass one response per prompt")
        examples = [self._example(p, r) for p, r in zip(prompts, responses, strict=True)]
        device = next(self.model.parameters()).device
        out: list[float] = []
        for i in range(0, len(examples), max(1, batch_size)):
            batch = collate_preferences(examples[i:i + batch_size], unit="answers")
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            out.extend(sequence_scores(self.model, batch).tolist())
        return out


def load_reward_model(spec: str, *, device: str | None = None) -> RewardModel:
    """A reward model from a `chatsmith rm` run directory (its final/) or a final/ directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from chatsmith.models.loading import _quiet_transformers

    p = Path(spec)
    final = p / "final" if (p / "final" / REWARD_CONFIG).is_file() else p
    if not (final / REWARD_CONFIG).is_file():
        raise ChatsmithError(f"{spec} is not a reward model written by `chatsmith rm` (no {REWARD_CONFIG} in it "
                             "or in its final/); train one with: chatsmith rm --data pairs.json --output runs/rm")
    _quiet_transformers()
    meta = json.loads((final / REWARD_CONFIG).read_text())
    model = AutoModelForSequenceClassification.from_pretrained(str(final), dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    if device:
        model.to(device)
    enable_segment_attention(model)   # a scored batch is one packed row
    return RewardModel(model, tokenizer, max_length=max(int(meta.get("max_length", 2048)), 2048))


def sample_answers(model_spec: str, prompts: list[str], *, temperature: float = 0.0, max_new_tokens: int = 48,
                   seed: int = 0) -> list[str]:
    """One answer per prompt from a model (KV-cached generation, stopping at the end of the turn)."""
    from chatsmith.data.template import render_conversation, stop_token_ids
    from chatsmith.infer.generate import generate
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.models import load_model

    model, tok = load_model(model_spec)
    stops = stop_token_ids(tok)
    out = []
    for i, q in enumerate(prompts):
        ids = render_conversation(tok, Conversation([Message("user", q)]), add_generation_prompt=True).input_ids
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + i)
        with torch.no_grad():
            new = generate(model, ids, params, stops)
        out.append(tok.decode(new, skip_special_tokens=True).strip())
    return out


def compare_models(reward_model: str, models: list[str], *, prompts: str | list[str] = "builtin",
                   temperature: float = 0.0, max_new_tokens: int = 48, seed: int = 0,
                   json_path: str | None = None) -> dict[str, Any]:
    """Sample each model's answers to the same prompts and score them with a reward model; prints
    a table (mean reward, and how often each model's answer beats the first model's)."""
    from rich.console import Console
    from rich.table import Table

    if isinstance(prompts, str):
        if prompts == "builtin":
            from chatsmith.data.builtin import preference_demo_prompts

            prompts = preference_demo_prompts()
        else:
            p = Path(prompts)
            if not p.is_file():
                raise ChatsmithError(f"--prompts {prompts}: not a file (one prompt a line), and not 'builtin'")
            prompts = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    rm = load_reward_model(reward_model)
    results: dict[str, Any] = {"prompts": prompts, "models": {}}
    for spec in models:
        answers = sample_answers(spec, prompts, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        scores = rm.score(prompts, answers)
        results["models"][spec] = {"answers": answers, "scores": scores, "mean": sum(scores) / len(scores)}
    first = results["models"][models[0]]["scores"]
    table = Table(title=f"reward of sampled answers on {len(prompts)} prompts (reward model: {reward_model})")
    for col in ("model", "mean reward", f"wins vs {models[0]}"):
        table.add_column(col)
    for spec in models:
        sc = results["models"][spec]["scores"]
        wins = sum(a > b for a, b in zip(sc, first, strict=True))
        results["models"][spec]["wins_vs_first"] = wins
        table.add_row(spec, f"{results['models'][spec]['mean']:+.3f}", f"{wins}/{len(sc)}" if spec != models[0] else "-")
    Console().print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results
