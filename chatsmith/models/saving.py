"""Write a trained model where every tool can load it: final/ (a merged Hugging Face model with its
chat template and a generation config that stops at the end-of-turn token) and adapter/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def save_final(model: Any, tokenizer: Any, cfg: Any, run: Path) -> Path:
    """final/: a model AutoModelForCausalLM.from_pretrained loads, with its chat template and a
    generation config that stops at the end-of-turn token; adapter/ alone when an adapter trained."""
    from chatsmith.data.template import stop_token_ids, template_source
    from chatsmith.models import resolve_model
    from chatsmith.models.adapters import MERGEABLE, PEFT_METHODS
    from chatsmith.models.loading import local_path

    final = run / "final"
    if cfg.template:   # a named or inline template travels with the model
        tokenizer.chat_template = template_source(tokenizer, cfg.template)
    stops = sorted(stop_token_ids(tokenizer))
    resolved = resolve_model(cfg.model)
    base_path = cfg.model if resolved.kind == "hub" else str(Path(local_path(resolved)).resolve())
    if cfg.method in PEFT_METHODS:
        adapter_dir = run / "adapter"
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        _set_adapter_base(adapter_dir, cfg.model)
        if cfg.method in MERGEABLE:
            if cfg.method == "qlora":
                from peft import PeftModel
                from transformers import AutoModelForCausalLM

                base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
                model = PeftModel.from_pretrained(base, adapter_dir)
            model = model.merge_and_unload()
        else:
            # Prompt/prefix tuning and LLaMA-Adapter cannot merge into the weights: final/ is the
            # adapter, pointing at the base by absolute path so transformers+peft can load it.
            model.save_pretrained(final)
            tokenizer.save_pretrained(final)
            _set_adapter_base(final, base_path)
            return final
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    return final


def _set_adapter_base(adapter_dir: Path, base: str) -> None:
    p = adapter_dir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["base_model_name_or_path"] = base
    p.write_text(json.dumps(cfg, indent=2))
