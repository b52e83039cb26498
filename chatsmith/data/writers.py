"""Writing conversations back out (`chatsmith data convert`): messages, alpaca or sharegpt records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatsmith.data.conversation import Conversation
from chatsmith.data.formats import read_conversations
from chatsmith.data.tools import openai_call, sharegpt_calls
from chatsmith.errors import ChatsmithError

WRITE_FORMATS = ("messages", "alpaca", "sharegpt")


def write_conversations(conversations: list[Conversation], path: str, to: str) -> None:
    """Write conversations as `to` (messages, alpaca or sharegpt): a JSON list for .json, JSON lines for .jsonl.

    `meta` fields are written as top-level fields of each record, so labels, ids and rejected
    replies survive a round trip. Plain-text records are written as {"text": ...}.
    """
    if to not in WRITE_FORMATS:
        raise ChatsmithError(f"cannot write format '{to}'. Choose one of {', '.join(WRITE_FORMATS)}")
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise ChatsmithError(f"{path}: output must end in .json (a JSON list) or .jsonl (JSON lines)")
    texts = sum(c.is_text for c in conversations)
    if 0 < texts < len(conversations):
        raise ChatsmithError(f"cannot write a mix of plain-text and chat records to {path}; "
                             "convert them separately")
    records = [_to_record(c, to) for c in conversations]
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        if suffix == ".json":
            json.dump(records, f, ensure_ascii=False, indent=2, default=str)
            f.write("\n")
        else:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def _to_record(conv: Conversation, to: str) -> dict[str, Any]:
    if conv.is_text:
        return {"text": conv.messages[0].content, **_extra(conv.meta, {"text"})}
    if to == "messages":
        msgs = []
        for m in conv.messages:
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:   # OpenAI's shape: arguments as JSON strings (chatsmith/data/tools.py)
                d["content"] = m.content or None
                d["tool_calls"] = [openai_call(c) for c in m.tool_calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.train is not None:
                d["loss_weight"] = 1.0 if m.train else 0.0
            msgs.append(d)
        tools = {"tools": conv.tools} if conv.tools else {}
        return {"messages": msgs, **tools, **_extra(conv.meta, {"messages", "tools"})}
    if to == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}
        turns = []
        for m in conv.messages:
            if m.tool_calls:   # LLaMA-Factory's function_call turn (its text, if any, as the turn before)
                if m.content:
                    turns.append({"from": "gpt", "value": m.content})
                d = {"from": "function_call", "value": sharegpt_calls(m.tool_calls)}
            else:
                d = {"from": names.get(m.role, m.role), "value": m.content}
            if m.train is not None:
                d["loss_weight"] = 1.0 if m.train else 0.0
            turns.append(d)
        tools = {"tools": json.dumps(conv.tools, ensure_ascii=False)} if conv.tools else {}   # a JSON string there
        return {"conversations": turns, **tools, **_extra(conv.meta, {"conversations", "system", "chosen", "tools"})}
    return _to_alpaca(conv)


def _to_alpaca(conv: Conversation) -> dict[str, Any]:
    msgs = list(conv.messages)
    where = conv.source or "a conversation"
    rec: dict[str, Any] = {}
    if msgs and msgs[0].role == "system":
        rec["system"] = msgs.pop(0).content
    roles = [m.role for m in msgs]
    if not msgs or len(msgs) % 2 or roles != ["user", "assistant"] * (len(msgs) // 2):
        raise ChatsmithError(f"{where}: cannot be written as alpaca (it needs alternating user/assistant turns "
                             f"after an optional system prompt, got {', '.join(m.role for m in conv.messages)}); "
                             "write --to messages instead")
    if any(m.trains() != (m.role == "assistant") for m in msgs):
        raise ChatsmithError(f"{where}: has per-message training flags that alpaca cannot express; "
                             "write --to messages instead")
    pairs = [[msgs[i].content, msgs[i + 1].content] for i in range(0, len(msgs), 2)]
    last = pairs.pop()
    rec = {"instruction": last[0], "input": "", "output": last[1], **rec}
    if pairs:
        rec["history"] = pairs
    return {**rec, **_extra(conv.meta, {"instruction", "input", "output", "system", "history", "chosen"})}


def _extra(meta: dict[str, Any], reserved: set[str]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in reserved}


def convert(in_path: str, out_path: str, to: str, format: str | None = None,
            columns: dict[str, str] | None = None, skip_bad: bool = False) -> str:
    """Read any supported format and write it as `to`; returns a one-line summary."""
    if to not in WRITE_FORMATS:
        raise ChatsmithError(f"cannot write format '{to}'. Choose one of {', '.join(WRITE_FORMATS)}")
    result = read_conversations(in_path, format=format, columns=columns, skip_bad=skip_bad)
    write_conversations(result.conversations, out_path, to)
    summary = (f"wrote {len(result.conversations)} conversations from {in_path} ({result.format}) "
               f"to {out_path} ({to})")
    if result.skipped:
        summary += f"; skipped {len(result.skipped)} malformed records (first: {result.skipped[0]})"
    return summary

