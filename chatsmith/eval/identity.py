"""Held-out identity and general checks for `chatsmith quickstart`: does the tuned model say its new
name and maker on questions it never trained on, and does it still answer general questions?"""

from __future__ import annotations

import re
from collections.abc import Callable

from chatsmith.data.builtin import DEFAULT_MAKER, DEFAULT_NAME, clean_flag, demo_words, maker_keyword

Check = tuple[str, Callable[[str], bool]]

_NEGATION = re.compile(r"\b(not|no|never|nor|neither|unlike|instead of|rather than)\b|n['’]t\b",
                       re.IGNORECASE)
_SMOLLM = re.compile(r"smol\s*lm\w*", re.IGNORECASE)
_HUGGING_FACE = re.compile(r"hugging\s*face|huggingface|\bhf\b", re.IGNORECASE)


def _claims(answer: str, pattern: re.Pattern[str]) -> bool:
    """Whether `answer` mentions `pattern` without a negation earlier in the same clause, so
    "I'm Smithy, not SmolLM" is no claim but "I am SmolLM, trained by Hugging Face" is."""
    for match in pattern.finditer(answer):
        clause = re.split(r"[.!?;,:\n]", answer[:match.start()])[-1]
        if not _NEGATION.search(clause):
            return True
    return False


def _mentions(answer: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `answer` as whole words, ignoring case and spacing."""
    words = [re.escape(w) for w in phrase.split()]
    return re.search(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", answer, re.IGNORECASE) is not None


def identity_heldout_checks(name: str = DEFAULT_NAME, maker: str = DEFAULT_MAKER) -> list[Check]:
    """(question, predicate) pairs for the held-out identity questions.

    A name question passes when the answer contains `name` and claims neither SmolLM nor Hugging
    Face; a maker question passes when it mentions `maker_keyword(maker)` and makes neither claim.
    """
    name, maker = clean_flag(name, "--name"), clean_flag(maker, "--maker")
    keyword = maker_keyword(maker)
    # A user who really names the model "SmolLM ..." or the maker Hugging Face is not penalised.
    forbidden = [p for p in (_SMOLLM, _HUGGING_FACE) if not p.search(name) and not p.search(maker)]

    def no_false_claim(answer: str) -> bool:
        return not any(_claims(answer, p) for p in forbidden)

    def says_name(answer: str) -> bool:
        return _mentions(answer, name) and no_false_claim(answer)

    def says_maker(answer: str) -> bool:
        return _mentions(answer, keyword) and no_false_claim(answer)

    return [(q, says_name if kind == "name" else says_maker) for q, kind in demo_words()["heldout_identity"]]


def general_heldout_checks() -> list[Check]:
    """(question, predicate) pairs for general questions not in training: the answer must
    mention one of the expected words (whole word, case-insensitive)."""

    def expects(words: list[str]) -> Callable[[str], bool]:
        return lambda answer: any(_mentions(answer, w) for w in words)

    return [(q, expects(words)) for q, words in demo_words()["heldout_general"]]
