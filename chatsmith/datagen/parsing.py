"""Reading what a teacher wrote: numbered lists, JSON objects, refusals. Each parser returns what it
found or raises `Unusable` with a short reason that the caller counts as a rejection."""

from __future__ import annotations

import json
import re
from typing import Any

_NUMBERED = re.compile(r"^\s*(?:#+\s*)?(?:Task\s*)?(\d{1,3})\s*[.):]\s*(?:Instruction\s*:\s*)?(.*\S)?\s*$", re.I)
_REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i'?m unable|i am unable|i won'?t|"
                      r"as an ai\b|as a language model|i apologi[sz]e)", re.I)


class Unusable(Exception):
    """A teacher answer that cannot be used; `reason` is a short counter name (empty_list, refusal...)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def is_refusal(text: str) -> bool:
    """Whether a reply opens like a refusal ("I'm sorry", "As an AI language model", ...)."""
    return bool(_REFUSAL.match(text.strip()))


def numbered_items(text: str, first_number: int, truncated: bool = False) -> list[str]:
    """The items of a numbered list ("4. Write a poem ..."), in order. A reply that continues the
    prompt's list without repeating the number ("Write a poem...") counts as item `first_number`;
    an item may run over several lines (joined with spaces); with `truncated` (the answer stopped
    at its token limit) the last item is dropped, as it is likely cut. Raises Unusable when there is
    no item."""
    if is_refusal(text):
        raise Unusable("refusal", text.strip()[:80])
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    if lines and not _NUMBERED.match(lines[0]):
        lines[0] = f"{first_number}. {lines[0]}"
    items: list[str] = []
    current: list[str] | None = None
    for line in lines:
        if line.strip() in ("###", "---"):
            current = None
            continue
        m = _NUMBERED.match(line)
        if m:
            current = [m.group(2) or ""]
            items.append("")
        elif current is not None and line.strip():
            current.append(line.strip())
        else:
            current = None if not line.strip() else current
        if current is not None:
            items[-1] = " ".join(p for p in current if p).strip()
    if truncated and items:
        items.pop()
    items = [i for i in items if i]
    if not items:
        raise Unusable("empty_list", text.strip()[:80])
    return items


def json_object(text: str) -> dict[str, Any]:
    """The first JSON object in a reply (a ```json fence and text around it are fine). Raises
    Unusable('invalid_json') when there is none."""
    if is_refusal(text):
        raise Unusable("refusal", text.strip()[:80])
    start = text.find("{")
    decoder = json.JSONDecoder()
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
            if isinstance(value, dict):
                return value
        except json.JSONDecodeError:
            pass
        start = text.find("{", start + 1)
    raise Unusable("invalid_json", text.strip()[:80])
