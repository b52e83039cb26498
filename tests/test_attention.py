"""Segment attention for packed rows (models/attention.py): the same numbers as running each example
alone, gradients included, and the model is plain SDPA again afterwards."""

from __future__ import annotations

import torch

from chatsmith.data.packing import collate_packed
from chatsmith.data.template import Rendered
from chatsmith.models import load_model
from chatsmith.models.attention import NAME, disable_segment_attention, enable_segment_attention


def _examples(tok) -> list[Rendered]:
    texts = ["Hello there, how are you doing today?", "The capital of France is Paris.",
             "One two three four five six seven eight nine ten eleven twelve."]
    return [Rendered(ids, [1] * len(ids)) for ids in (tok(t)["input_ids"] for t in texts)]


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


def test_shared_prompt_rows_equal_one_copy_per_completion():
    """GRPO's training row with each prompt once and its completions attending to that copy gives
    the same per-token log-probs and the same gradients as one prompt copy per completion."""
    from chatsmith.train.losses import token_logprobs
    from chatsmith.train.rl_batches import Episode, RLBatchSpec, collate_episodes

    model, tok = load_model("tiny-random-llama")
    assert enable_segment_attention(model)
    p1, p2 = tok("What is two plus two?")["input_ids"], tok("Name a colour.")["input_ids"]
    comps = [tok(t)["input_ids"] for t in (" Four.", " It is four, of course.", " Red", " Blue and green.")]
    episodes = []
    for prompt, comp in zip([p1, p2, p1, p2], comps):
        episodes.append(Episode(prompt, comp, [0.0] * len(comp), {}, advantages=[1.0] * len(comp)))

    def run(share: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        model.zero_grad()
        b = collate_episodes(episodes, RLBatchSpec(share_prompts=share))
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], logits_to_keep=b["target_positions"],
                    use_cache=False, segment_bounds=b["segment_bounds"])
        lp = token_logprobs(out.logits[0], b["targets"])
        lp.sum().backward()
        return lp.detach(), model.model.layers[1].mlp.down_proj.weight.grad.clone(), b["n_tokens"]

    lp_sep, g_sep, n_sep = run(False)
    lp_shared, g_shared, n_shared = run(True)
    assert n_shared == n_sep - len(p1) - len(p2)   # each prompt once instead of twice
    torch.testing.assert_close(lp_shared, lp_sep, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_shared, g_sep, atol=1e-6, rtol=1e-4)
