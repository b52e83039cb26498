"""Prompts for online RL and evaluation: records with a 'prompt' (and whatever fields the rewards
need), read from any file chatsmith reads or a built-in task, rendered by the one template renderer
to token ids that end with the assistant header."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.mixing import split_eval
from chatsmith.data.sources import RecordContext, read_records
from chatsmith.data.spec import parse_data_spec
from chatsmith.data.template import render_conversation
from chatsmith.errors import ChatsmithError, DataError


@dataclass
class Prompt:
    """A rendered prompt: token ids (ending with the assistant header), its last user text, its record."""

    ids: list[int]
    text: str
    record: dict[str, Any]


def prompt_messages(record: dict[str, Any], ctx: RecordContext) -> list[dict[str, str]]:
    """The record's 'prompt' as chat messages: a string is one user message."""
    p = record.get("prompt")
    if isinstance(p, str) and p.strip():
        return [{"role": "user", "content": p}]
    if isinstance(p, list) and p and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in p]
    raise ctx.error("needs a 'prompt': a non-empty string or a list of {role, content} messages", "prompt",
                    hint="map another column with --columns prompt=COLUMN")


def _context_of(record: dict[str, Any], i: int) -> RecordContext:
    path, _, where = str(record.get("_source", f"prompts, record {i}")).rpartition(", ")
    return RecordContext(path or "prompts", where)


def render_prompts(tokenizer: Any, records: Sequence[dict[str, Any]], *, template: str | None,
                   system_prompt: str | None, max_prompt_tokens: int) -> tuple[list[Prompt], int]:
    """Records -> prompts ending with the assistant header, via the one template renderer.
    Returns (prompts, number dropped for exceeding max_prompt_tokens)."""
    out, dropped = [], 0
    for i, rec in enumerate(records):
        msgs = prompt_messages(rec, _context_of(rec, i))
        conv = Conversation([Message(m["role"], m["content"]) for m in msgs])
        r = render_conversation(tokenizer, conv, template=template, add_generation_prompt=True,
                                system_prompt=system_prompt)
        if len(r.input_ids) > max_prompt_tokens:
            dropped += 1
            continue
        out.append(Prompt(r.input_ids, msgs[-1]["content"], rec))
    return out, dropped


def render_prompt_splits(cfg: Any, tokenizer: Any, train_records: Sequence[dict[str, Any]],
                         held_records: Sequence[dict[str, Any]]) -> tuple[list[Prompt], list[Prompt], int, int]:
    """(training prompts, held-out prompts, training prompts dropped, the prompt token limit): a
    prompt must leave --max-new-tokens of room within --max-length."""
    limit = cfg.max_length - cfg.max_new_tokens
    prompts, dropped = render_prompts(tokenizer, train_records, template=cfg.template, system_prompt=cfg.system_prompt,
                                      max_prompt_tokens=limit)
    held, _ = render_prompts(tokenizer, held_records, template=cfg.template, system_prompt=cfg.system_prompt,
                             max_prompt_tokens=limit)
    if not prompts:
        raise ChatsmithError(f"no prompt fits in --max-length {cfg.max_length} minus --max-new-tokens {cfg.max_new_tokens}")
    return prompts, held, dropped, limit


def read_prompt_file(path: str, columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Prompt records from any file chatsmith reads (JSON, JSONL, CSV/TSV, Parquet, a hub dataset):
    each needs a 'prompt' (a string or a list of {role, content}); its other fields reach the rewards.
    `columns` renames fields: {"prompt": "question"} reads the prompt from a 'question' column."""
    out = []
    for where, rec in read_records(path):
        ctx = RecordContext(path, where)
        if isinstance(rec, DataError):
            raise rec
        if not isinstance(rec, dict):
            raise ctx.error("expected an object with a 'prompt' field", hint=None)
        rec = dict(rec)
        for want, have in (columns or {}).items():
            if have in rec:
                rec[want] = rec.pop(have)
        if "prompt" not in rec:
            raise ctx.error(f"has no 'prompt' field (its fields: {', '.join(map(str, rec))})", "prompt",
                            hint="map another column with --columns prompt=COLUMN")
        rec["_source"] = ctx.source
        prompt_messages(rec, ctx)
        out.append(rec)
    if not out:
        raise ChatsmithError(f"{path}: no prompt records found (the file is empty)")
    return out


def load_prompt_records(cfg: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, held-out records) from --data: builtin:TASK (its own held-out split) or
    prompt files (held out with --eval-split)."""
    from chatsmith.data.tasks import parse_task_spec, task_records

    if not cfg.data:
        raise ChatsmithError("no prompts: pass --data builtin:arithmetic (or builtin:format) or a file (JSON, JSONL, CSV, "
                             "Parquet) of records with a 'prompt' field")
    train: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    for spec in cfg.data:
        task = parse_task_spec(spec)
        if task:
            train += task_records(task, "train", seed=cfg.seed)
            held += task_records(task, "test", n=cfg.eval_prompts or None, seed=0)
        else:
            files += read_prompt_file(parse_data_spec(spec).path, cfg.columns or None)
    if files:
        tr, ev = split_eval(files, cfg.eval_split, cfg.seed)
        train += tr
        held += ev[: cfg.eval_prompts] if cfg.eval_prompts else ev
    return train, held
