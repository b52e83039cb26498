"""The PPO critic: a scalar value head on the policy's last hidden state.

Design choice: a SHARED trunk (the policy's LoRA-adapted transformer) with a Linear value head,
not a second LoRA adapter. One forward pass gives both the token log-probs and the values, which
halves the forward/backward cost of each PPO minibatch on a CPU; the price is that value-loss
gradients also shape the actor's adapter, which --vf-coef keeps small (the shared-trunk design of
the original OpenAI summarisation PPO and TRL's value-head model). The reference needs no memory
either: it is the same base with the adapter disabled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class PolicyWithValueHead(nn.Module):
    """policy (a causal LM, usually a PeftModel) + value_head: Linear(hidden, 1)."""

    def __init__(self, policy: Any, hidden_size: int | None = None) -> None:
        super().__init__()
        self.policy = policy
        hidden = hidden_size or policy.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        # Zero init: every state starts with value 0, so the first advantages are the returns.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, target_positions: torch.Tensor,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed row [1, L] -> (logits [N, V] at target_positions, values [N] of the same states).
        Extra keywords (segment_bounds) go to the policy's forward."""
        out = self.policy(input_ids=input_ids, position_ids=position_ids, logits_to_keep=target_positions,
                          output_hidden_states=True, use_cache=False, **kwargs)
        hidden = out.hidden_states[-1][0, target_positions]
        return out.logits[0], self.value_head(hidden.float()).squeeze(-1)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """--gradient-checkpointing reaches the policy's transformer blocks."""
        self.policy.gradient_checkpointing_enable(**kwargs)

    def enable_input_require_grads(self) -> None:
        """Gradient checkpointing with frozen embeddings needs inputs that require grad."""
        self.policy.enable_input_require_grads()
