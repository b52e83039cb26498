"""Task accuracy: prompts with references, answered through the one engine and scored by a match rule.

A task set is a list of items (prompt messages, reference(s), match rule, category). It comes from
a file in any record format chatsmith reads (JSON, JSONL, CSV, Parquet) or a built-in set:

- a record's prompt: `prompt` (a string or a list of {role, content}), else `question`, else
  `instruction` (+ `input`); other columns map with `columns={"prompt": "COLUMN"}`;
- its reference: `answer`, `reference`, `references` or `output`, a string or a list (any of them
  counts as right);
- optional `category` (default: the set's name) and `match` (default: the set's rule).

Match rules (`MATCHES`): exact (stripped strings equal), normalised (lower case, punctuation and the
articles a/an/the removed, whitespace collapsed: SQuAD's normalisation), numeric (the last number in
the answer equals the reference's), regex (the reference is a pattern searched in the answer) and
contains (the normalised reference occurs in the normalised answer as whole words).

Built-in sets (`builtin:NAME`): identity (the held-out name/maker questions of the quickstart, and
general questions the tuned model must still answer) and arithmetic (the held-out single-digit word
problems that GRPO trains on; few-shot examples come from the training split).

Few-shot examples are earlier user/assistant turns of the same conversation, rendered by the one
template renderer, so a chat model sees them the way it sees any conversation.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatsmith.data.conversation import Message
from chatsmith.data.sources import RecordContext, convert_records, read_records
from chatsmith.errors import ConfigError
from chatsmith.eval.stats import wilson_interval

MATCHES = ("exact", "normalised", "numeric", "regex", "contains")
BUILTIN_SETS = ("identity", "arithmetic")
_PROMPT_FIELDS = ("prompt", "question", "instruction")
_REFERENCE_FIELDS = ("answer", "reference", "references", "output")


@dataclass
class TaskItem:
    """One question: the messages before the answer, what counts as right, and its category.
    `check`, when set, replaces the match rule (built-in sets with richer checks use it)."""

    messages: list[Message]
    references: list[str]
    match: str = "normalised"
    category: str = "all"
    check: Callable[[str], bool] | None = None
    source: str = ""

    @property
    def question(self) -> str:
        """The last user message."""
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")


@dataclass
class TaskSet:
    """A named list of items, and the (question, answer) pairs used as few-shot examples."""

    name: str
    items: list[TaskItem]
    shots: list[tuple[str, str]] = field(default_factory=list)


# ---- match rules ---------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


def normalise(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD's normalisation)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def matches(answer: str, reference: str, rule: str) -> bool:
    """Whether `answer` is right against one `reference` under `rule` (one of MATCHES)."""
    if rule == "exact":
        return answer.strip() == reference.strip()
    if rule == "normalised":
        return normalise(answer) == normalise(reference)
    if rule == "numeric":
        got, want = last_number(answer), last_number(reference)
        return got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))
    if rule == "regex":
        return re.search(reference, answer) is not None
    if rule == "contains":
        ref = normalise(reference)
        return bool(ref) and re.search(r"(?<!\w)" + re.escape(ref) + r"(?!\w)", normalise(answer)) is not None
    raise ConfigError(f"unknown match rule '{rule}'; choose one of {', '.join(MATCHES)}")


def is_correct(item: TaskItem, answer: str) -> bool:
    """Whether `answer` is right for `item` (its own check, else any reference under its rule)."""
    if item.check is not None:
        return bool(item.check(answer))
    return any(matches(answer, ref, item.match) for ref in item.references)


# ---- reading task sets ---------------------------------------------------------------------------

def _record_item(rec: Any, ctx: RecordContext, match: str, category: str,
                 columns: dict[str, str]) -> list[TaskItem]:
    if not isinstance(rec, dict):
        raise ctx.error(f"must be an object with a prompt and a reference, got {type(rec).__name__}", hint=None)
    rec = {**rec, **{k: rec[v] for k, v in columns.items() if v in rec}}
    messages: list[Message] | None = None
    p = rec.get("prompt")
    if isinstance(p, list) and p and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
        messages = [Message(str(m["role"]), str(m["content"])) for m in p]
    else:
        text = next((rec[k] for k in _PROMPT_FIELDS if isinstance(rec.get(k), str) and rec[k].strip()), None)
        if text is not None and text is rec.get("instruction") and isinstance(rec.get("input"), str) and rec["input"].strip():
            text = f"{text}\n\n{rec['input']}"
        if text is not None:
            messages = [Message("user", text)]
    if messages is None:
        raise ctx.error(f"needs a prompt: one of {', '.join(_PROMPT_FIELDS)} (a non-empty string; 'prompt' may "
                        "also be a list of {role, content})", "prompt",
                        hint="map another column with --columns prompt=COLUMN")
    ref_field = next((k for k in _REFERENCE_FIELDS if k in rec), None)
    if ref_field is None:
        raise ctx.error(f"needs a reference answer: one of {', '.join(_REFERENCE_FIELDS)}", "answer",
                        hint="map another column with --columns answer=COLUMN")
    raw = rec[ref_field]
    refs = [str(r) for r in raw] if isinstance(raw, list) else [str(raw)]
    if not refs or not all(r.strip() for r in refs):
        raise ctx.error("the reference is empty", ref_field, hint=None)
    rule = str(rec.get("match", match))
    if rule not in MATCHES:
        raise ctx.error(f"unknown match rule '{rule}'; choose one of {', '.join(MATCHES)}", "match", hint=None)
    if rule == "regex":
        for r in refs:
            try:
                re.compile(r)
            except re.error as e:
                raise ctx.error(f"the reference is not a valid regular expression ({e})", ref_field, hint=None) from None
    return [TaskItem(messages, refs, rule, str(rec.get("category") or category), source=ctx.source)]


def read_task_file(path: str, *, match: str = "normalised", columns: dict[str, str] | None = None,
                   limit: int | None = None) -> TaskSet:
    """A task set from a file of records (see the module docstring)."""
    if match not in MATCHES:
        raise ConfigError(f"--match {match}: choose one of {', '.join(MATCHES)}")
    name = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    cols = dict(columns or {})
    items, _ = convert_records(path, read_records(path), lambda r, ctx: _record_item(r, ctx, match, name, cols),
                               skip_bad=False)
    if limit is not None:
        items = items[:limit]
    return TaskSet(name, items)


def builtin_task_set(name: str, *, assistant_name: str | None = None, maker: str | None = None,
                     limit: int | None = None) -> TaskSet:
    """A built-in set (BUILTIN_SETS); identity takes the assistant's name and maker."""
    if name == "identity":
        from chatsmith.data.builtin import DEFAULT_MAKER, DEFAULT_NAME
        from chatsmith.eval.identity import general_heldout_checks, identity_heldout_checks

        a_name, a_maker = assistant_name or DEFAULT_NAME, maker or DEFAULT_MAKER
        items = []
        for q, check in identity_heldout_checks(a_name, a_maker):
            kind = "name" if check.__name__ == "says_name" else "maker"
            items.append(TaskItem([Message("user", q)], [a_name if kind == "name" else a_maker], "contains",
                                  f"identity-{kind}", check, "builtin:identity"))
        for q, check in general_heldout_checks():
            items.append(TaskItem([Message("user", q)], [], "contains", "general", check, "builtin:identity"))
        return TaskSet("identity", items[:limit] if limit else items)
    if name == "arithmetic":
        from chatsmith.data.tasks import task_splits

        train, test = task_splits("arithmetic")
        items = [TaskItem([Message("user", r["prompt"])], [r["answer"]], "numeric",
                          "word problem" if r["prompt"].split()[0] != "What" else "bare sum", source="builtin:arithmetic")
                 for r in test]
        shots = [(r["prompt"], r["answer"]) for r in train[:8]]
        return TaskSet("arithmetic", items[:limit] if limit else items, shots)
    raise ConfigError(f"unknown built-in task set 'builtin:{name}'; choose builtin:{' or builtin:'.join(BUILTIN_SETS)}")


