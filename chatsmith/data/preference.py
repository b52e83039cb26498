"""Preference data -> typed records for `chatsmith rm` and `chatsmith dpo`.

Three kinds of record:

- ``Ranking``: a prompt and K >= 2 answers ordered best first, with a score per answer (a pair is a
  ranking of two). Read from
  ``{prompt|messages|conversations, chosen, rejected}`` where ``prompt`` is a string or a list of
  messages and ``chosen``/``rejected`` a string, one message or a list of messages (TRL, OpenAI and
  ShareGPT styles); Alpaca pairs ``{instruction, input, chosen, rejected}``; hh-rlhf transcripts
  ``{chosen, rejected}`` whose shared prefix is the prompt; and rankings
  ``{prompt, responses: [...], ranking: [best..worst] | "B>A>D>C"}`` or ``{prompt, responses, scores}``.
- ``Feedback``: one prompt and one answer marked desirable or not (KTO): ``{messages, label}`` (the
  last assistant turn is the answer) or ``{prompt, completion, label}``. Pairs can be unpaired into
  feedback (chosen -> desirable, rejected -> undesirable).

Every record is validated: an empty answer, chosen == rejected, or a ranking that is not a
permutation of its answers raises `DataError` naming the file, the record and the field.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Any

from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.formats import MESSAGE_ROLES, hh_turns, openai_messages, sharegpt_message, text_field
from chatsmith.data.sources import RecordContext, convert_records, read_records
from chatsmith.data.template import Rendered, render_conversation
from chatsmith.errors import ChatsmithError, DataError

PREFERENCE_HELP = (
    "pairs {prompt|messages|conversations, chosen, rejected} (chosen/rejected: a string, one message or a "
    "list of messages), hh-rlhf {chosen, rejected} transcripts, Alpaca {instruction, input, chosen, rejected}, "
    "rankings {prompt, responses, ranking|scores}"
)


@dataclass
class Ranking:
    """A prompt and K >= 2 answers ordered best first. `scores[k]` is answer k's score (higher is
    better); answers with equal scores form no pair. A pair has scores [1, 0]."""

    prompt: list[Message]
    responses: list[list[Message]]
    scores: list[float]
    source: str = ""
    margin: float | None = None   # a pair's own Bradley-Terry margin (e.g. Llama 2's rating gap)

    def pairs(self) -> list[tuple[int, int]]:
        """(better, worse) index pairs: all C(K,2) pairs whose scores differ."""
        k = len(self.responses)
        return [(i, j) for i in range(k) for j in range(i + 1, k) if self.scores[i] > self.scores[j]]

    def conversation(self, k: int) -> Conversation:
        """Prompt + answer k; only the answer's assistant turns are trained (masked in)."""
        return Conversation(_context(self.prompt) + self.responses[k], source=self.source)


@dataclass
class Feedback:
    """One answer with a desirable/undesirable label (KTO)."""

    prompt: list[Message]
    response: list[Message]
    desirable: bool
    source: str = ""

    def conversation(self) -> Conversation:
        """Prompt + the answer, with only the answer trained."""
        return Conversation(_context(self.prompt) + self.response, source=self.source)


@dataclass
class PreferenceData:
    """The records read from one preference file and those skipped with --skip-bad."""
    records: list[Any]
    skipped: list[DataError] = field(default_factory=list)
    path: str = ""


def _context(prompt: list[Message]) -> list[Message]:
    # Earlier assistant turns of a multi-turn prompt are context, never trained.
    return [Message(m.role, m.content, False) if m.role == "assistant" else m for m in prompt]


# ---- reading ----------------------------------------------------------------------------------

def read_preferences(path: str, skip_bad: bool = False) -> PreferenceData:
    """Pairs and rankings from a file (JSON, JSONL, CSV, Parquet or a hub dataset)."""
    return _read(path, _ranking, skip_bad)


def read_feedback(path: str, skip_bad: bool = False) -> PreferenceData:
    """KTO feedback: {messages, label} / {prompt, completion, label} records, or pairs unpaired."""
    return _read(path, _feedback, skip_bad)


