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

A sliding window (Mistral, Qwen2, Gemma 3's local layers) is applied inside each span, as the
model's own mask would. Families whose attention cannot be replaced (BLOOM's ALiBi attention, the
recurrent RWKV) run each example through the backbone on its own instead (`per_example_forward`),
and families whose eager attention masks packed rows from the position ids keep it; which one a
family gets is models/families.py's `packing`.
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
    window = kwargs.get("sliding_window")
    outs = []
    for b in bounds:
        s, e = b[0], b[1]
        if len(b) == 2 and window and e - s > window:
            # Query i sees keys i - window + 1 .. i (transformers' sliding_window_overlay).
            band = torch.ones(e - s, e - s, dtype=torch.bool, device=query.device)
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], attn_mask=band.tril() & band.triu(1 - window),
                dropout_p=dropout, scale=scaling, enable_gqa=gqa))
            continue
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
        if window:
            mask &= torch.ones_like(mask).triu(diagonal=p - window + 1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], torch.cat([key[:, :, ps:pe], key[:, :, s:e]], dim=2),
            torch.cat([value[:, :, ps:pe], value[:, :, s:e]], dim=2), attn_mask=mask, dropout_p=dropout,
            scale=scaling, enable_gqa=gqa))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def enable_segment_attention(model: Any) -> bool:
    """Make packed rows exact for a transformers model (or a PEFT wrapper of one), the family's way
    (models/families.py): SDPA attention switches to the segment-aware function; a family that cannot
    keep examples apart in a row runs them one by one (`per_example_forward`); a family whose own
    attention masks packed rows from the position ids is left as it is. Returns whether a batch may
    use prefix bounds (segments continuing a shared prompt copy); False means no change was made."""
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from chatsmith.models.families import packing_mode

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    mode = packing_mode(base)
    if config is None or mode in ("positions", "padded"):
        return False
    if mode == "per-example":
        return per_example_forward(base)
    if not _registered:
        AttentionInterface.register(NAME, segment_attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    if config._attn_implementation != NAME:
        base.set_attn_implementation(NAME)
    return True


def segment_attention_enabled(model: Any) -> bool:
    """Whether `model` runs segment attention or examples one by one (packed rows may share a prompt copy)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (getattr(getattr(base, "config", None), "_attn_implementation", None) == NAME
            or bool(base.__dict__.get(PER_EXAMPLE)))


PER_EXAMPLE = "_chatsmith_per_example"


def per_example_forward(model: Any) -> bool:
    """Make a packed row exact for a family whose attention cannot be told where examples start: the
    backbone (`model.base_model`: BLOOM's `transformer`, RWKV's `rwkv`) runs each span of
    `segment_bounds` as a sequence of its own (a prefix-bound span after its prefix's tokens) and its
    hidden states go back in row order, so the LM head, a reward head or a value head read them as
    from one row. The model's forward passes the bounds down (BLOOM's and RWKV's forwards do not
    forward extra keywords). Returns True once installed (idempotent)."""
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model or model.__dict__.get(PER_EXAMPLE):
        return backbone is not None and backbone is not model
    outer_forward, inner_forward = model.forward, backbone.forward

    def outer(*args: Any, segment_bounds: Any = None, **kwargs: Any) -> Any:
        if segment_bounds is None:
            return outer_forward(*args, **kwargs)
        kwargs.pop("position_ids", None)
        backbone._chatsmith_bounds = segment_bounds
        try:
            return outer_forward(*args, **kwargs)
        finally:
            backbone._chatsmith_bounds = None

    def inner(*args: Any, segment_bounds: Any = None, **kwargs: Any) -> Any:
        bounds = segment_bounds if segment_bounds is not None else getattr(backbone, "_chatsmith_bounds", None)
        if bounds is None:
            return inner_forward(*args, **kwargs)
        ids = kwargs.pop("input_ids", None) if not args else args[0]
        for name in ("position_ids", "attention_mask", "cache", "past_key_values", "state"):
            kwargs.pop(name, None)
        kwargs.update(use_cache=False, return_dict=True)
        if bounds[-1][1] != ids.shape[1] or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
            raise ValueError("segment_bounds must cover the packed row from start to end")
        outs = []
        for b in bounds:
            s, e = b[0], b[1]
            seq = ids[:, s:e] if len(b) == 2 else torch.cat([ids[:, b[2]:b[3]], ids[:, s:e]], dim=1)
            outs.append((e - s, inner_forward(input_ids=seq, **kwargs)))
        first = outs[0][1]
        first.last_hidden_state = torch.cat([o.last_hidden_state[:, -n:] for n, o in outs], dim=1)
        if getattr(first, "hidden_states", None) is not None:
            first.hidden_states = tuple(torch.cat([o.hidden_states[i][:, -n:] for n, o in outs], dim=1)
                                        for i in range(len(first.hidden_states)))
        return first

    model.forward, backbone.forward = outer, inner
    backbone._chatsmith_bounds = None
    setattr(model, PER_EXAMPLE, True)
    return True


def disable_segment_attention(model: Any) -> None:
    """Back to plain SDPA (before saving, so no config names our function), for every transformers
    model inside `model` (a PEFT wrapper, a reward scorer, a policy with a value head)."""
    for module in model.modules():
        if module.__dict__.get(PER_EXAMPLE):   # not getattr: a PEFT wrapper forwards it from its base
            backbone = module.base_model
            del module.forward, backbone.forward, backbone._chatsmith_bounds
            setattr(module, PER_EXAMPLE, False)
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == NAME and hasattr(module, "set_attn_implementation"):
            module.set_attn_implementation("sdpa")
