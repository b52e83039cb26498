"""Sampling: turn one step's logits into the next token id.

The processing order is Hugging Face's (`transformers.generation.utils._get_logits_processor`):
repetition penalty, then temperature, top-k, top-p, min-p. Keeping that order means a user's
settings behave here as they do in `model.generate`, and the parity test can check it. OpenAI's
presence and frequency penalties (over the generated tokens only) come right after the repetition
penalty, before the temperature, as in vLLM.

torch is imported inside the functions, not at module level, so `SamplingParams` can be imported
by the CLI without loading torch (STYLE.md, principle 6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chatsmith.errors import ChatsmithError

if TYPE_CHECKING:
    import torch

MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How to choose each new token. Field metadata holds the `--flag` help text."""

    temperature: float = field(default=0.7, metadata={"help": "softmax temperature; 0 (or below 1e-5) means greedy (always the most likely token)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling: keep the smallest set of tokens whose probability adds up to at least this (1: off)"})
    top_k: int = field(default=0, metadata={"help": "keep only the K most likely tokens (0: off)"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens less likely than this fraction of the most likely token (0: off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "divide positive logits (multiply negative ones) of tokens already in the prompt or answer by this (1: off)"})
    max_new_tokens: int = field(default=256, metadata={"help": "stop after this many new tokens (0: only score the prompt, see prompt_logprobs)"})
    seed: int | None = field(default=None, metadata={"help": "random seed; the same seed gives the same answer"})
    presence_penalty: float = field(default=0.0, metadata={"help": "subtract this from the logit of every token already generated (OpenAI semantics; 0: off)"})
    frequency_penalty: float = field(default=0.0, metadata={"help": "subtract this times the count of each token already generated (0: off)"})
    stop: list[str] = field(default_factory=list, metadata={"help": "end generation when the text contains one of these strings"})
    stop_token_ids: list[int] = field(default_factory=list, metadata={"help": "extra token ids that end generation"})
    top_logprobs: int = field(default=0, metadata={"help": "also return the log-probs of the K most likely tokens at each step"})
    n: int = field(default=1, metadata={"help": "number of answers per prompt"})
    prompt_logprobs: int | None = field(default=None, metadata={"help": "also return the log-prob of every prompt token but the first (which has no context) and the K most likely tokens at each of those positions (None: off)"})

    def validate(self) -> None:
        """Raise ChatsmithError naming the first field outside its allowed range."""
        # Written as `not (ok)` so that NaN, which fails every comparison, is rejected too.
        checks = [
            ("temperature", self.temperature, _is_number(self.temperature) and self.temperature >= 0,
             "must be >= 0 (0 means greedy)"),
            ("top_p", self.top_p, _is_number(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k, _is_int(self.top_k) and self.top_k >= 0, "must be an integer >= 0 (0: off)"),
            ("min_p", self.min_p, _is_number(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty,
             _is_number(self.repetition_penalty) and self.repetition_penalty > 0, "must be > 0 (1: off)"),
            ("max_new_tokens", self.max_new_tokens, _is_int(self.max_new_tokens) and (
                self.max_new_tokens >= 1 or (self.max_new_tokens == 0 and self.prompt_logprobs is not None)),
             "must be an integer >= 1 (or 0 with prompt_logprobs set: only score the prompt)"),
            # torch.Generator.manual_seed accepts 64-bit values.
            ("seed", self.seed, self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64),
             "must be an integer in [0, 2**64) or unset"),
            ("presence_penalty", self.presence_penalty,
             _is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", self.frequency_penalty,
             _is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("stop", self.stop, isinstance(self.stop, list) and all(isinstance(x, str) and x for x in self.stop),
             "must be a list of non-empty strings"),
            ("stop_token_ids", self.stop_token_ids,
             isinstance(self.stop_token_ids, list) and all(_is_int(x) and x >= 0 for x in self.stop_token_ids),
             "must be a list of token ids (integers >= 0)"),
            ("top_logprobs", self.top_logprobs, _is_int(self.top_logprobs) and 0 <= self.top_logprobs <= 20,
             "must be an integer in [0, 20]"),
            ("n", self.n, _is_int(self.n) and 1 <= self.n <= 128, "must be an integer in [1, 128]"),
            ("prompt_logprobs", self.prompt_logprobs,
             self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
             "must be an integer in [0, 20] or unset"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ChatsmithError(f"sampling parameter '{name}' {allowed}, got {value!r}")

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is always chosen. Temperatures below MIN_TEMPERATURE count as
        0: dividing logits by them overflows float32 (1e-40 would turn every logit into inf)."""
        return self.temperature < MIN_TEMPERATURE


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens seen in `history` ("penalized sampling" of CTRL, Keskar et al. 2019; HF semantics).

    A positive logit is divided by `penalty` and a negative one multiplied by it, so a penalty > 1
    always makes a seen token less likely. Each token is penalised once however often it occurs.
    Returns a new [vocab] tensor.
    """
    import torch

    if penalty == 1.0 or history.numel() == 0:
        return logits
    history = history.to(device=logits.device, dtype=torch.long)
    # A penalty that rounds to 0 (or inf) in float32 would make 0/0 = NaN: keep it representable.
    penalty = min(max(penalty, 1e-30), 1e30)
    seen = logits.gather(0, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    # A tiny penalty (1e-45) would turn a logit into inf and the distribution into NaNs: beyond
    # +-1e4 a logit changes no probability anyway (logits of real models stay within +-100).
    seen = seen.clamp(-1e4, 1e4)
    # scatter writes the same value for repeated ids, so duplicates in history are harmless.
    return logits.scatter(0, history, seen)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor,
                    counts: dict[int, int] | None = None) -> torch.Tensor:
    """The repetition penalty over `history` (prompt and answer so far), then OpenAI's penalties
    over `counts` (generated token -> times generated): logit -= count * frequency + presence.
    Returns float32 [vocab]; the input is not modified."""
    import torch

    scores = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and counts:
        ids = torch.tensor(list(counts), dtype=torch.long, device=scores.device)
        n = torch.tensor(list(counts.values()), dtype=scores.dtype, device=scores.device)
        scores = scores.clone() if scores is logits else scores
        scores[ids] -= n * params.frequency_penalty + params.presence_penalty
    return scores


def warped_probs(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to penalised logits: float32 probabilities [vocab]."""
    import torch

    scores = scores / params.temperature
    neg_inf = float("-inf")
    if 0 < params.top_k < scores.shape[-1]:
        # Ties with the k-th value are kept, as in HF's TopKLogitsWarper.
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, neg_inf)
    if params.top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): drop a token when the tokens more likely
        # than it already hold top_p of the mass. The most likely token is always kept.
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probs = sorted_scores.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[0] = False
        drop = drop_sorted.scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, neg_inf)
    if params.min_p > 0.0:
        # min-p sampling (Nguyen et al. 2024): keep tokens with p >= min_p * p_max. The ratio is the same
        # before and after renormalisation, so applying it after top-k/top-p is well defined.
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(), neg_inf)
    return scores.softmax(-1)


def next_token_probs(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor,
                     counts: dict[int, int] | None = None) -> torch.Tensor:
    """The distribution the next token is drawn from: float32 [vocab], summing to 1.

    Greedy (temperature 0) gives a one-hot at the arg-max of the penalised logits.
    """
    import torch

    scores = apply_penalties(logits, params, history, counts)
    if params.greedy:
        return torch.nn.functional.one_hot(scores.argmax(), scores.shape[-1]).float()
    return warped_probs(scores, params)


def next_token(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor,
               generator: torch.Generator | None, counts: dict[int, int] | None = None) -> int:
    """Choose the next token id from one step's logits [vocab].

    `history` holds the prompt and generated ids so far (1-D), used by the repetition penalty;
    `counts` the generated ids' counts, used by the presence/frequency penalties. Pure apart from
    drawing from `generator` (None: torch's global generator); greedy decoding draws nothing.
    """
    import torch

    scores = apply_penalties(logits, params, history, counts)
    if params.greedy:
        return int(scores.argmax())
    return int(torch.multinomial(warped_probs(scores, params), 1, generator=generator))
