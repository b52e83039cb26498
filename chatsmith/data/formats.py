"""Readers and writers: every supported file format becomes a list of `Conversation`.

Formats (auto-detected from the first record when not given):

- ``alpaca``   ``{instruction, input, output}``, optional ``system`` and ``history`` ([[user, assistant]]);
  also self-instruct seed tasks (``instances: [{input, output}]``) and ``chosen``/``rejected``
  instead of ``output``.
- ``sharegpt`` ``{conversations: [{from, value}]}``, optional top-level ``system``; a file may be a list or
  one object; preference records (``chosen``/``rejected`` message objects) keep the chosen reply.
- ``messages`` OpenAI ``{messages: [{role, content}]}``; content a string or typed text parts; per-message
  ``loss_weight``; a record's ``label`` (KTO) is kept in ``meta``; TRL ``{prompt?, chosen, rejected}`` lists.
- ``hh``       Anthropic hh-rlhf ``{chosen, rejected}`` transcripts (or ``{text}``):
  "\\n\\nHuman: ...\\n\\nAssistant: ...".
- ``text``     ``.txt`` files (documents separated by blank lines) or ``{text}`` records, for pre-training.
- ``columns``  CSV/TSV/Parquet/JSON(L) with a column mapping ``{prompt, response, system}`` or ``{text}``.

Files: ``.json`` (a list, one object, or JSON lines), ``.jsonl``/``.ndjson``, ``.csv``/``.tsv``,
``.parquet``, ``.txt``; a name like ``owner/dataset`` that is not a local path is loaded from the
Hugging Face hub. Records are named in errors as "line N" (JSONL, 1-based file line), "record N"
(index into a JSON list, 0-based, as in ``data[N]``) or "row N" (CSV: the file line; Parquet and hub:
0-based row index).

For preference data the conversation holds the prompt plus the *chosen* reply (what SFT trains on);
``meta["rejected"]`` is always the rejected final reply as a string.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatsmith.data.conversation import TEXT_ROLE, Conversation, Message
from chatsmith.data.sources import SKIP_HINT, RecordContext, convert_records, read_records
from chatsmith.data.spec import FORMATS
from chatsmith.data.tools import ToolError, normalize_calls, normalize_tools, tool_names
from chatsmith.errors import ChatsmithError, DataError

COLUMN_KEYS = ("prompt", "response", "system", "text")

_FORMAT_HELP = (
    "alpaca ({instruction, input, output}), sharegpt ({conversations: [{from, value}]}), "
    "messages ({messages: [{role, content}]}), hh ({chosen, rejected} 'Human:/Assistant:' transcripts), "
    "text (.txt or {text}), columns (any table with --columns, e.g. prompt=question,response=answer)"
)

# ShareGPT speaker names -> our roles. "function_call" is the assistant calling a tool and
# "observation" the tool's answer (LLaMA-Factory's convention).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant",
    "chatgpt": "assistant", "function_call": "assistant",
    "tool": "tool", "observation": "tool", "function": "tool",
}
# OpenAI roles: "developer" is the newer name for "system", "function" the older one for "tool".
MESSAGE_ROLES = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant",
    "tool": "tool", "function": "tool",
}
# Column names recognised without a mapping, tried in order.
_DEFAULT_COLUMN_PAIRS = (("prompt", "response"), ("prompt", "completion"), ("question", "answer"),
                         ("query", "response"), ("input", "output"),
                         ("prompt", "chosen"))  # the last: TRL's {prompt, chosen, rejected} strings
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


@dataclass
class ReadResult:
    """The conversations read from one file, the records skipped (with --skip-bad), the format and the path."""
    conversations: list[Conversation]
    skipped: list[DataError]  # malformed records dropped because of skip_bad, in file order
    format: str
    path: str


def read_conversations(path: str, format: str | None = None, columns: dict[str, str] | None = None,
                       skip_bad: bool = False, system_prompt: str | None = None) -> ReadResult:
    """Read a file (or hub dataset) into conversations, detecting the format from the first record.

    A malformed record raises `DataError` naming file, record and field; with `skip_bad` it is
    dropped and listed in `ReadResult.skipped` instead.
    """
    path = str(path)
    columns = dict(columns) if columns else None
    if format is not None and format not in FORMATS:
        raise ChatsmithError(f"unknown data format '{format}'. Known formats: {', '.join(FORMATS)}")
    if columns:
        _check_column_mapping(columns)
        if format not in (None, "columns"):
            raise ChatsmithError(f"a column mapping only applies to --format columns, not '{format}'")
        format = "columns"

    records = read_records(path)
    if Path(path).suffix.lower() == ".txt" and format is None:
        format = "text"

    columns_checked = False

    def convert(record: Any, ctx: RecordContext) -> list[Conversation]:
        nonlocal format, columns, columns_checked
        if format is None or (format == "columns" and columns is None):
            # The format (and a default column mapping) is decided once, from the first
            # readable record (with skip_bad, the first record whose shape is recognised).
            format, columns = _detect(record, ctx, format, columns)
        if format == "columns" and not columns_checked:
            _check_columns_present(record, columns or {}, ctx)
            columns_checked = True
        convs = _CONVERTERS[format](record, ctx, columns or {})
        for conv in convs:
            if system_prompt and not conv.is_text and not any(m.role == "system" for m in conv.messages):
                conv.messages.insert(0, Message("system", system_prompt))
        return convs

    conversations, skipped = convert_records(path, records, convert, skip_bad)
    return ReadResult(conversations=conversations, skipped=skipped, format=str(format), path=path)


# ---- detection --------------------------------------------------------------------------------

def _detect(record: Any, ctx: RecordContext, format: str | None,
            columns: dict[str, str] | None) -> tuple[str, dict[str, str] | None]:
    if isinstance(record, str):
        return "text", columns
    if not isinstance(record, dict):
        raise ctx.error(f"expected a JSON object, found a {type(record).__name__}", hint=None)
    keys = set(record)
    if format is None:
        if "messages" in keys:
            return "messages", columns
        if "conversations" in keys:
            return "sharegpt", columns
        if "instruction" in keys:
            return "alpaca", columns
        if isinstance(record.get("chosen"), list):
            return "messages", columns  # TRL conversational preference: {prompt?, chosen, rejected}
        if isinstance(record.get("chosen"), str) and "prompt" not in keys:
            return "hh", columns
        if isinstance(record.get("text"), str):
            return ("hh" if _looks_like_hh(record["text"]) else "text"), columns
    for prompt, response in _DEFAULT_COLUMN_PAIRS:
        if prompt in keys and response in keys:
            mapping = {"prompt": prompt, "response": response}
            if "system" in keys:
                mapping["system"] = "system"
            return "columns", mapping
    found = ", ".join(sorted(map(str, keys))) or "none"
    what = "which columns hold the prompt and the response" if format == "columns" else "the format"
    raise ctx.error(f"cannot tell {what} from this record (its fields: {found})",
                    hint=f"pass --format and/or --columns. Known formats: {_FORMAT_HELP}")


def _looks_like_hh(text: str) -> bool:
    return "Human:" in text[:20] and "\n\nAssistant:" in text


def _check_column_mapping(columns: dict[str, str]) -> None:
    unknown = [k for k in columns if k not in COLUMN_KEYS]
    if unknown:
        raise ChatsmithError(f"--columns: unknown key '{unknown[0]}'. Allowed keys: {', '.join(COLUMN_KEYS)}")
    if "text" in columns:
        if set(columns) - {"text"}:
            raise ChatsmithError("--columns: 'text' (pre-training text) cannot be combined with prompt/response")
    elif "prompt" not in columns or "response" not in columns:
        raise ChatsmithError("--columns needs both 'prompt' and 'response' "
                             "(e.g. prompt=question,response=answer), or 'text' for plain text")


def _check_columns_present(record: Any, columns: dict[str, str], ctx: RecordContext) -> None:
    # A mapped column missing from the first record is missing from the whole table: stop with
    # the list of real column names rather than skipping every row.
    if not isinstance(record, dict):
        return
    for key, col in columns.items():
        if col not in record and key != "system":
            raise ChatsmithError(f"{ctx.path}: column '{col}' (mapped to '{key}') not found; "
                                 f"the columns are: {', '.join(map(str, record))}")


# ---- converters: one record -> conversations -------------------------------------------------

def text_field(value: Any, ctx: RecordContext, field: str, required: bool = True) -> str | None:
    """A record's text value; numbers are accepted (CSV/Parquet cells), None means missing."""
    if isinstance(value, float) and math.isnan(value):
        value = None
    if value is None:
        if required:
            raise ctx.error(f"missing '{field}'", field)
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ctx.error(f"must be text, got {type(value).__name__}", field)


