"""Single-sequence, KV-cached generation: token ids in, token ids out.

No tokenizer and no HTTP here (STYLE.md, principle 4): the chat program and the server turn text
into ids, call `stream_generate`, and turn the ids they get back into text.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from chatsmith.errors import ChatsmithError
from chatsmith.infer.sampling import SamplingParams, next_token

if TYPE_CHECKING:
    import torch


def stream_generate(
    model: Any,
    input_ids: list[int],
    params: SamplingParams,
    stop_ids: Iterable[int],
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[int]:
    """Yield each new token id of one sequence as soon as it is chosen.

    One prefill forward over the prompt fills a DynamicCache; each further forward feeds only the
    last token. Generation ends after a token in `stop_ids` (not yielded), after
    `params.max_new_tokens` tokens, at the model's context length
    (`config.max_position_embeddings`), or when `should_stop()` returns True (checked before each
    forward). With `params.seed` set, sampling draws from a generator seeded with it, so the same
    seed gives the same tokens on the same device.
    """
    import torch
    from transformers import DynamicCache

    params.validate()
    if len(input_ids) == 0:
        raise ChatsmithError("stream_generate: the prompt is empty; pass at least one token id")
    stop = set(stop_ids)
    context = context_length(model)
    if context is not None and len(input_ids) >= context:
        raise ChatsmithError(f"the prompt has {len(input_ids)} tokens but the model's context length is "
                             f"{context}; shorten the prompt or the conversation")
    budget = params.max_new_tokens if context is None else min(params.max_new_tokens, context - len(input_ids))

    model.eval()
    device = _input_device(model)
    # prompt + generated ids, pre-allocated so the repetition penalty sees a view, not a copy per step.
    history = torch.empty(len(input_ids) + budget, dtype=torch.long, device=device)
    history[: len(input_ids)] = torch.tensor(input_ids, dtype=torch.long)
    length = len(input_ids)
    cache = DynamicCache(config=model.config)
    # Prefill needs the logits of the last prompt position only; asking for just those saves a
    # [prompt_len, vocab] tensor (about 100 MB in fp32 for 500 tokens of a 49k vocab).
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    step_ids = history[:length].unsqueeze(0)  # [1, prompt_len], then [1, 1] per step
    generator: torch.Generator | None = None

    for _ in range(budget):
        if should_stop is not None and should_stop():
            return
        # inference_mode is entered per step, never held across a `yield`: grad mode is
        # thread-global state, and holding it would switch gradients off in the caller's code too.
        with torch.inference_mode():
            logits = model(input_ids=step_ids, past_key_values=cache, use_cache=True, **extra).logits[0, -1]
            if generator is None and params.seed is not None:
                # Created on the logits' device: with device_map the last layer may sit elsewhere.
                generator = torch.Generator(device=logits.device).manual_seed(params.seed)
            token = next_token(logits, params, history[:length], generator)
        if token in stop:
            return
        history[length] = token
        step_ids = history[length : length + 1].unsqueeze(0)
        length += 1
        yield token


def generate(model: Any, input_ids: list[int], params: SamplingParams, stop_ids: Iterable[int]) -> list[int]:
    """The new token ids of one sequence (stop id excluded); see `stream_generate`."""
    return list(stream_generate(model, input_ids, params, stop_ids))


def context_length(model: Any) -> int | None:
    """The model's maximum sequence length in tokens, or None when its config does not say."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _input_device(model: Any) -> torch.device:
    # With a device_map the embedding, which receives the ids, may not be on the first parameter's device.
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _accepts_logits_to_keep(model: Any) -> bool:
    # A PEFT wrapper forwards **kwargs to its base model, so look at the base model's signature.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
