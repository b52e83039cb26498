"""The engine's runner for encoder-decoder models (T5, mT5): the prompt goes through the encoder
once, and the decoder generates the answer from its start token with a self-attention cache per
slot. The engine above it is unchanged, so streaming, continuous batching, sampling and stop
tokens work as for a decoder-only model; like `ModuleRunner`, a decode step runs one forward per
sequence.

A prompt prefilled in several chunks is encoded again at each chunk (the encoder is bidirectional,
so it needs the whole prompt); only the last chunk's logits are used.
"""

from __future__ import annotations

from typing import Any

import torch

from chatsmith.errors import ChatsmithError
from chatsmith.infer.runners import base_model


class Seq2SeqRunner:
    """Encoder-decoder generation slot by slot; see the module docstring."""

    def __init__(self, model: Any, *, max_batch_size: int, slot_tokens: int) -> None:
        self.model = model
        self.base = base_model(model)
        self.max_batch_size, self.slot_tokens = max_batch_size, slot_tokens
        cfg = self.base.config
        self.start_id = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
        self.device = next(model.parameters()).device
        self.slots: dict[int, dict[str, Any]] = {}
        self.adapters: dict[str, Any] = {}

    @staticmethod
    def bytes_per_token(model: Any) -> int:
        """Cache bytes per token: decoder self-attention keys and values (fp32), all decoder layers."""
        cfg = base_model(model).config
        layers = getattr(cfg, "num_decoder_layers", None) or getattr(cfg, "num_layers", None) or 1
        width = getattr(cfg, "num_heads", 1) * getattr(cfg, "d_kv", 0) or getattr(cfg, "d_model", 0)
        return 2 * layers * width * 4

    def sync_weights(self) -> None:
        """Nothing to refresh: the module's own weights are read live."""

    def release(self, slot: int) -> None:
        """Drop the slot's encoder output and cache."""
        self.slots.pop(slot, None)

    def copy_prefix(self, src: int, dst: int, n: int) -> bool:
        """False: each request encodes its own prompt."""
        return False

    def _step(self, slot: int, token: int) -> torch.Tensor:
        st = self.slots[slot]
        out = self.model(encoder_outputs=st["encoder"], attention_mask=st["mask"],
                         decoder_input_ids=torch.tensor([[token]], device=self.device),
                         past_key_values=st["cache"], use_cache=True)
        st["cache"] = out.past_key_values
        return out.logits[0, -1].float().cpu()

    def prefill(self, slot: int, ids: list[int], start: int, adapter: str | None) -> torch.Tensor:
        """Add a chunk of the prompt, encode the prompt so far and run the decoder's start token;
        logits of the answer's first token [V]."""
        from transformers import DynamicCache, EncoderDecoderCache

        prompt = (self.slots[slot]["prompt"] if start and slot in self.slots else []) + list(ids)
        x = torch.tensor([prompt], dtype=torch.long, device=self.device)
        mask = torch.ones_like(x)
        encoder = self.base.get_encoder()(input_ids=x, attention_mask=mask, return_dict=True)
        cfg = self.base.config
        self.slots[slot] = {"prompt": prompt, "encoder": encoder, "mask": mask,
                            "cache": EncoderDecoderCache(DynamicCache(config=cfg), DynamicCache(config=cfg))}
        return self._step(slot, self.start_id)

    def prefill_scored(self, slot: int, ids: list[int], start: int, adapter: str | None,
                       rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt log-probs do not exist for an encoder-decoder: the encoder reads the prompt, nothing predicts it."""
        raise ChatsmithError("prompt log-probs (echo) are not available for an encoder-decoder model: its "
                             "encoder reads the prompt and nothing predicts the prompt's tokens")

    def decode(self, slots: list[int], tokens: list[int], positions: list[int],
               adapters: list[str | None]) -> torch.Tensor:
        """One new token for each row (one decoder forward per row); logits [B, V]."""
        return torch.stack([self._step(s, t) for s, t in zip(slots, tokens)])
