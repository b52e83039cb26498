"""What is exported: the model a MODEL argument names, with any adapter merged into full-precision
weights, its tokenizer, its chat template and the system prompt the run trained with."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError

log = logging.getLogger(__name__)


@dataclass
class ExportSource:
    """A merged model ready to write: every weight is a plain tensor (no adapter, no 4-bit)."""

    model: Any                    # transformers PreTrainedModel, fp32 unless a dtype was asked for
    tokenizer: Any
    spec: str                     # the MODEL argument
    template: str                 # the Jinja chat template the model was trained with
    end_of_turn: str | None       # the string that ends an assistant turn in that template
    stop_ids: list[int] = field(default_factory=list)   # EOS and the end-of-turn token, sorted
    system_prompt: str | None = None
    notes: list[str] = field(default_factory=list)      # what happened on the way (merged an adapter, ...)


def _run_config(spec: str) -> dict[str, Any]:
    """The training config of a run directory (or of the run that holds this final/ or adapter/)."""
    import yaml

    p = Path(spec).expanduser()
    for cand in (p / "config.yaml", p.parent / "config.yaml"):
        if cand.is_file() and (cand.parent / "final").exists():
            try:
                return yaml.safe_load(cand.read_text()) or {}
            except yaml.YAMLError:
                return {}
    return {}


def load_source(spec: str, *, template: str | None = None, system_prompt: str | None = None,
                dtype: Any = None, trust_remote_code: bool = False) -> ExportSource:
    """Load MODEL with its adapter merged. LoRA and DoRA merge into the weights; a QLoRA adapter is
    merged into the base loaded in 32-bit (load_model never quantises here), so no 4-bit rounding
    enters the exported weights. Prompt/prefix tuning and LLaMA-Adapter cannot be merged: refused."""
    import torch

    from chatsmith.data.template import end_of_turn, stop_token_ids, template_source
    from chatsmith.models import load_model, resolve_model

    resolved = resolve_model(spec)
    run_cfg = _run_config(spec)
    notes = []
    model, tok = load_model(resolved, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    if hasattr(model, "peft_config"):
        kind = model.peft_config[model.active_adapter].peft_type.value
        raise ChatsmithError(
            f"{spec} is a {kind} adapter, which cannot be merged into the weights (its virtual tokens or "
            "adaption prompts are computed at run time), so no HF/GGUF/Ollama file can carry it. Train with "
            "--method lora or dora to export, or serve the adapter with `chatsmith serve`")
    if resolved.adapter:
        notes.append(f"merged the adapter {resolved.adapter} into {resolved.path} (fp32 base)")
    template = template or run_cfg.get("template")
    source = template_source(tok, template)
    tok.chat_template = source
    eot = end_of_turn(tok, None)
    stops = sorted(stop_token_ids(tok))
    system = system_prompt if system_prompt is not None else run_cfg.get("system_prompt")
    return ExportSource(model=model, tokenizer=tok, spec=spec, template=source, end_of_turn=eot,
                        stop_ids=stops, system_prompt=system or None, notes=notes)
