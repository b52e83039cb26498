"""LLM-as-judge on MT-bench-format questions (`chatsmith eval judge`).

Questions are FastChat's `question.jsonl` records: `question_id`, `category`, `turns` (the user's
turns) and optionally `reference` (one reference answer per turn), so MT-bench and Vicuna-bench
files work unchanged. A model answers turn by turn with its own earlier answers in context; every
turn of every question is generated together through the one engine.

The judge is any OpenAI-compatible endpoint, called with the official `openai` client (its retries
with exponential backoff cover refused connections, 429 and 5xx). Modes:

- single: the judge grades each answer 1-10 ("Rating: [[N]]"); with a reference when the question
  has one for that turn;
- pairwise: the judge compares the model with the baseline twice, once in each order, to cancel
  position bias (Zheng et al. 2023, "Judging LLM-as-a-judge", section 3.4): A wins only when both
  orders prefer it, inconsistent verdicts count as a tie.

A judge reply without a parseable verdict is asked again (`parse_retries` times), then recorded as
an error, never as a score. Answers and judgments are cached in the output folder, keyed by what
determines them (model and generation settings; judge model and the exact prompt), so an
interrupted evaluation resumes without paying twice.

Judge prompts are files (`judge_prompts/*.txt`: system text, a line `---`, then the user text with
{context}, {question}, {reference}, {answer}, {answer_a}, {answer_b}); `prompts_dir` replaces them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError, ConfigError
from chatsmith.eval.stats import WinTieLoss, mean_interval

PROMPT_NAMES = ("single", "single_reference", "pair", "pair_reference")
DEFAULT_PROMPTS = Path(__file__).parent / "judge_prompts"
MODES = ("single", "pairwise")
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


@dataclass
class Question:
    """One FastChat question: its id, category, user turns and per-turn references ('' when none)."""

    question_id: str
    category: str
    turns: list[str]
    references: list[str] = field(default_factory=list)
    source: str = ""

    def reference(self, turn: int) -> str:
        """The reference answer of a turn, '' when there is none."""
        return self.references[turn] if turn < len(self.references) else ""


def read_questions(path: str, limit: int | None = None) -> list[Question]:
    """FastChat question.jsonl records (see the module docstring); errors name the line and field."""
    from chatsmith.data.sources import RecordContext, convert_records, read_records

    def convert(rec: Any, ctx: RecordContext) -> list[Question]:
        if not isinstance(rec, dict):
            raise ctx.error(f"must be an object with question_id, category and turns, got {type(rec).__name__}",
                            hint=None)
        if "question_id" not in rec:
            raise ctx.error("needs a 'question_id'", "question_id", hint=None)
        turns = rec.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ctx.error("'turns' must be a non-empty list of the user's turns (non-empty strings)", "turns",
                            hint="FastChat's format: {\"question_id\": 1, \"category\": \"writing\", \"turns\": [\"...\"]}")
        refs = rec.get("reference") or []
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise ctx.error("'reference' must be a list of strings (one per turn)", "reference", hint=None)
        return [Question(str(rec["question_id"]), str(rec.get("category") or "general"), list(turns), list(refs),
                         ctx.source)]

    questions, _ = convert_records(path, read_records(path), convert, skip_bad=False)
    ids = [q.question_id for q in questions]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise ChatsmithError(f"{path}: question_id {dup} occurs more than once; ids must be unique")
    return questions[:limit] if limit else questions


# ---- the cache -----------------------------------------------------------------------------------

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


class JsonlCache:
    """Rows of a JSONL file keyed by their 'key' field; appended (and flushed) as they are made, so
    an interrupted run keeps everything it finished. A torn last line (a kill mid-write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "key" in row:
                    self.rows[row["key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        """The row stored under `key`, if any."""
        return self.rows.get(key)

    def put(self, row: dict[str, Any]) -> None:
        """Store and append a row (it must carry its 'key')."""
        with self._lock:
            self.rows[row["key"]] = row
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()


# ---- answers -------------------------------------------------------------------------------------

@dataclass
class AnswerSettings:
    """What determines an answer besides the model and the question."""

    temperature: float = 0.0
    max_new_tokens: int = 256
    seed: int = 0
    system: str | None = None
    template: str | None = None
    precision: str = "auto"

    def key(self) -> str:
        """A digest of the settings, part of every cached answer's key."""
        return _digest(self.__dict__)


def answer_key(model: str, q: Question, turn: int, settings: AnswerSettings) -> str:
    """Cache key of one answer."""
    return _digest({"model": model, "question": q.question_id, "turns": q.turns[:turn + 1], "turn": turn,
                    "settings": settings.key()})


def generate_answers(model_spec: str, questions: Sequence[Question], cache: JsonlCache,
                     settings: AnswerSettings, *, progress: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Every turn of every question answered by one model (question_id -> one answer per turn). Turn t
    of all questions is generated in one engine batch, after turn t-1, with the model's own earlier
    answers in context. Cached answers are reused; the model is loaded only when one is missing."""
    from chatsmith.data.conversation import Message
    from chatsmith.eval.answers import answer_conversations, load_engine

    answers: dict[str, list[str]] = {q.question_id: [] for q in questions}
    engine = None
    for turn in range(max(len(q.turns) for q in questions)):
        todo = []
        for q in (q for q in questions if turn < len(q.turns)):
            row = cache.get(answer_key(model_spec, q, turn, settings))
            if row is not None and len(answers[q.question_id]) == turn:
                answers[q.question_id].append(row["answer"])
            else:
                todo.append(q)
        if not todo:
            continue
        if engine is None:
            engine = load_engine(model_spec, settings.precision)
            progress(f"answering with {model_spec}: {len(todo)} questions at turn {turn + 1}")
        convs = []
        for q in todo:
            msgs = [Message("system", settings.system)] if settings.system else []
            for t in range(turn):
                msgs += [Message("user", q.turns[t]), Message("assistant", answers[q.question_id][t])]
            convs.append(msgs + [Message("user", q.turns[turn])])
        comps = answer_conversations(engine, convs, template=settings.template, max_new_tokens=settings.max_new_tokens,
                                     temperature=settings.temperature, seed=settings.seed)
        for q, c in zip(todo, comps):
            text = c.text.strip()
            answers[q.question_id].append(text)
            cache.put({"key": answer_key(model_spec, q, turn, settings), "model": model_spec,
                       "question_id": q.question_id, "turn": turn, "answer": text, "tokens": len(c.token_ids),
                       "finish_reason": c.finish_reason})
    return answers


# ---- the judge -----------------------------------------------------------------------------------

@dataclass
class JudgeSettings:
    """Where the judge is and how it is asked."""

    url: str
    model: str
    api_key: str | None = None
    concurrency: int = 4
    max_retries: int = 3          # transport retries (connection errors, 429, 5xx), with backoff
    parse_retries: int = 2        # asks again when the reply has no parseable verdict
    timeout: float = 120.0
    temperature: float = 0.0
    max_tokens: int = 1024
    prompts_dir: str | None = None


def load_judge_prompts(prompts_dir: str | None = None) -> dict[str, tuple[str, str]]:
    """name -> (system, user template) for PROMPT_NAMES; a directory replaces the files it holds."""
    out = {}
    for name in PROMPT_NAMES:
        path = DEFAULT_PROMPTS / f"{name}.txt"
        if prompts_dir and (Path(prompts_dir) / f"{name}.txt").is_file():
            path = Path(prompts_dir) / f"{name}.txt"
        text = path.read_text(encoding="utf-8")
        system, sep, user = text.partition("\n---\n")
        if not sep:
            raise ConfigError(f"judge prompt {path}: needs the system text, a line '---', then the user text")
        out[name] = (system.strip(), user.strip() + "\n")
    if prompts_dir and not Path(prompts_dir).is_dir():
        raise ConfigError(f"--judge-prompts {prompts_dir}: not a directory (it holds any of "
                          f"{', '.join(n + '.txt' for n in PROMPT_NAMES)})")
    return out


def fill(template: str, **values: str) -> str:
    """Replace {name} placeholders by values; other braces (code in answers) stay as they are."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


def parse_rating(text: str) -> float | None:
    """The last [[N]] of a judge reply when 1 <= N <= 10, else None."""
    found = _RATING.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


def parse_verdict(text: str) -> str | None:
    """The last [[A]], [[B]] or [[C]] of a judge reply, else None."""
    found = _VERDICT.findall(text)
    return found[-1] if found else None


class Judge:
    """Calls the judge endpoint; `ask(system, user, parse)` returns (reply, parsed value or None, error)."""

    def __init__(self, settings: JudgeSettings) -> None:
        try:
            import openai
        except ImportError:
            raise ChatsmithError("the judge needs the openai client (a dependency of chatsmith): pip install openai") from None
        self.settings = settings
        key = settings.api_key or os.environ.get("CHATSMITH_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = openai.OpenAI(base_url=settings.url, api_key=key, max_retries=settings.max_retries,
                                    timeout=settings.timeout)
        self._openai = openai

    def check_reachable(self) -> None:
        """Fail early, with what to do, when the endpoint cannot be reached or refuses the key."""
        try:
            self.client.models.list()
        except self._openai.APIConnectionError as e:
            raise ChatsmithError(f"the judge at {self.settings.url} cannot be reached ({e.__cause__ or e}); start it, "
                                 "or check --judge-url (an OpenAI-compatible base URL such as http://host:8000/v1)") from None
        except self._openai.AuthenticationError:
            raise ChatsmithError(f"the judge at {self.settings.url} refused the API key; pass --judge-api-key or set "
                                 "CHATSMITH_JUDGE_API_KEY (or OPENAI_API_KEY)") from None
        except self._openai.APIStatusError:
            pass   # some servers have no /models route; the first judgment will tell

    def ask(self, system: str, user: str, parse: Callable[[str], Any]) -> tuple[str, Any, str | None]:
        """Ask until the reply parses (1 + parse_retries tries): (last reply, value, None), or
        (last reply, None, error) when it never parses or the endpoint fails."""
        reply = ""
        for _ in range(1 + self.settings.parse_retries):
            try:
                resp = self.client.chat.completions.create(
                    model=self.settings.model, temperature=self.settings.temperature,
                    max_tokens=self.settings.max_tokens,
                    messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])
            except self._openai.APIError as e:
                return reply, None, f"judge request failed: {type(e).__name__}: {e}"
            reply = (resp.choices[0].message.content or "") if resp.choices else ""
            value = parse(reply)
            if value is not None:
                return reply, value, None
        return reply, None, f"no verdict could be parsed from the judge's reply after {1 + self.settings.parse_retries} tries"


def _context(q: Question, turn: int, histories: dict[str, list[str]]) -> str:
    """The earlier turns, once per assistant whose earlier answers differ ('' at the first turn)."""
    if turn == 0:
        return ""
    parts = []
    for label, answers in histories.items():
        lines = [f"[Earlier conversation{' with assistant ' + label if label else ''}]"]
        for t in range(turn):
            lines += [f"User: {q.turns[t]}", f"Assistant: {answers[t]}"]
        parts.append("\n".join(lines) + "\n[End of the earlier conversation]\n\n")
    return "".join(parts)


def judge_single(judge: Judge, prompts: dict[str, tuple[str, str]], cache: JsonlCache, model: str,
                 q: Question, turn: int, answers: list[str]) -> dict[str, Any]:
    """One answer's grade (cached): a row with score (or error)."""
    ref = q.reference(turn)
    name = "single_reference" if ref else "single"
    system, template = prompts[name]
    user = fill(template, context=_context(q, turn, {"": answers}), question=q.turns[turn], reference=ref,
                answer=answers[turn])
    key = _digest({"judge": judge.settings.model, "mode": "single", "system": system, "user": user})
    row = cache.get(key)
    if row is None or row.get("error"):
        reply, value, error = judge.ask(system, user, parse_rating)
        row = {"key": key, "mode": "single", "prompt": name, "model": model, "question_id": q.question_id,
               "category": q.category, "turn": turn, "score": value, "error": error, "judgment": reply,
               "judge": judge.settings.model}
        cache.put(row)
    return row


def judge_pair(judge: Judge, prompts: dict[str, tuple[str, str]], cache: JsonlCache, model: str, baseline: str,
               q: Question, turn: int, mine: list[str], theirs: list[str]) -> dict[str, Any]:
    """The model against the baseline on one turn, asked in both orders (cached): a row with the
    outcome for the model (win, tie, loss or error) and both verdicts."""
    ref = q.reference(turn)
    name = "pair_reference" if ref else "pair"
    system, template = prompts[name]
    verdicts, replies, errors = [], [], []
    for first in ("model", "baseline"):
        a = mine if first == "model" else theirs
        b = theirs if first == "model" else mine
        user = fill(template, context=_context(q, turn, {"A": a, "B": b}), question=q.turns[turn], reference=ref,
                    answer_a=a[turn], answer_b=b[turn])
        key = _digest({"judge": judge.settings.model, "mode": "pair", "system": system, "user": user})
        row = cache.get(key)
        if row is None or row.get("error"):
            reply, value, error = judge.ask(system, user, parse_verdict)
            row = {"key": key, "mode": "pair", "prompt": name, "order": f"{first}-first", "question_id": q.question_id,
                   "turn": turn, "verdict": value, "error": error, "judgment": reply, "judge": judge.settings.model}
            cache.put(row)
        # The verdict in terms of the model: A means whoever came first.
        v = row["verdict"]
        verdicts.append(None if v is None else "tie" if v == "C" else
                        ("model" if (v == "A") == (first == "model") else "baseline"))
        replies.append(row["judgment"])
        errors.append(row["error"])
    if any(e for e in errors):
        outcome = "error"
    elif verdicts[0] == verdicts[1] == "model":
        outcome = "win"
    elif verdicts[0] == verdicts[1] == "baseline":
        outcome = "loss"
    else:
        outcome = "tie"        # both tie, or the two orders disagree (position bias)
    return {"mode": "pairwise", "model": model, "baseline": baseline, "question_id": q.question_id,
            "category": q.category, "turn": turn, "outcome": outcome, "verdicts": verdicts,
            "consistent": verdicts[0] == verdicts[1], "judgments": replies, "errors": [e for e in errors if e]}


def summarise_single(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean score with its interval per model, overall, per category and per turn; errors counted."""
    out: dict[str, Any] = {}
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        scored = [r for r in mine if r["score"] is not None]
        groups: dict[str, list[float]] = {}
        for r in scored:
            for g in ("all", f"category/{r['category']}", f"turn/{r['turn'] + 1}"):
                groups.setdefault(g, []).append(float(r["score"]))
        out[model] = {"score": {g: mean_interval(v, bounds=(1.0, 10.0)).as_dict() for g, v in groups.items()},
                      "judged": len(scored), "errors": len(mine) - len(scored)}
    return out


def summarise_pairwise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Win/tie/loss of the model against the baseline with the win rate's interval, overall and per
    category; errors and order-inconsistent verdicts counted."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r["outcome"] == "error":
            continue
        for g in ("all", f"category/{r['category']}", f"turn/{r['turn'] + 1}"):
            groups.setdefault(g, []).append(r["outcome"])
    table = {g: WinTieLoss(v.count("win"), v.count("tie"), v.count("loss")).as_dict() for g, v in groups.items()}
    return {"outcomes": table, "errors": sum(r["outcome"] == "error" for r in rows),
            "inconsistent": sum(not r["consistent"] for r in rows if r["outcome"] != "error")}


def run_judge(model: str, questions_path: str, output: str, judge_settings: JudgeSettings, *,
              baseline: str | None = None, mode: str | None = None, settings: AnswerSettings | None = None,
              limit: int | None = None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole evaluation: answers (cached), judgments (cached, `concurrency` at a time), then
    results.jsonl, summary.json and report.html in `output`. Returns the summary."""
    settings = settings or AnswerSettings()
    mode = mode or ("pairwise" if baseline else "single")
    if mode not in MODES:
        raise ConfigError(f"--mode {mode}: choose one of {', '.join(MODES)}")
    if mode == "pairwise" and not baseline:
        raise ConfigError("--mode pairwise needs --baseline MODEL (the model to compare against)")
    questions = read_questions(questions_path, limit)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    answers_cache = JsonlCache(out / "answers.jsonl")
    judgments = JsonlCache(out / "judgments.jsonl")
    prompts = load_judge_prompts(judge_settings.prompts_dir)
    judge = Judge(judge_settings)
    judge.check_reachable()
    models = [model] + ([baseline] if baseline else [])
    answers = {m: generate_answers(m, questions, answers_cache, settings, progress=progress) for m in models}
    jobs: list[Callable[[], dict[str, Any]]] = []
    for q in questions:
        for turn in range(len(q.turns)):
            if mode == "single":
                for m in models:
                    jobs.append(lambda m=m, q=q, t=turn: judge_single(judge, prompts, judgments, m, q, t,
                                                                      answers[m][q.question_id]))
            else:
                jobs.append(lambda q=q, t=turn: judge_pair(judge, prompts, judgments, model, baseline, q, t,
                                                           answers[model][q.question_id],
                                                           answers[baseline][q.question_id]))
    progress(f"judging {len(jobs)} {'answers' if mode == 'single' else 'pairs (both orders)'} with "
             f"{judge_settings.model} at {judge_settings.url}, {judge_settings.concurrency} at a time")
    with ThreadPoolExecutor(max_workers=max(1, judge_settings.concurrency)) as pool:
        rows = list(pool.map(lambda job: job(), jobs))
    summary: dict[str, Any] = {"kind": "judge", "mode": mode, "model": model, "baseline": baseline,
                               "questions": questions_path, "judge": {"url": judge_settings.url,
                                                                      "model": judge_settings.model},
                               "settings": settings.__dict__, "n_questions": len(questions)}
    if mode == "single":
        summary["single"] = summarise_single(rows)
    else:
        summary["pairwise"] = summarise_pairwise(rows)
    results = []
    by_id = {q.question_id: q for q in questions}
    for r in rows:
        q = by_id[r["question_id"]]
        row = {"id": f"{q.question_id}/{r['turn'] + 1}", "question_id": q.question_id, "turn": r["turn"],
               "category": q.category, "question": q.turns[r["turn"]], "reference": q.reference(r["turn"])}
        if mode == "single":
            row.update({"model": r["model"], "answer": answers[r["model"]][q.question_id][r["turn"]],
                        "score": r["score"], "error": r["error"], "judgment": r["judgment"]})
        else:
            row.update({"model": model, "answer": answers[model][q.question_id][r["turn"]],
                        "baseline": baseline, "baseline_answer": answers[baseline][q.question_id][r["turn"]],
                        "outcome": r["outcome"], "consistent": r["consistent"], "errors": r["errors"],
                        "judgments": r["judgments"]})
        results.append(row)
    from chatsmith.eval.report import write_results

    write_results(out, summary, results)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    """The judge summary as terminal tables: mean scores, or win/tie/loss, by group."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for model, s in (summary.get("single") or {}).items():
        t = Table(title=f"judge scores of {model} (1-10) · {s['judged']} judged, {s['errors']} errors")
        for col in ("group", "mean [95%]", "n"):
            t.add_column(col)
        for g, v in s["score"].items():
            t.add_row(g, f"{v['value']:.2f} [{v['low']:.2f}, {v['high']:.2f}]", str(v["n"]))
        console.print(t)
    if summary.get("pairwise"):
        p = summary["pairwise"]
        t = Table(title=f"{summary['model']} vs {summary['baseline']} · {p['errors']} errors, "
                        f"{p['inconsistent']} order-inconsistent verdicts (counted as ties)")
        for col in ("group", "win/tie/loss", "win rate [95%]"):
            t.add_column(col)
        for g, v in p["outcomes"].items():
            wr = v["win_rate"]
            t.add_row(g, f"{v['wins']}/{v['ties']}/{v['losses']}", f"{wr['value']:.3f} [{wr['low']:.3f}, {wr['high']:.3f}]")
        console.print(t)
