"""Perplexity on held-out data: the mean negative log-likelihood of the tokens a model would be
trained on (assistant tokens by default, every token after the first with all_tokens), and its
exponential. Conversations come from any format chatsmith reads and are rendered by the one template
renderer, so the tokens scored are exactly the tokens trained.

Perplexity is exp(total NLL / scored tokens) over the whole file (token-weighted, as
lm-evaluation-harness' `word_perplexity` counterpart for tokens and llama.cpp's `perplexity` do),
not a mean of per-record perplexities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from chatsmith.data.template import Rendered


def token_nll(model: Any, examples: Sequence[Rendered], *, all_tokens: bool = False,
              batch_tokens: int = 8192) -> tuple[float, int, list[tuple[float, int]]]:
    """(total NLL in nats, scored tokens, per-example (NLL, tokens)) of `examples` under `model`.
    Token t is scored when its mask is set (every t >= 1 with all_tokens), predicted from tokens < t.
    Examples run in length-sorted, right-padded batches of about `batch_tokens` tokens."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    per: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    was_training = model.training
    model.eval()
    try:
        start = 0
        while start < len(order):
            longest, end = 0, start
            while end < len(order):
                longest_next = max(longest, len(examples[order[end]].input_ids))
                if end > start and longest_next * (end - start + 1) > batch_tokens:
                    break
                longest, end = longest_next, end + 1
            batch = [examples[i] for i in order[start:end]]
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            attn = torch.zeros(len(batch), longest, dtype=torch.long)
            score = torch.zeros(len(batch), longest, dtype=torch.bool)
            for b, ex in enumerate(batch):
                n = len(ex.input_ids)
                ids[b, :n] = torch.tensor(ex.input_ids)
                attn[b, :n] = 1
                mask = [1] * n if all_tokens else list(ex.loss_mask)
                score[b, :n] = torch.tensor([bool(m) for m in mask])
            score[:, 0] = False                     # the first token has no prediction
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = ids[:, 1:].to(device)
            nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * score[:, 1:].to(device)
            for b, i in enumerate(order[start:end]):
                per[i] = (float(nll[b].sum()), int(score[b, 1:].sum()))
            start = end
    finally:
        model.train(was_training)
    total = sum(x for x, _ in per)
    count = sum(n for _, n in per)
    return total, count, per


def perplexity(model: Any, tokenizer: Any, path: str, *, all_tokens: bool = False, template: str | None = None,
               max_length: int = 2048, format: str | None = None, columns: dict[str, str] | None = None,
               skip_bad: bool = False, limit: int | None = None) -> dict[str, Any]:
    """Perplexity of `model` on the conversations of a file: {ppl, nll (mean per token), tokens,
    examples, truncated, skipped}. Examples with nothing to score are counted in `empty`."""
    from chatsmith.data.formats import read_conversations
    from chatsmith.data.template import render_conversation

    result = read_conversations(path, format=format, columns=columns, skip_bad=skip_bad)
    convs = result.conversations[:limit] if limit else result.conversations
    examples = [render_conversation(tokenizer, c, template=template, max_length=max_length) for c in convs]
    total, count, per = token_nll(model, examples, all_tokens=all_tokens)
    if count == 0:
        from chatsmith.errors import ChatsmithError

        raise ChatsmithError(f"{path}: no token to score ({len(examples)} examples"
                             f"{'' if all_tokens else ' with no assistant tokens; pass --all-tokens to score every token'})")
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "examples": len(examples),
            "empty": sum(n == 0 for _, n in per), "truncated": sum(bool(e.truncated) for e in examples),
            "skipped": len(result.skipped), "all_tokens": all_tokens}
