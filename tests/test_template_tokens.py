"""A fallback template's added special tokens train under LoRA (their embedding rows are trainable
alongside the adapter), and the rest of the vocabulary stays as it was."""

from __future__ import annotations

import torch

from chatsmith.config import SFTConfig
from chatsmith.data import Conversation, Message
from chatsmith.models import load_model
from chatsmith.train.sft import run_sft


def test_lora_trains_the_embeddings_of_added_template_tokens(tmp_path):
    convs = [Conversation([Message("user", f"What is {i} plus {i}?"), Message("assistant", f"{i} plus {i} is {2 * i}.")])
             for i in range(16)]
    run = run_sft(SFTConfig(model="tiny-random-llama", output=str(tmp_path / "run"), method="lora", template="llama-3",
                            max_steps=3, batch_size=4, lr=1e-2), conversations=convs)
    model, tok = load_model(str(run))
    base, base_tok = load_model("tiny-random-llama")
    added = tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    assert min(added) >= len(base_tok)
    emb = model.get_input_embeddings().weight.detach()
    old = base.get_input_embeddings().weight.detach()
    # Added rows started at the mean of the old rows (transformers' mean resizing) and moved.
    assert (emb[added] - old.mean(0)).abs().max() > 1e-3
    torch.testing.assert_close(emb[: len(base_tok)], old)
