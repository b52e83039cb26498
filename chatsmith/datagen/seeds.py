"""Seed tasks for self-instruct and seed questions for self-chat, read from the files people have:

- self-instruct seed tasks as published: ``{id, name, instruction, instances: [{input, output}],
  is_classification}`` (JSONL);
- Alpaca records ``{instruction, input, output}`` (JSON list or JSONL);
- a plain list of instructions: a ``.txt`` file with one per line, or a JSON list of strings;
- for self-chat also ShareGPT/messages records (the first user turn) and ``{question}`` /
  ``{prompt}`` records.

A bad record names the file and the line (or record) and what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatsmith.data.sources import RecordContext, read_records
from chatsmith.errors import ChatsmithError, DataError

SEED_HELP = ("self-instruct seed tasks {id, name, instruction, instances: [{input, output}], is_classification}, "
             "Alpaca records {instruction, input, output}, a JSON list of strings, or a .txt file with one "
             "instruction per line")


@dataclass
class SeedTask:
    """One seed: its instruction and example instances ({input, output}, possibly none)."""

    instruction: str
    instances: list[dict[str, str]] = field(default_factory=list)
    id: str = ""
    is_classification: bool = False
    source: str = ""


def read_seeds(path: str) -> list[SeedTask]:
    """Every seed in `path` (see the module docstring); errors name the file and line/record."""
    p = Path(path)
    if not p.is_file():
        raise ChatsmithError(f"seed file not found: {path} (expected {SEED_HELP})")
    if p.suffix.lower() == ".txt":
        seeds = []
        for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if line.strip():
                seeds.append(SeedTask(line.strip(), id=f"line {n}", source=f"{path}, line {n}"))
        if not seeds:
            raise ChatsmithError(f"{path}: no seed instructions in it (one instruction per line)")
        return seeds
    seeds = []
    for where, rec in read_records(path):
        ctx = RecordContext(path, where)
        if isinstance(rec, DataError):
            raise rec
        seeds.append(_seed(rec, ctx))
    if not seeds:
        raise ChatsmithError(f"{path}: no seed tasks in it (expected {SEED_HELP})")
    return seeds


def _text(rec: dict[str, Any], key: str, ctx: RecordContext, required: bool = False) -> str:
    value = rec.get(key)
    if value is None:
        if required:
            raise ctx.error(f"missing '{key}'", key, hint=f"seed formats: {SEED_HELP}")
        return ""
    if not isinstance(value, str):
        raise ctx.error(f"must be a string, got {type(value).__name__}", key, hint=f"seed formats: {SEED_HELP}")
    return value.strip()


def _seed(rec: Any, ctx: RecordContext) -> SeedTask:
    if isinstance(rec, str):
        if not rec.strip():
            raise ctx.error("an empty instruction", hint=None)
        return SeedTask(rec.strip(), id=ctx.where, source=ctx.source)
    if not isinstance(rec, dict):
        raise ctx.error(f"expected an object or a string, found {type(rec).__name__}", hint=f"seed formats: {SEED_HELP}")
    if "instruction" not in rec:
        first = _first_user_turn(rec, ctx)
        if first is None:
            raise ctx.error("missing 'instruction'", "instruction", hint=f"seed formats: {SEED_HELP}")
        return SeedTask(first, id=str(rec.get("id", ctx.where)), source=ctx.source)
    instruction = _text(rec, "instruction", ctx, required=True)
    if not instruction:
        raise ctx.error("an empty instruction", "instruction", hint=None)
    instances: list[dict[str, str]] = []
    if "instances" in rec:
        raw = rec["instances"]
        if not isinstance(raw, list):
            raise ctx.error("must be a list of {input, output}", "instances", hint=None)
        for i, inst in enumerate(raw):
            if not isinstance(inst, dict) or not isinstance(inst.get("output", ""), str) \
                    or not isinstance(inst.get("input", ""), str):
                raise ctx.error("must be an object {input, output} of strings", f"instances[{i}]", hint=None)
            instances.append({"input": inst.get("input", "").strip(), "output": inst.get("output", "").strip()})
    elif "output" in rec:
        instances.append({"input": _text(rec, "input", ctx), "output": _text(rec, "output", ctx)})
    return SeedTask(instruction, instances, id=str(rec.get("id", ctx.where)),
                    is_classification=bool(rec.get("is_classification", False)), source=ctx.source)


def _first_user_turn(rec: dict[str, Any], ctx: RecordContext) -> str | None:
    for key in ("question", "prompt", "query"):
        if isinstance(rec.get(key), str) and rec[key].strip():
            return rec[key].strip()
    for key, who, text in (("conversations", "from", "value"), ("messages", "role", "content")):
        turns = rec.get(key)
        if isinstance(turns, list):
            for t in turns:
                if isinstance(t, dict) and str(t.get(who, "")).lower() in ("human", "user") \
                        and isinstance(t.get(text), str) and t[text].strip():
                    return t[text].strip()
            raise ctx.error("has no user turn with text", key, hint=None)
    return None
