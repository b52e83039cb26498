"""Decide what trains: full fine-tuning, frozen blocks, or a peft adapter on a frozen base."""

from __future__ import annotations

import logging
from typing import Any

from chatsmith.errors import ChatsmithError

log = logging.getLogger(__name__)

MERGEABLE = ("lora", "dora", "qlora")
PEFT_METHODS = ("lora", "dora", "qlora", "prompt", "prefix", "adapter")


def _blocks(model: Any) -> Any:
    from chatsmith.models.families import transformer_blocks

    return transformer_blocks(model)


def _final_norm(model: Any) -> Any:
    from chatsmith.models.families import final_norm

    return final_norm(model)


def prepare_trainable(model: Any, cfg: Any, method: str | None = None) -> Any:
    """Return the model to train (possibly a PeftModel), with requires_grad set per method."""
    method = method or cfg.method
    from chatsmith.models.seq2seq import is_encoder_decoder

    seq2seq = is_encoder_decoder(model)
    if seq2seq and type(cfg).__name__ != "SFTConfig":
        stage = type(cfg).__name__.removesuffix("Config").lower()
        raise ChatsmithError(f"`chatsmith {stage}` trains decoder-only models; this one is an encoder-decoder "
                             f"(model_type '{model.config.model_type}'), which `chatsmith sft`, chat, serve and "
                             "export --to hf support (docs/families.md)")
    if seq2seq and method not in ("full", "freeze", "lora", "dora"):
        raise ChatsmithError(f"--method {method} is not available for an encoder-decoder model "
                             f"('{model.config.model_type}'); use full, freeze, lora or dora")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "freeze":
        blocks = _blocks(model)
        n = max(1, min(cfg.freeze_trainable_layers, len(blocks)))
        for p in model.parameters():
            p.requires_grad_(False)
        for block in list(blocks)[-n:]:
            for p in block.parameters():
                p.requires_grad_(True)
        norm = _final_norm(model)
        if norm is not None:
            for p in norm.parameters():
                p.requires_grad_(True)
        return model
    if method not in PEFT_METHODS:
        raise ChatsmithError(f"unknown method '{method}'")
    import peft

    if method in ("lora", "dora", "qlora"):
        if method == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        targets: Any = cfg.lora_targets
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        # Tokens a fallback template added (train/prepare.py) have untrained embeddings: train those
        # rows (and their tied LM-head rows) alongside the adapter, or the model never learns them.
        new_ids = getattr(model, "chatsmith_new_token_ids", None) or None
        pcfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=targets, use_dora=(method == "dora"),
                               task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
                               trainable_token_indices=new_ids)
    elif method == "prompt":
        pcfg = peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM")
    elif method == "prefix":
        pcfg = peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM")
    else:  # LLaMA-Adapter (zero-init attention over learned adaption prompts)
        n_layers = len(_blocks(model))
        pcfg = peft.AdaptionPromptConfig(adapter_len=cfg.num_virtual_tokens,
                                         adapter_layers=min(cfg.adapter_layers, n_layers), task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, pcfg)
    except ValueError as e:
        raise ChatsmithError(f"--method {method}: {e}") from None


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(parameters that train, all parameters), as counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def uses_packed_rows(method: str) -> bool:
    """Prompt/prefix tuning and LLaMA-Adapter prepend virtual tokens per sequence, so examples
    cannot share a row; every other method trains on padding-free packed rows."""
    return method not in ("prompt", "prefix", "adapter")
