"""Answers through the one engine: conversations rendered by the one template renderer (ending with
the assistant header), generated together, returned as stripped text. Every evaluation that needs a
model's answers (tasks, rm-compare, the judge, the quickstart) comes here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.template import render_conversation, stop_token_ids
from chatsmith.infer.sampling import SamplingParams


def load_engine(model_spec: str, precision: str = "module", max_batch_size: int = 16) -> Any:
    """An Engine over a model argument (alias, run directory, HF directory, .gguf...); `precision`
    as `--precision` (auto, int8 or module)."""
    from chatsmith.infer.engine import Engine, resolve_precision
    from chatsmith.models import load_model

    model, tok = load_model(model_spec)
    return Engine(model, tok, max_batch_size=max_batch_size, kv_cache_mb=1024,
                  precision=resolve_precision(model, precision))


def answer_conversations(engine: Any, conversations: Sequence[Sequence[Message]], *, template: str | None = None,
                         max_new_tokens: int = 40, temperature: float = 0.0, seed: int | None = None) -> list[Any]:
    """One completion per conversation (each ends with the user's turn), all generated together by
    `engine`, stopping at the template's end of turn; greedy by default, and with a temperature
    conversation i samples with seed + i. Returns the engine's Completions (`.text`, `.token_ids`)."""
    tok = engine.tokenizer
    prompts = [render_conversation(tok, Conversation(list(msgs)), template=template, add_generation_prompt=True).input_ids
               for msgs in conversations]
    if not prompts:
        return []
    params = SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens,
                            seed=seed if temperature > 0 else None)
    return engine.generate(prompts, params, stop_ids=stop_token_ids(tok, template))


def answer_questions(engine: Any, questions: Sequence[str], *, template: str | None = None,
                     max_new_tokens: int = 40, temperature: float = 0.0, seed: int | None = None) -> list[str]:
    """One answer per question (a user turn each), as stripped text (see answer_conversations)."""
    comps = answer_conversations(engine, [[Message("user", q)] for q in questions], template=template,
                                 max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return [c.text.strip() for c in comps]
