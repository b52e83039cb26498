"""Dataset tools that ask a teacher: `chatsmith data translate` (every text of a record, format
kept) and the teacher-scored quality predicate of `chatsmith data filter --quality-threshold`.

Both stream the input in chunks of a few times the concurrency, ask through the journal (a rerun
pays only for what is missing) and count what could not be used.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from chatsmith.data.ops.stream import RecordWriter, good_records, record_text, set_field, text_fields
from chatsmith.datagen.parsing import is_refusal
from chatsmith.datagen.teacher import Teacher

TRANSLATE_PROMPT = """Translate the text between <<< and >>> into {language}. Keep code blocks, inline code, URLs, placeholders such as {{name}}, numbers and Markdown formatting unchanged. Answer with the translation only, without the markers.

<<<{text}>>>"""

QUALITY_PROMPT = """Rate the quality of the following training example for a chat assistant, from 1 (useless, wrong or harmful) to 10 (a clear request with a correct, helpful, well-written answer). Explain briefly, then end with your score as "Score: [[N]]".

{example}"""

_SCORE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def _translatable(path: tuple[Any, ...], text: str) -> bool:
    return bool(text.strip()) and not (path and path[-1] in ("from", "role", "id"))


def translate_record(teacher: Teacher, record: Any, language: str, *, parse_retries: int = 2,
                     max_tokens: int = 2048) -> tuple[Any | None, list[str]]:
    """(the record with every text translated, reasons of unusable answers) or (None, reasons)
    when some text could not be translated."""
    out = copy.deepcopy(record)
    reasons: list[str] = []
    for path, text in text_fields(record):
        if not _translatable(path, text):
            continue
        prompt = TRANSLATE_PROMPT.format(language=language, text=text)
        for attempt in range(1 + parse_retries):
            ans = teacher.complete(prompt, temperature=0.0, max_tokens=max_tokens, attempt=attempt, tag="translate")
            got = ans.text.strip().removeprefix("<<<").removesuffix(">>>").strip()
            if not got:
                reasons.append("empty")
            elif is_refusal(got) and not is_refusal(text):
                reasons.append("refusal")
            elif ans.finish_reason == "length":
                reasons.append("truncated")
            else:
                out = set_field(out, path, got)
                break
        else:
            return None, reasons
    return out, reasons


def translate(teacher: Teacher, input_path: str, output_path: str, language: str, *, parse_retries: int = 2,
              skip_bad: bool = False, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Translate every record of `input_path` into `language`, keeping its format; records whose
    texts could not all be translated are dropped and counted."""
    chunk = 4 * teacher.settings.concurrency
    reasons: Counter = Counter()
    read = failed = 0
    with RecordWriter(output_path) as out, ThreadPoolExecutor(max_workers=teacher.settings.concurrency) as pool:
        batch: list[Any] = []

        def flush() -> None:
            nonlocal failed
            for rec, why in pool.map(lambda r: translate_record(teacher, r, language, parse_retries=parse_retries),
                                     batch):
                reasons.update(why)
                if rec is None:
                    failed += 1
                else:
                    out.write(rec)
            batch.clear()

        for _, rec in good_records(input_path, skip_bad):
            read += 1
            batch.append(rec)
            if len(batch) >= chunk:
                flush()
                if read % (chunk * 25) == 0:
                    progress(f"translate: {read} records read, {out.count} written")
        if batch:
            flush()
    return {"read": read, "written": out.count, "failed": failed, "unusable_answers": dict(sorted(reasons.items()))}


def quality_score(teacher: Teacher, record: Any, parse_retries: int = 2) -> float | None:
    """The teacher's 1-10 score of a record (None when no score could be read from its answers)."""
    example = record_text(record)[:6000]
    for attempt in range(1 + parse_retries):
        ans = teacher.complete(QUALITY_PROMPT.format(example=example), temperature=0.0, max_tokens=512,
                               attempt=attempt, tag="quality")
        found = _SCORE.findall(ans.text)
        if found and 1 <= float(found[-1]) <= 10:
            return float(found[-1])
    return None


def quality_predicate(teacher: Teacher, threshold: float, parse_retries: int = 2) -> Callable[[list[Any]], list[str | None]]:
    """A filter predicate: keep records the teacher scores at least `threshold` (1-10), asked
    `concurrency` at a time; a record without a readable score is dropped as unscored."""
    pool = ThreadPoolExecutor(max_workers=teacher.settings.concurrency)

    def pred(batch: list[Any]) -> list[str | None]:
        scores = list(pool.map(lambda r: quality_score(teacher, r, parse_retries), batch))
        return [None if s is not None and s >= threshold else
                ("unscored" if s is None else f"score below {threshold:g}") for s in scores]

    return pred