BUILTIN_PREFIX = "builtin:"
BUILTIN_SETS = ("identity-preferences",)


def _builtin(path: str) -> Any:
    from chatsmith.data.builtin import preference_demo_records

    name = path[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_SETS:
        raise ChatsmithError(f"unknown built-in data set '{name}'; built-in preference sets: "
                             + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_SETS))
    return ((f"record {i}", r) for i, r in enumerate(preference_demo_records()))


def _read(path: str, convert: Any, skip_bad: bool) -> PreferenceData:
    source = _builtin(path) if str(path).startswith(BUILTIN_PREFIX) else read_records(str(path))

    def records_of(record: Any, ctx: RecordContext) -> list[Any]:
        if not isinstance(record, dict):
            raise ctx.error(f"expected a JSON object, found a {type(record).__name__}")
        return convert(record, ctx)

    out, skipped = convert_records(str(path), source, records_of, skip_bad)
    return PreferenceData(out, skipped, str(path))


def _prompt(rec: dict[str, Any], ctx: RecordContext) -> list[Message]:
    """The prompt of a record: `prompt` (string or messages), `messages`, `conversations` (ShareGPT)
    or Alpaca `instruction`/`input`, plus an optional top-level `system`."""
    msgs: list[Message] = []
    system = text_field(rec.get("system"), ctx, "system", required=False)
    if system:
        msgs.append(Message("system", system))
    if "prompt" in rec:
        p = rec["prompt"]
        if isinstance(p, list):
            msgs += [m for m, _ in openai_messages(p, ctx, "prompt")]
        else:
            text = text_field(p, ctx, "prompt") or ""
            if not text.strip():
                raise ctx.error("prompt is empty", "prompt")
            msgs.append(Message("user", text))
    elif "messages" in rec:
        msgs += [m for m, _ in openai_messages(rec["messages"], ctx, "messages")]
    elif "conversations" in rec:
        turns = rec["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ctx.error("must be a non-empty list of {from, value}", "conversations")
        msgs += [sharegpt_message(t, ctx, f"conversations[{i}]") for i, t in enumerate(turns)]
    elif "instruction" in rec:
        ins = text_field(rec.get("instruction"), ctx, "instruction") or ""
        inp = text_field(rec.get("input"), ctx, "input", required=False) or ""
        text = f"{ins}\n\n{inp}" if ins and inp else ins or inp
        if not text.strip():
            raise ctx.error("'instruction' and 'input' are both empty", "instruction")
        msgs.append(Message("user", text))
    else:
        raise ctx.error(f"no prompt: expected one of 'prompt', 'messages', 'conversations', 'instruction' "
                        f"(its fields: {', '.join(map(str, rec))})", hint=f"preference formats: {PREFERENCE_HELP}")
    if not any(m.role == "user" for m in msgs):
        raise ctx.error("the prompt has no user turn", "prompt")
    return msgs


def _answer(value: Any, ctx: RecordContext, fld: str) -> list[Message]:
    """An answer: a string, one message ({role, content} or {from, value}) or a list of messages."""
    if isinstance(value, list):
        msgs = [m for m, _ in openai_messages(value, ctx, fld)] if all(
            isinstance(v, dict) and "role" in v for v in value) else \
            [sharegpt_message(v, ctx, f"{fld}[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, dict):
        if "role" in value and value.get("role") in MESSAGE_ROLES:
            msgs = [m for m, _ in openai_messages([value], ctx, fld)]
        else:
            msgs = [sharegpt_message(value, ctx, fld)]
    else:
        msgs = [Message("assistant", text_field(value, ctx, fld) or "")]
    if not msgs or msgs[-1].role != "assistant":
        raise ctx.error("an answer must end with an assistant message", fld)
    if any(m.role == "assistant" and not m.content.strip() for m in msgs):
        raise ctx.error("answer is empty", fld, hint="write the answer, or pass --skip-bad to drop such records")
    return msgs


def _same(a: list[Message], b: list[Message]) -> bool:
    return [(m.role, m.content.strip()) for m in a] == [(m.role, m.content.strip()) for m in b]


def _ranking(rec: dict[str, Any], ctx: RecordContext) -> list[Ranking]:
    if "responses" in rec:
        return [_ranked(rec, ctx)]
    if "chosen" not in rec or "rejected" not in rec:
        missing = "chosen" if "chosen" not in rec else "rejected"
        raise ctx.error(f"missing '{missing}'", missing, hint=f"preference formats: {PREFERENCE_HELP}")
    has_prompt = any(k in rec for k in ("prompt", "messages", "conversations", "instruction"))
    if not has_prompt and isinstance(rec["chosen"], str) and isinstance(rec["rejected"], str):
        prompt, chosen, rejected = _hh_pair(rec, ctx)
    elif not has_prompt and isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list):
        # Implicit prompt: two whole conversations; the prompt is their shared prefix.
        full_c = _answer(rec["chosen"], ctx, "chosen")
        full_r = _answer(rec["rejected"], ctx, "rejected")
        prompt, chosen, rejected = _shared_prefix(full_c, full_r, ctx)
    else:
        prompt = _prompt(rec, ctx)
        chosen = _answer(rec["chosen"], ctx, "chosen")
        rejected = _answer(rec["rejected"], ctx, "rejected")
    if _same(chosen, rejected):
        raise ctx.error("chosen and rejected are the same answer, so there is nothing to prefer", "rejected")
    margin = rec.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise ctx.error(f"must be a number, got {margin!r}", "margin")
    return [Ranking(prompt, [chosen, rejected], [1.0, 0.0], ctx.source,
                    float(margin) if margin is not None else None)]


def _hh_pair(rec: dict[str, Any], ctx: RecordContext) -> tuple[list[Message], list[Message], list[Message]]:
    c = [m for m, _ in hh_turns(text_field(rec["chosen"], ctx, "chosen") or "", ctx, "chosen")]
    r = [m for m, _ in hh_turns(text_field(rec["rejected"], ctx, "rejected") or "", ctx, "rejected")]
    # hh-rlhf's labellers sometimes preferred no answer at all ("Assistant: " ends the transcript).
    return _shared_prefix(c, r, ctx, allow_empty_last=True)


def _shared_prefix(c: list[Message], r: list[Message], ctx: RecordContext,
                   allow_empty_last: bool = False) -> tuple[list[Message], list[Message], list[Message]]:
    """Split two transcripts into their shared prompt and the differing answers (from the first
    assistant turn at which they differ to the end). `allow_empty_last`: an answer's final reply may
    be empty (it then trains the end-of-turn token alone)."""
    n = 0
    while n < min(len(c), len(r)) and (c[n].role, c[n].content) == (r[n].role, r[n].content):
        n += 1
    while n > 0 and c[n - 1].role == "assistant" and (n >= len(c) or c[n].role == "assistant"):
        n -= 1   # an answer starts at an assistant turn: back up over shared assistant text
    if n == len(c) or n == len(r):
        raise ctx.error("chosen and rejected transcripts are identical or one is a prefix of the other",
                        "rejected")
    if c[n].role != "assistant" or r[n].role != "assistant":
        raise ctx.error("chosen and rejected differ before their last assistant turn (they must share the "
                        "conversation up to the answer)", "rejected")
    prompt, chosen, rejected = c[:n], c[n:], r[n:]
    if not any(m.role == "user" for m in prompt):
        raise ctx.error("the shared prompt has no user turn", "chosen")
    for fld, ans in (("chosen", chosen), ("rejected", rejected)):
        if ans[-1].role != "assistant":
            raise ctx.error("an answer must end with an assistant turn", fld)
        checked = ans[:-1] if allow_empty_last else ans
        if any(m.role == "assistant" and not m.content.strip() for m in checked):
            raise ctx.error("answer is empty", fld, hint="write the answer, or pass --skip-bad to drop such records")
    return prompt, chosen, rejected


def _ranked(rec: dict[str, Any], ctx: RecordContext) -> Ranking:
    prompt = _prompt(rec, ctx)
    raw = rec["responses"]
    if not isinstance(raw, list) or len(raw) < 2:
        raise ctx.error("must be a list of at least two answers", "responses")
    answers = [_answer(a, ctx, f"responses[{i}]") for i, a in enumerate(raw)]
    k = len(answers)
    for i in range(k):
        for j in range(i + 1, k):
            if _same(answers[i], answers[j]):
                raise ctx.error(f"responses[{i}] and responses[{j}] are the same answer", f"responses[{j}]")
    if "ranking" in rec:
        order = _ranking_order(rec["ranking"], k, ctx)
        scores = [float(k - 1 - order.index(i)) for i in range(k)]
    elif "scores" in rec:
        scores = rec["scores"]
        if not isinstance(scores, list) or len(scores) != k:
            raise ctx.error(f"must be a list of {k} numbers, one per response (got "
                            f"{len(scores) if isinstance(scores, list) else type(scores).__name__})", "scores")
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ctx.error(f"must be a finite number, got {s!r}", f"scores[{i}]")
        if len(set(scores)) == 1:
            raise ctx.error("all scores are equal, so no answer is preferred", "scores")
        order = sorted(range(k), key=lambda i: -scores[i])
        scores = [float(s) for s in scores]
    else:
        raise ctx.error("a ranking record needs 'ranking' (best..worst) or 'scores'", "ranking")
    return Ranking(prompt, [answers[i] for i in order], [scores[i] for i in order], ctx.source)


def _ranking_order(value: Any, k: int, ctx: RecordContext) -> list[int]:
    """`ranking`: indices best..worst ([1, 0, 3, 2]) or letters ("B>A>D>C" or ["B", "A", "D", "C"])."""
    letters = string.ascii_uppercase[:k]
    if isinstance(value, str):
        value = [v.strip() for v in value.replace(",", ">").split(">")]
    if not isinstance(value, list):
        raise ctx.error(f"must be a list of response indices best..worst or a string like 'B>A>D>C', got {value!r}",
                        "ranking")
    order = []
    for v in value:
        if isinstance(v, str) and v.upper() in letters and len(v) == 1:
            order.append(letters.index(v.upper()))
        elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < k:
            order.append(v)
        else:
            raise ctx.error(f"{v!r} names no response: there are {k} responses (indices 0..{k - 1} or letters "
                            f"{letters[0]}..{letters[-1]})", "ranking")
    if sorted(order) != list(range(k)):
        raise ctx.error(f"must rank each of the {k} responses exactly once, got {value!r}", "ranking")
    return order


def _label(value: Any, ctx: RecordContext) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ctx.error(f"must be true or false, got {value!r}", "label")


def _feedback(rec: dict[str, Any], ctx: RecordContext) -> list[Feedback]:
    if "label" not in rec:
        if "chosen" in rec and "rejected" in rec:   # a pair: unpair it (TRL's unpair_preference_dataset)
            r = _ranking(rec, ctx)[0]
            return [Feedback(r.prompt, r.responses[0], True, ctx.source),
                    Feedback(r.prompt, r.responses[1], False, ctx.source)]
        raise ctx.error("missing 'label' (true for a desirable answer, false for an undesirable one)", "label")
    desirable = _label(rec["label"], ctx)
    if "completion" in rec:
        prompt = _prompt(rec, ctx)
        response = _answer(rec["completion"], ctx, "completion")
    elif "messages" in rec:
        msgs = [m for m, _ in openai_messages(rec["messages"], ctx, "messages")]
        if msgs[-1].role != "assistant":
            raise ctx.error("the last message must be the assistant's answer", "messages")
        if not msgs[-1].content.strip():
            raise ctx.error("answer is empty", f"messages[{len(msgs) - 1}].content")
        prompt, response = msgs[:-1], msgs[-1:]
        if not any(m.role == "user" for m in prompt):
            raise ctx.error("no user turn before the answer", "messages")
    else:
        raise ctx.error("expected {messages, label} or {prompt, completion, label}", "messages")
    return [Feedback(prompt, response, desirable, ctx.source)]


def rankings_to_feedback(rankings: list[Ranking]) -> list[Feedback]:
    """Unpair: the best answer of each ranking is desirable, the worst undesirable."""
    out = []
    for r in rankings:
        out.append(Feedback(r.prompt, r.responses[0], True, r.source))
        out.append(Feedback(r.prompt, r.responses[-1], False, r.source))
    return out


# ---- token ids ----------------------------------------------------------------------------------

@dataclass
class PreferenceExample:
    """A record rendered to token ids: one Rendered per answer (best first) with its score; for KTO
    one answer, its label and a mismatched (prompt, other answer) sequence for the KL estimate."""

    answers: list[Rendered]                 # prompt + answer, one per answer
    scores: list[float]
    margin: float | None = None
    desirable: bool | None = None
    kl_answer: Rendered | None = None       # this prompt with another record's answer
    ref_logps: list[float] | None = None    # cached reference log-probs, one per answer
    ref_kl_logp: float | None = None

    def __len__(self) -> int:
        return sum(len(a) for a in self.answers) + (len(self.kl_answer) if self.kl_answer is not None else 0)


def encode_answer(tokenizer: Any, conversation: Conversation, template: str | None,
                  max_length: int) -> tuple[Any, bool]:
    """Render prompt + answer with the one template renderer; returns (Rendered, truncated). Too long:
    prompt tokens go first (from the start), then answer tokens from the end."""
    r = render_conversation(tokenizer, conversation, template=template)
    ids, mask = r.input_ids, r.loss_mask
    if sum(mask[1:]) == 0:
        raise ChatsmithError(f"{conversation.source or 'a record'}: the answer renders to no trained token")
    truncated = len(ids) > max_length
    if truncated:
        first = mask.index(1)
        drop = min(len(ids) - max_length, max(0, first - 1))
        ids, mask = ids[drop:], mask[drop:]
        ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask[1:]) == 0:
            raise ChatsmithError(f"{conversation.source or 'a record'}: nothing of the answer is left after "
                                 f"truncation to --max-length {max_length}")
    return Rendered(list(ids), list(mask), truncated), truncated


def encode_rankings(tokenizer: Any, records: list[Ranking], template: str | None,
                    max_length: int) -> tuple[list[PreferenceExample], int]:
    """Rankings rendered to token ids (one Rendered per answer); returns (examples, answers truncated)."""
    out, truncated = [], 0
    for rec in records:
        answers = []
        for k in range(len(rec.responses)):
            ex, t = encode_answer(tokenizer, rec.conversation(k), template, max_length)
            truncated += int(t)
            answers.append(ex)
        out.append(PreferenceExample(answers, list(rec.scores), rec.margin))
    return out, truncated


def encode_feedback(tokenizer: Any, records: list[Feedback], template: str | None, max_length: int,
                    seed: int = 0) -> tuple[list[PreferenceExample], int]:
    """KTO examples; each also gets its prompt paired with another record's answer (a seeded
    derangement, as TRL pairs prompt i with answer i+1) for the KL reference point."""
    import random

    out, truncated = [], 0
    n = len(records)
    shift = random.Random(seed).randrange(1, n) if n > 1 else 0
    for i, rec in enumerate(records):
        ex, t = encode_answer(tokenizer, rec.conversation(), template, max_length)
        other = records[(i + shift) % n]
        kl, _ = encode_answer(tokenizer, Conversation(_context(rec.prompt) + other.response, source=rec.source),
                              template, max_length)
        truncated += int(t)
        out.append(PreferenceExample([ex], [1.0 if rec.desirable else 0.0], desirable=rec.desirable, kl_answer=kl))
    return out, truncated


__all__ = ["Ranking", "Feedback", "PreferenceData", "read_preferences", "read_feedback", "rankings_to_feedback",
           "PreferenceExample", "encode_answer", "encode_rankings", "encode_feedback"]
