"""Attention for packed training rows: causal attention computed example by example.

A packed row holds several examples back to back. transformers turns the restarting position ids
into one block-diagonal [L, L] mask and runs SDPA over the whole row: with a mask, SDPA on the CPU
takes its generic (math) path and computes all L x L scores, most of which the mask then throws
away. Running causal SDPA on each example's own span computes only the blocks that count, and
`is_causal=True` without a mask lets SDPA use its fused kernel. On the SFT benchmark this takes
attention from about a third of the CPU time to a tenth (docs/benchmarks.md). Results are the same
as the masked computation up to float rounding (tests/test_train.py checks it).

Use: `enable_segment_attention(model)` once, then pass `segment_bounds=[(start, end), ...]` as an
extra keyword to the model's forward with a packed batch. Without that keyword (padded batches,
generation) the function is exactly transformers' SDPA attention. A bound may also be
(start, end, prefix_start, prefix_end): that segment continues the prefix at [prefix_start,
prefix_end) of the same row (its position ids continue the prefix's), which lets G completions
of one prompt share a single copy of the prompt in training (train/rl_batches.py).
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "chatsmith_segments"
_registered = False


def segment_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [1, H, L, D], key/value [1, Hkv, L, D] -> ([1, L, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("segment_bounds", None)
    if bounds is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    outs = []
    for b in bounds:
        s, e = b[0], b[1]
        if len(b) == 2:
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling,
                is_causal=True, enable_gqa=gqa))
            continue
        # A segment that continues a shared prefix elsewhere in the row (the prompt of a GRPO group,
        # computed once for its G completions): its queries see the whole prefix, then themselves
        # causally. The mask is bottom-right aligned: query i sees keys 0 .. P + i.
        ps, pe = b[2], b[3]
        n, p = e - s, pe - ps
        mask = torch.ones(n, p + n, dtype=torch.bool, device=query.device).tril(diagonal=p)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], torch.cat([key[:, :, ps:pe], key[:, :, s:e]], dim=2),
            torch.cat([value[:, :, ps:pe], value[:, :, s:e]], dim=2), attn_mask=mask, dropout_p=dropout,
            scale=scaling, enable_gqa=gqa))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def enable_segment_attention(model: Any) -> bool:
    """Switch a transformers model (or a PEFT wrapper of one) whose attention is SDPA to the
    segment-aware function. Returns False, changing nothing, for other implementations (eager,
    flash attention on a GPU, which handles packed rows itself)."""
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    if not _registered:
        AttentionInterface.register(NAME, segment_attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    if config._attn_implementation != NAME:
        base.set_attn_implementation(NAME)
    return True


def segment_attention_enabled(model: Any) -> bool:
    """Whether `model` runs segment attention (packed rows may share a prompt copy)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == NAME


def disable_segment_attention(model: Any) -> None:
    """Back to plain SDPA (before saving, so no config names our function), for every transformers
    model inside `model` (a PEFT wrapper, a reward scorer, a policy with a value head)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == NAME and hasattr(module, "set_attn_implementation"):
            module.set_attn_implementation("sdpa")
