"""`chatsmith data clean`: FastChat-style cleaning of ShareGPT conversations (after FastChat's
`fastchat/data/clean_sharegpt.py` and `split_long_conversation.py`), one record at a time.

For each conversation: HTML in the turns becomes Markdown (ShareGPT scrapes kept the page's HTML;
"Copy code" buttons scraped into code blocks are removed); empty turns are dropped; leading turns
that are not the human's are dropped; a conversation whose roles do not alternate human/gpt after
that is dropped as broken, and a trailing unanswered human turn is cut; optionally conversations
with blocked words are dropped; and, with a tokenizer and `max_length`, a conversation longer than
that is split into several, at exchange boundaries (an exchange: a human turn and its answer).
Records in the messages format are cleaned the same way and written as ShareGPT.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from chatsmith.data.ops.stream import RecordWriter, good_records

_HTML = re.compile(r"<\s*(div|p|pre|code|span|br|ul|ol|li|table|tr|td|th|h[1-6]|a|b|i|strong|em|blockquote|img)\b[^>]*>",
                   re.I)
_COPY_CODE = re.compile(r"```\s*(.*?)(?:Copy code)+(.+?)\s*?```", re.S)
_ROLE = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "chatgpt": "gpt", "bard": "gpt",
         "bing": "gpt", "model": "gpt", "system": "system"}


def html_to_markdown(text: str) -> str:
    """Markdown for text that holds HTML tags (markdownify, as FastChat); other text unchanged."""
    if not _HTML.search(text):
        return text
    try:
        from markdownify import markdownify
    except ImportError:  # pragma: no cover - a dependency of chatsmith
        from chatsmith.errors import ChatsmithError

        raise ChatsmithError("data clean needs markdownify to turn HTML into Markdown: pip install markdownify") from None
    md = markdownify(text, heading_style="ATX", code_language_callback=None)
    md = _COPY_CODE.sub(lambda m: f"```{m.group(1).strip()}\n{m.group(2).strip()}\n```", md)
    return re.sub(r"\n{3,}", "\n\n", md).strip()


def _turns(rec: Any) -> tuple[list[dict[str, str]], str] | None:
    """(turns as {from, value}, system prompt) of a ShareGPT or messages record, or None."""
    if not isinstance(rec, dict):
        return None
    system = rec.get("system") if isinstance(rec.get("system"), str) else ""
    if isinstance(rec.get("conversations"), list):
        raw, who, what = rec["conversations"], "from", "value"
    elif isinstance(rec.get("messages"), list):
        raw, who, what = rec["messages"], "role", "content"
    else:
        return None
    turns = []
    for t in raw:
        if not isinstance(t, dict):
            return None
        role = _ROLE.get(str(t.get(who, "")).lower())
        value = t.get(what)
        if isinstance(value, list):   # typed parts
            value = "".join(p.get("text") or p.get("value") or "" for p in value if isinstance(p, dict))
        if role is None or not isinstance(value, str):
            return None
        if role == "system":
            system = system or value
            continue
        turns.append({"from": role, "value": value})
    return turns, system


def clean_conversation(rec: Any, blocked: Sequence[str] = ()) -> tuple[dict[str, Any] | None, str | None]:
    """(the cleaned ShareGPT record, None) or (None, the reason it is dropped)."""
    parsed = _turns(rec)
    if parsed is None:
        return None, "not a conversation"
    turns, system = parsed
    cleaned = []
    for t in turns:
        value = html_to_markdown(t["value"]).strip()
        if value:
            cleaned.append({"from": t["from"], "value": value})
    while cleaned and cleaned[0]["from"] != "human":
        cleaned.pop(0)
    if cleaned and cleaned[-1]["from"] == "human":
        cleaned.pop()
    if len(cleaned) < 2:
        return None, "no complete exchange"
    if any(t["from"] != ("human" if i % 2 == 0 else "gpt") for i, t in enumerate(cleaned)):
        return None, "roles do not alternate"
    if blocked:
        low = " ".join(t["value"].lower() for t in cleaned)
        if any(w in low for w in blocked):
            return None, "blocked word"
    out = {k: v for k, v in rec.items() if k not in ("conversations", "messages", "system")}
    if system:
        out["system"] = system
    out["conversations"] = cleaned
    return out, None


def split_long(rec: dict[str, Any], tokenizer: Any, max_length: int, template: str | None = None) -> list[dict[str, Any]]:
    """The conversation cut into pieces of whole exchanges, each within `max_length` tokens as the
    model's template renders them (an exchange longer than that alone becomes a piece of its own,
    to be truncated at training)."""
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation

    turns = rec["conversations"]
    system = [Message("system", rec["system"])] if rec.get("system") else []
    exchanges = [turns[i:i + 2] for i in range(0, len(turns), 2)]

    def length(ex: list[dict[str, str]], first: bool) -> int:
        msgs = [Message("user" if t["from"] == "human" else "assistant", t["value"]) for t in ex]
        return len(render_conversation(tokenizer, Conversation((system if first else []) + msgs),
                                       template=template).input_ids)

    pieces: list[list[dict[str, str]]] = []
    current: list[dict[str, str]] = []
    used = 0
    for ex in exchanges:
        n = length(ex, not current)
        if current and used + n > max_length:
            pieces.append(current)
            current, used = [], 0
            n = length(ex, True)
        current += ex
        used += n
    if current:
        pieces.append(current)
    if len(pieces) == 1:
        return [rec]
    base = rec.get("id", "")
    return [{**rec, "id": f"{base}_{i}" if base else i, "conversations": p} for i, p in enumerate(pieces)]


def clean(input_path: str, output_path: str, *, tokenizer: Any = None, max_length: int | None = None,
          template: str | None = None, blocked_words: Sequence[str] = (), skip_bad: bool = False) -> dict[str, Any]:
    """Clean every conversation of `input_path` into `output_path` (ShareGPT); returns counts."""
    blocked = [w.lower() for w in blocked_words if w]
    reasons: Counter = Counter()
    read = html = split_records = 0
    with RecordWriter(output_path) as out:
        for _, rec in good_records(input_path, skip_bad):
            read += 1
            parsed = _turns(rec)
            if parsed and any(_HTML.search(t["value"]) for t in parsed[0]):
                html += 1
            cleaned, why = clean_conversation(rec, blocked)
            if cleaned is None:
                reasons[why] += 1
                continue
            pieces = split_long(cleaned, tokenizer, max_length, template) if tokenizer and max_length else [cleaned]
            split_records += len(pieces) > 1
            for p in pieces:
                out.write(p)
    return {"read": read, "written": out.count, "html_converted": html, "split": split_records,
            "dropped": dict(sorted(reasons.items()))}
