"""Encoder-decoder models (T5, mT5: ChatYuan, FastChat-T5) for `chatsmith sft`: the prompt goes in
the encoder, the answer in the decoder, and the loss is on the answer.

An example is one trained assistant turn: the encoder reads the conversation before it rendered by
the one template renderer with the generation prompt (exactly what `chat` and the server send the
engine), and the decoder learns the turn's text followed by EOS. A conversation with two trained
answers gives two examples. Batches are right-padded (an encoder-decoder has no packed rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chatsmith.data.conversation import Conversation
from chatsmith.errors import ChatsmithError


@dataclass
class Seq2SeqExample:
    """Encoder ids (the prompt) and decoder targets (the answer, then EOS)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids) + len(self.labels)

    @property
    def n_targets(self) -> int:
        """Trained decoder tokens."""
        return len(self.labels)


def render_seq2seq(tokenizer: Any, conversation: Conversation, template: str | None,
                   max_length: int | None) -> list[Seq2SeqExample]:
    """One example per trained assistant turn. Too long: the prompt keeps its last `max_length`
    tokens (the latest turns), the answer its first `max_length`."""
    from chatsmith.data.template import render_conversation

    if conversation.is_text:
        raise ChatsmithError(f"{conversation.source or 'a record'}: plain text documents (continued pre-training) "
                             "need a decoder-only model; an encoder-decoder model trains on conversations")
    out = []
    for i, m in enumerate(conversation.messages):
        if m.role != "assistant" or not m.trains():
            continue
        prompt = render_conversation(tokenizer, Conversation(conversation.messages[:i], conversation.source),
                                     template=template, add_generation_prompt=True).input_ids
        answer = tokenizer(m.content, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        cut = max_length is not None and (len(prompt) > max_length or len(answer) > max_length)
        if max_length is not None:
            prompt, answer = prompt[-max_length:], answer[:max_length]
        out.append(Seq2SeqExample(prompt, answer, cut))
    return out


def render_seq2seq_examples(tokenizer: Any, conversations: list[Conversation], cfg: Any
                            ) -> tuple[list[Seq2SeqExample], dict[str, int]]:
    """Conversations -> examples, with the same counts as train/sft.py's render_examples."""
    examples: list[Seq2SeqExample] = []
    for conv in conversations:
        examples.extend(render_seq2seq(tokenizer, conv, cfg.template, cfg.max_length))
    return examples, {"truncated": sum(e.truncated for e in examples), "dropped_no_targets": 0}


def collate_seq2seq(examples: list[Seq2SeqExample], pad_id: int, start_id: int) -> dict[str, Any]:
    """Right-padded encoder ids [B, S] with their attention mask; decoder inputs [B, T] (the start
    token, then the answer shifted right) and labels [B, T] (-100 on padding)."""
    s = max(len(e.input_ids) for e in examples)
    t = max(len(e.labels) for e in examples)
    ids = torch.full((len(examples), s), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), s), dtype=torch.long)
    dec = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), -100, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, :len(e.input_ids)] = torch.tensor(e.input_ids)
        att[b, :len(e.input_ids)] = 1
        dec[b, :len(e.labels)] = torch.tensor([start_id] + e.labels[:-1])
        labels[b, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": att, "decoder_input_ids": dec, "labels": labels,
            "n_tokens": int(att.sum()) + sum(len(e.labels) for e in examples),
            "n_targets": sum(len(e.labels) for e in examples)}


def seq2seq_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed NLL of the answer tokens (fp32, as train/losses.py's nll_sum)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"], use_cache=False)
    keep = batch["labels"] != -100
    return torch.nn.functional.cross_entropy(out.logits[keep].float(), batch["labels"][keep], reduction="sum"), {}


def is_encoder_decoder(model: Any) -> bool:
    """Whether `model` (or the model inside a PEFT wrapper) is an encoder-decoder."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))
