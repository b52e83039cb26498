"""LoRA adapters served by name: read through peft, applied per row as low-rank deltas.

An adapter directory is read with peft's own `PeftConfig` and `load_peft_weights`, and each target
module's scale comes from peft's rules: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA,
where `r` and `lora_alpha` may be overridden per module by `rank_pattern` and `alpha_pattern`.
In a batch, each row may use a different adapter (or none): its delta x A^T B^T * scale is added
to the base projection's output for that row only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chatsmith.errors import ChatsmithError

# The projections the engine runs fused, and the module names whose LoRA deltas each one carries.
FUSED_PARTS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
               "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


@dataclass
class LoraAdapter:
    """One adapter: per target ("layers.I.self_attn.q_proj"), (A [r, in], B [out, r], scale)."""

    name: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def load_lora_adapter(name: str, path: str) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (adapter_config.json + weights) with peft's own readers."""
    from pathlib import Path

    from peft import PeftConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    d = Path(path)
    if not (d / "adapter_config.json").is_file():
        raise ChatsmithError(f"--lora {name}={path}: expected a PEFT adapter directory with adapter_config.json "
                             "and its weights (what `chatsmith sft --method lora` saves in the run's adapter/)")
    try:
        cfg = PeftConfig.from_pretrained(str(d))
        tensors = load_peft_weights(str(d), device="cpu")
    except Exception as e:  # peft raises several types for a damaged or foreign directory
        raise ChatsmithError(f"--lora {name}={path}: peft could not read this adapter ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None
    peft_type = getattr(cfg.peft_type, "value", cfg.peft_type)
    if peft_type != "LORA" or getattr(cfg, "use_dora", False):
        raise ChatsmithError(f"--lora {name}={path}: only plain LoRA adapters can be served by name "
                             f"(this one is {peft_type}{', DoRA' if getattr(cfg, 'use_dora', False) else ''}); "
                             "merge it into the model instead and serve the merged directory")
    rank_pattern, alpha_pattern = dict(cfg.rank_pattern or {}), dict(cfg.alpha_pattern or {})
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        # base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight -> model.layers.3.self_attn.q_proj
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), cfg.r)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg.lora_alpha)
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        target = module[module.index("layers."):] if "layers." in module else module.rsplit(".", 1)[-1]
        out[target] = (a.float(), b.float(), float(scale))
    if not out:
        raise ChatsmithError(f"--lora {name}={path}: the adapter holds no LoRA weights")
    return LoraAdapter(name, out)


def add_lora_deltas(out: list[torch.Tensor], x: torch.Tensor, layer: int, name: str, adapters: dict[str, LoraAdapter],
                    rows: list[str | None], q_scale: float = 1.0, sizes: list[int] | None = None) -> None:
    """Add each row's LoRA delta to the outputs of fused projection `name` of `layer`, in place.

    `out` is one tensor per part ([B, T, out_part]), or with `sizes` a single fused tensor
    [B, T, sum(sizes)] holding the parts side by side; `x` [B, T, in] is the projection's input.
    `q_scale` multiplies the q_proj delta (the int8 path folds 1/sqrt(head_dim) into q).
    """
    parts = FUSED_PARTS[name]
    for row, adapter_name in enumerate(rows):
        if adapter_name is None:
            continue
        ad = adapters[adapter_name]
        start = 0
        for j, part in enumerate(parts):
            size = sizes[j] if sizes is not None else 0
            w = ad.weights.get(f"layers.{layer}.{part}")
            if w is not None:
                a, b, scale = w
                if part == "self_attn.q_proj":
                    scale = scale * q_scale
                delta = (x[row] @ a.t() @ b.t()) * scale
                if sizes is None:
                    out[j][row] = out[j][row] + delta
                else:
                    out[0][row, :, start: start + size] += delta
            start += size