def _train_flag(msg: dict[str, Any], ctx: RecordContext, field: str) -> bool | None:
    """Per-message training flag: `loss_weight` (LLaMA-Factory), `weight` (axolotl/OpenAI) or `train`."""
    for key in ("loss_weight", "weight"):
        if key in msg and msg[key] is not None:
            w = msg[key]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ctx.error(f"must be a number >= 0, got {w!r}", f"{field}.{key}")
            return w > 0
    if "train" in msg and msg["train"] is not None:
        if not isinstance(msg["train"], bool):
            raise ctx.error(f"must be true or false, got {msg['train']!r}", f"{field}.train")
        return msg["train"]
    return None


def _conversation(messages: list[tuple[Message, str]], ctx: RecordContext, list_field: str,
                  meta: dict[str, Any] | None = None, allow_empty_last: bool = False) -> Conversation:
    """Validate (message, field-name) pairs and build the Conversation. `allow_empty_last`: the final
    assistant reply may be empty (hh-rlhf, where "say nothing" is sometimes the preferred answer)."""
    for k, (m, fld) in enumerate(messages):
        if allow_empty_last and k == len(messages) - 1:
            continue
        if m.role == "assistant" and not m.content.strip() and not m.tool_calls:
            raise ctx.error("assistant turn is empty", fld,
                            hint="write the reply, or pass --skip-bad to drop such records")
    if not any(m.role == "assistant" for m, _ in messages):
        raise ctx.error("conversation has no assistant turn", list_field,
                        hint="every training example needs at least one assistant reply; " + SKIP_HINT)
    return Conversation([m for m, _ in messages], source=ctx.source, meta=meta or {})


