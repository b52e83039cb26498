"""Inference: sampling and KV-cached streaming generation, token ids in and token ids out.

Importing this package does not import torch; the functions import it when called.
"""

from chatsmith.infer.generate import generate, stream_generate
from chatsmith.infer.sampling import SamplingParams, next_token, next_token_probs

__all__ = ["SamplingParams", "generate", "next_token", "next_token_probs", "stream_generate"]
