"""Inference: sampling, the one detokenizer and the batched KV-cache engine; token ids in, token ids
(and their text) out.

Importing this package does not import torch; the functions import it when called.
"""

from chatsmith.infer.sampling import SamplingParams, next_token, next_token_probs

__all__ = ["SamplingParams", "next_token", "next_token_probs"]