def _meta(record: dict[str, Any], used: set[str]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in used}


def _require_dict(record: Any, ctx: RecordContext) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ctx.error(f"expected a JSON object, found a {type(record).__name__}")
    return record


def _from_alpaca(record: Any, ctx: RecordContext, columns: dict[str, str]) -> list[Conversation]:
    rec = _require_dict(record, ctx)
    if "instances" in rec and "output" not in rec:  # self-instruct seed task: one example per instance
        instances = rec["instances"]
        if not isinstance(instances, list) or not instances:
            raise ctx.error("must be a non-empty list of {input, output}", "instances")
        base = {k: v for k, v in rec.items() if k != "instances"}
        out = []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise ctx.error("must be an object {input, output}", f"instances[{i}]")
            sub = RecordContext(ctx.path, ctx.where if len(instances) == 1 else f"{ctx.where}, instance {i}")
            out += _from_alpaca({**base, **inst}, sub, columns)
        return out
    instruction = text_field(rec.get("instruction"), ctx, "instruction") or ""
    inp = text_field(rec.get("input"), ctx, "input", required=False) or ""
    user = f"{instruction}\n\n{inp}" if instruction and inp else instruction or inp
    if not user.strip():
        raise ctx.error("'instruction' and 'input' are both empty", "instruction")
    meta = _meta(rec, {"instruction", "input", "output", "system", "history", "chosen", "rejected"})
    if "output" in rec or "chosen" not in rec:
        output_field = "output"
        output = text_field(rec.get("output"), ctx, "output")
    else:  # pairwise alpaca (LLaMA-Factory): train on the chosen answer
        output_field = "chosen"
        output = text_field(rec.get("chosen"), ctx, "chosen")
    if "rejected" in rec:
        meta["rejected"] = text_field(rec["rejected"], ctx, "rejected")
    msgs: list[tuple[Message, str]] = []
    system = text_field(rec.get("system"), ctx, "system", required=False)
    if system:
        msgs.append((Message("system", system), "system"))
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise ctx.error("must be a list of [user, assistant] pairs", "history")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ctx.error("must be a [user, assistant] pair", f"history[{i}]")
        msgs.append((Message("user", text_field(pair[0], ctx, f"history[{i}][0]") or ""), f"history[{i}][0]"))
        msgs.append((Message("assistant", text_field(pair[1], ctx, f"history[{i}][1]") or ""), f"history[{i}][1]"))
    msgs.append((Message("user", user), "instruction"))
    msgs.append((Message("assistant", output or ""), output_field))
    return [_conversation(msgs, ctx, "output", meta)]