def load_task_sets(spec: str, *, match: str = "normalised", columns: dict[str, str] | None = None,
                   limit: int | None = None) -> list[TaskSet]:
    """The task sets of a comma-separated SPEC: each `builtin:NAME` or a file path."""
    sets = []
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        if part.startswith("builtin:"):
            sets.append(builtin_task_set(part.split(":", 1)[1], limit=limit))
        else:
            sets.append(read_task_file(part, match=match, columns=columns, limit=limit))
    if not sets:
        raise ConfigError(f"no task set in '{spec}': give builtin:NAME ({', '.join(BUILTIN_SETS)}) or a file")
    return sets


# ---- running ---------------------------------------------------------------------------------

def item_messages(item: TaskItem, shots: Sequence[tuple[str, str]], system: str | None = None) -> list[Message]:
    """The conversation the model answers: system prompt, few-shot turns, then the item's messages."""
    msgs = [Message("system", system)] if system else []
    for q, a in shots:
        msgs += [Message("user", q), Message("assistant", a)]
    return msgs + item.messages


def _shots_for(task: TaskSet, i: int, k: int) -> list[tuple[str, str]]:
    """k few-shot (question, answer) pairs: the set's own, else the k items before item i (cyclic)."""
    if k <= 0:
        return []
    if task.shots:
        return task.shots[:k]
    n = len(task.items)
    out: list[tuple[str, str]] = []
    for j in range(1, n):
        cand = task.items[(i - j) % n]
        if cand.references and len(cand.messages) == 1:
            out.append((cand.question, cand.references[0]))
        if len(out) == k:
            break
    return out


