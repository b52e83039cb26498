"""Segment attention for packed rows (train/attention.py): the same numbers as running each example
alone, gradients included, and the model is plain SDPA again afterwards."""

from __future__ import annotations

import torch

from chatsmith.models import load_model
from chatsmith.train.attention import NAME, disable_segment_attention, enable_segment_attention
from chatsmith.train.batching import Example, collate_packed


def _examples(tok) -> list[Example]:
    texts = ["Hello there, how are you doing today?", "The capital of France is Paris.",
             "One two three four five six seven eight nine ten eleven twelve."]
    return [Example(ids, [1] * len(ids)) for ids in (tok(t)["input_ids"] for t in texts)]


def test_segment_attention_equals_each_example_alone_with_gradients():
    model, tok = load_model("tiny-random-llama")
    exs = _examples(tok)
    batch = collate_packed(exs)
    assert batch["segment_bounds"] == [(0, len(exs[0])), (len(exs[0]), len(exs[0]) + len(exs[1])),
                                       (len(exs[0]) + len(exs[1]), sum(len(e) for e in exs))]

    def alone() -> torch.Tensor:
        return torch.cat([model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0] for e in exs])

    ref = alone()
    ref.square().mean().backward()
    ref_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()

    assert enable_segment_attention(model)
    assert model.config._attn_implementation == NAME
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                segment_bounds=batch["segment_bounds"]).logits[0]
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight.grad, ref_grad, atol=1e-6, rtol=1e-4)

    # Without the keyword (generation, padded batches) it is plain SDPA with the usual mask.
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(plain, ref.detach(), atol=1e-4, rtol=1e-4)
    disable_segment_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_segment_attention_leaves_eager_models_alone():
    model, _ = load_model("tiny-random-llama")
    model.set_attn_implementation("eager")
    assert not enable_segment_attention(model)
    assert model.config._attn_implementation == "eager"