def sharegpt_message(item: Any, ctx: RecordContext, fld: str) -> Message:
    """One ShareGPT turn {from, value} (or {role, content}) as a Message; errors name `fld`."""
    if not isinstance(item, dict):
        raise ctx.error("must be an object {from, value}", fld)
    speaker_key = "from" if "from" in item else "role" if "role" in item else None
    text_key = "value" if "value" in item else "content" if "content" in item else None
    if speaker_key is None:
        raise ctx.error("missing 'from' (who speaks)", f"{fld}.from")
    if text_key is None:
        raise ctx.error("missing 'value' (the text)", f"{fld}.value")
    speaker = item[speaker_key]
    role = SHAREGPT_ROLES.get(str(speaker).lower()) if isinstance(speaker, str) else None
    if role is None:
        raise ctx.error(f"unknown speaker {speaker!r}; allowed: {', '.join(SHAREGPT_ROLES)}",
                        f"{fld}.{speaker_key}")
    content = text_field(item[text_key], ctx, f"{fld}.{text_key}") or ""
    return Message(role, content, _train_flag(item, ctx, fld))


def _from_sharegpt(record: Any, ctx: RecordContext, columns: dict[str, str]) -> list[Conversation]:
    rec = _require_dict(record, ctx)
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ctx.error("missing or empty (expected a list of {from, value})" if not turns
                        else f"must be a list of {{from, value}}, got {type(turns).__name__}", "conversations")
    msgs: list[tuple[Message, str]] = []
    system = text_field(rec.get("system"), ctx, "system", required=False)
    if system:
        msgs.append((Message("system", system), "system"))
    for i, item in enumerate(turns):
        fld = f"conversations[{i}]"
        msgs.append((sharegpt_message(item, ctx, fld), fld))
    calls = {f"conversations[{i}]": "value" if "value" in t else "content" for i, t in enumerate(turns)
             if isinstance(t, dict) and str(t.get("from", t.get("role", ""))).lower() == "function_call"}
    tools = _tool_fields(rec, msgs, ctx, calls)
    meta = _meta(rec, {"conversations", "system", "chosen", "rejected", "tools"})
    if "chosen" in rec:  # preference record: the prompt ends with the user; keep the chosen reply
        chosen = rec["chosen"]
        m = sharegpt_message(chosen, ctx, "chosen") if isinstance(chosen, dict) else \
            Message("assistant", text_field(chosen, ctx, "chosen") or "")
        msgs.append((m, "chosen"))
    if "rejected" in rec:
        rej = rec["rejected"]
        meta["rejected"] = sharegpt_message(rej, ctx, "rejected").content if isinstance(rej, dict) \
            else text_field(rej, ctx, "rejected")
    conv = _conversation(msgs, ctx, "conversations", meta)
    conv.tools = tools
    return [conv]