def run_task_sets(engine: Any, sets: Sequence[TaskSet], *, template: str | None = None, shots: int = 0,
                  system: str | None = None, max_new_tokens: int = 64) -> list[dict[str, Any]]:
    """Greedy answers to every item of every set, in one batch through `engine`; one result row per
    item: {set, category, question, references, answer, correct}."""
    from chatsmith.eval.answers import answer_conversations

    convs, rows = [], []
    for task in sets:
        for i, item in enumerate(task.items):
            convs.append(item_messages(item, _shots_for(task, i, shots), system))
            rows.append({"set": task.name, "category": item.category, "question": item.question,
                         "references": item.references, "item": item})
    comps = answer_conversations(engine, convs, template=template, max_new_tokens=max_new_tokens)
    for row, comp in zip(rows, comps):
        item = row.pop("item")
        row["answer"] = comp.text.strip()
        row["correct"] = is_correct(item, row["answer"])
    return rows


def accuracy_table(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Accuracy with its Wilson interval per set, per set/category and over all rows:
    {"arithmetic": {...}, "arithmetic/bare sum": {...}, "all": {...}}, each {value, low, high, n, correct}."""
    groups: dict[str, list[bool]] = {}
    for r in rows:
        keys = [r["set"], "all"] if r["category"] == r["set"] else [r["set"], f"{r['set']}/{r['category']}", "all"]
        for key in keys:   # a set without categories has one key, not "set/set"
            groups.setdefault(key, []).append(bool(r["correct"]))
    out = {}
    for key, vals in groups.items():
        est = wilson_interval(sum(vals), len(vals))
        out[key] = {**est.as_dict(), "correct": sum(vals)}
    return out


def evaluate_suite(model: Any, tokenizer: Any, spec: str, *, template: str | None = None,
                   max_new_tokens: int = 64) -> dict[str, float]:
    """Run the task sets of `spec` (load_task_sets) on a model and return flat metrics for a
    training run's log: {"suite/SET/accuracy": ..., "suite/SET/CATEGORY/accuracy": ...}."""
    from chatsmith.infer.engine import Engine

    sets = load_task_sets(spec)
    engine = Engine(model, tokenizer, max_batch_size=16, kv_cache_mb=512)   # the model in training: no reload
    rows = run_task_sets(engine, sets, template=template, max_new_tokens=max_new_tokens)
    return {f"suite/{k}/accuracy": v["value"] for k, v in accuracy_table(rows).items() if k != "all"}
