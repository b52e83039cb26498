"""Answers to plain questions through the one engine: each question rendered by the one template
renderer as a user turn, generated in one batch, returned as text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.template import render_conversation, stop_token_ids
from chatsmith.infer.sampling import SamplingParams


def answer_questions(engine: Any, questions: Sequence[str], *, template: str | None = None,
                     max_new_tokens: int = 40, temperature: float = 0.0, seed: int | None = None) -> list[str]:
    """One answer per question (stripped text, ending at the template's end-of-turn token), all
    generated together by `engine` (greedy by default; with a temperature, question i samples with
    seed + i)."""
    tok = engine.tokenizer
    prompts = [render_conversation(tok, Conversation([Message("user", q)]), template=template,
                                   add_generation_prompt=True).input_ids for q in questions]
    params = SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    comps = engine.generate(prompts, params, stop_ids=stop_token_ids(tok, template))
    return [c.text.strip() for c in comps]