def _tool_fields(rec: dict[str, Any], msgs: list[tuple[Message, str]], ctx: RecordContext,
                 calls: dict[str, str] | None = None) -> list[dict[str, Any]] | None:
    """A record's `tools` (OpenAI's list, LLaMA-Factory's JSON string) and its calls checked
    against them; ShareGPT `function_call` turns (`calls`: their fields -> text key) become structured calls."""
    tools = None
    try:
        if rec.get("tools") not in (None, "", []):
            tools = normalize_tools(rec["tools"])
        names = tool_names(tools) if tools is not None else None
        for m, fld in msgs:
            if calls and fld in calls:
                at = f"{fld}.{calls[fld]}"
                try:
                    raw = json.loads(m.content)
                except json.JSONDecodeError as e:
                    raise ToolError(f"a function_call turn holds JSON {{name, arguments}} (or a list of them); this is "
                                    f"not JSON ({e.msg} at character {e.pos})", at) from None
                m.tool_calls, m.content = normalize_calls(raw, at, names), ""
            elif m.tool_calls and names is not None:
                for j, c in enumerate(m.tool_calls):
                    if c["name"] not in names:
                        raise ToolError(f"calls '{c['name']}', which is not in tools (offered: {', '.join(names)})",
                                        f"{fld.removesuffix('.content')}.tool_calls[{j}].function.name")
    except ToolError as e:
        raise ctx.error(e.reason, e.field, hint="fix the call or the tool list, or pass --skip-bad to drop such "
                        "records") from None
    return tools


def _message_content(content: Any, ctx: RecordContext, fld: str, item: dict[str, Any]) -> str:
    if content is None and item.get("tool_calls"):
        return ""  # a tool call has no text; its calls are the message's tool_calls
    if isinstance(content, list):  # typed parts: [{type: "text", text|value: ...}, ...]
        texts = []
        for j, part in enumerate(content):
            pf = f"{fld}[{j}]"
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise ctx.error("must be a content part {type, text}", pf)
            if part.get("type", "text") != "text":
                raise ctx.error(f"only text parts are supported, got type {part.get('type')!r}", f"{pf}.type",
                                hint="remove image/audio parts, or pass --skip-bad to drop such records")
            key = "text" if "text" in part else "value"
            texts.append(text_field(part.get(key), ctx, f"{pf}.{key}") or "")
        return "".join(texts)
    return text_field(content, ctx, fld) or ""


def openai_messages(items: Any, ctx: RecordContext, list_field: str) -> list[tuple[Message, str]]:
    """OpenAI {role, content} messages as (Message, field name) pairs; errors name the field."""
    if not isinstance(items, list) or not items:
        raise ctx.error("must be a non-empty list of {role, content}", list_field)
    out = []
    for i, item in enumerate(items):
        fld = f"{list_field}[{i}]"
        if not isinstance(item, dict):
            raise ctx.error("must be an object {role, content}", fld)
        if "role" not in item:
            raise ctx.error("missing 'role'", f"{fld}.role")
        role = MESSAGE_ROLES.get(item["role"]) if isinstance(item["role"], str) else None
        if role is None:
            raise ctx.error(f"unknown role {item['role']!r}; allowed: {', '.join(MESSAGE_ROLES)}", f"{fld}.role")
        if "content" not in item and not item.get("tool_calls"):
            raise ctx.error("missing 'content'", f"{fld}.content")
        content = _message_content(item.get("content"), ctx, f"{fld}.content", item)
        m = Message(role, content, _train_flag(item, ctx, fld))
        if item.get("tool_calls"):
            try:
                m.tool_calls = normalize_calls(item["tool_calls"], f"{fld}.tool_calls")
            except ToolError as e:
                raise ctx.error(e.reason, e.field) from None
        if role == "tool" and isinstance(item.get("tool_call_id"), str):
            m.tool_call_id = item["tool_call_id"]
        out.append((m, f"{fld}.content"))
    return out


def _from_messages(record: Any, ctx: RecordContext, columns: dict[str, str]) -> list[Conversation]:
    rec = _require_dict(record, ctx)
    if "messages" in rec:
        msgs = openai_messages(rec["messages"], ctx, "messages")
        tools = _tool_fields(rec, msgs, ctx)
        meta = _meta(rec, {"messages", "tools"})  # e.g. KTO's `label` ends up here
        if "rejected" in meta and isinstance(meta["rejected"], list):
            meta["rejected"] = _last_content(openai_messages(meta["rejected"], ctx, "rejected"))
        conv = _conversation(msgs, ctx, "messages", meta)
        conv.tools = tools
        return [conv]
    if "chosen" not in rec:
        raise ctx.error("missing 'messages' (a list of {role, content})", "messages")
    # TRL conversational preference: prompt (list or string) + chosen/rejected message lists.
    prompt = rec.get("prompt") or []
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    msgs = openai_messages(prompt, ctx, "prompt") if prompt else []
    msgs += openai_messages(rec["chosen"], ctx, "chosen")
    meta = _meta(rec, {"prompt", "chosen", "rejected"})
    if "rejected" in rec:
        meta["rejected"] = _last_content(openai_messages(rec["rejected"], ctx, "rejected"))
    return [_conversation(msgs, ctx, "chosen", meta)]


