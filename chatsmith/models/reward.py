"""Reward models: a causal LM's backbone with a scalar head, built, saved, loaded and used to score.

A reward model is transformers' `*ForSequenceClassification` with one label, so the saved model
loads anywhere. The score of a prompt + answer is the head applied to the hidden state of the
answer's last token. Batches are packed rows (data/packing.py): every sequence of a batch in one
row, each attending only to itself (segment attention, models/attention.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.packing import collate_preferences
from chatsmith.data.preference import PreferenceExample, encode_answer
from chatsmith.errors import ChatsmithError
from chatsmith.models.attention import enable_segment_attention

REWARD_CONFIG = "reward_config.json"


def _parts(model: Any) -> tuple[Any, Any]:
    """(backbone, score head) of a *ForSequenceClassification model, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", "model")
    return getattr(base, prefix), base.score


class PackedScorer(nn.Module):
    """A scalar-head model as one module whose forward returns the score of each packed sequence.

    Training runs the forward through this module (so a data-parallel wrapper around it sees the
    whole computation); `model` is the *ForSequenceClassification model, peft-wrapped or not.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, last_positions: torch.Tensor,
                segment_bounds: Any = None) -> torch.Tensor:
        """Packed row [1, L] -> scores [S], read at each sequence's last answer token."""
        backbone, head = _parts(self.model)
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                          segment_bounds=segment_bounds).last_hidden_state[0]   # [L, H]
        return head(hidden[last_positions]).squeeze(-1).float()

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """--gradient-checkpointing reaches the backbone's blocks."""
        self.model.gradient_checkpointing_enable(**kwargs)

    def enable_input_require_grads(self) -> None:
        """Gradient checkpointing with frozen embeddings needs inputs that require grad."""
        self.model.enable_input_require_grads()


def sequence_scores(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Scalar reward of each packed sequence [S], read at its last answer token. `model` is a
    PackedScorer (or a wrapper of one, e.g. DDP) or a bare scalar-head model."""
    inner = getattr(model, "module", model)
    scorer = model if isinstance(inner, PackedScorer) else PackedScorer(model)
    return scorer(batch["input_ids"], batch["position_ids"], batch["last_positions"],
                  segment_bounds=batch.get("segment_bounds"))


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
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
            use_safetensors=True)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        from transformers import AutoConfig

        kind = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
        raise ChatsmithError(f"{spec} (model_type '{kind}') has no sequence-classification model in transformers, "
                             "so it cannot carry a reward head; train the reward model from another family "
                             "(see docs/families.md)") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_reward_model(model: Any, tokenizer: Any, cfg: Any, run: Path) -> Path:
    """Write final/ (a merged *ForSequenceClassification model, tokenizer and reward_config.json) and adapter/
    for LoRA; returns final/."""
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


def trained_max_length(spec: str) -> int | None:
    """The --max-length a `chatsmith rm` run was trained with (None when it does not say)."""
    p = Path(spec)
    for cfg in (p / "final" / REWARD_CONFIG, p / REWARD_CONFIG):
        if cfg.is_file():
            value = json.loads(cfg.read_text()).get("max_length")
            return int(value) if value else None
    return None


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
    # Score as trained: a conversation longer than the run's --max-length loses the start of its
    # prompt, as it did in training (a reward model never saw positions beyond that length).
    return RewardModel(model, tokenizer, max_length=int(meta.get("max_length") or 2048))