def _last_content(msgs: list[tuple[Message, str]]) -> str:
    return msgs[-1][0].content


def hh_turns(transcript: str, ctx: RecordContext, fld: str) -> list[tuple[Message, str]]:
    """Split "\\n\\nHuman: ...\\n\\nAssistant: ..." into user/assistant messages."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise ctx.error("a transcript must start with 'Human:'", fld,
                        hint="hh-rlhf transcripts look like '\\n\\nHuman: ...\\n\\nAssistant: ...'")
    out = []
    for k, (speaker, text) in enumerate(zip(parts[1::2], parts[2::2], strict=True)):
        role = "user" if speaker == "Human" else "assistant"
        out.append((Message(role, text.strip()), f"{fld} (turn {k + 1}, {speaker})"))
    if not out:
        raise ctx.error("no 'Human:'/'Assistant:' turns found", fld)
    return out


def _from_hh(record: Any, ctx: RecordContext, columns: dict[str, str]) -> list[Conversation]:
    rec = _require_dict(record, ctx)
    fld = "chosen" if "chosen" in rec or "text" not in rec else "text"
    transcript = text_field(rec.get(fld), ctx, fld) or ""
    msgs = hh_turns(transcript, ctx, fld)
    meta = _meta(rec, {"chosen", "rejected", "text"})
    if "rejected" in rec:
        rejected = hh_turns(text_field(rec["rejected"], ctx, "rejected") or "", ctx, "rejected")
        meta["rejected"] = _last_content(rejected)
        if [m for m, _ in rejected[:-1]] != [m for m, _ in msgs[:-1]]:
            # Rare in hh-rlhf: the transcripts differ before the last reply; keep the whole thing.
            meta["rejected_messages"] = [m.to_dict() for m, _ in rejected]
    # hh-rlhf's labellers sometimes preferred no answer at all: "Assistant: " ends the chosen transcript.
    return [_conversation(msgs, ctx, fld, meta, allow_empty_last=True)]


def _from_text(record: Any, ctx: RecordContext, columns: dict[str, str]) -> list[Conversation]:
    if isinstance(record, str):
        text, meta = record, {}
    else:
        rec = _require_dict(record, ctx)
        key = columns.get("text", "text")
        text = text_field(rec.get(key), ctx, key) or ""
        meta = _meta(rec, {key})
    if not text.strip():
        raise ctx.error("text is empty", None if isinstance(record, str) else columns.get("text", "text"))
    return [Conversation([Message(TEXT_ROLE, text)], source=ctx.source, meta=meta)]


def _from_columns(record: Any, ctx: RecordContext, columns: dict[str, str]) -> list[Conversation]:
    if "text" in columns:
        return _from_text(record, ctx, columns)
    rec = _require_dict(record, ctx)
    prompt = text_field(rec.get(columns["prompt"]), ctx, columns["prompt"]) or ""
    response = text_field(rec.get(columns["response"]), ctx, columns["response"]) or ""
    if not prompt.strip():
        raise ctx.error("prompt is empty", columns["prompt"])
    msgs = []
    if "system" in columns:
        system = text_field(rec.get(columns["system"]), ctx, columns["system"], required=False)
        if system:
            msgs.append((Message("system", system), columns["system"]))
    msgs += [(Message("user", prompt), columns["prompt"]), (Message("assistant", response), columns["response"])]
    return [_conversation(msgs, ctx, columns["response"], _meta(rec, set(columns.values())))]


_CONVERTERS = {
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
    "messages": _from_messages,
    "hh": _from_hh,
    "text": _from_text,
    "columns": _from_columns,
}



__all__ = ["FORMATS", "ReadResult", "read_conversations", "hh_turns", "openai_messages",
           "sharegpt_message", "text_field", "MESSAGE_ROLES", "SHAREGPT_ROLES"]
