"""Records one at a time, in and out, so a tool over a million-record file holds one record (or one
bounded buffer) in memory, never the file.

Reading streams JSON lines and JSON lists (an incremental parser over the list, one element at a
time); CSV, TSV and Parquet are read through data/sources.py, which loads the whole table (use
JSONL for big files). Writing streams .jsonl, or a .json list written element by element. Records
are named as everywhere else: "line N" (JSONL), "record N" (JSON list).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatsmith.data.sources import read_records
from chatsmith.errors import ChatsmithError, DataError

_CHUNK = 1 << 20
_WS = re.compile(r"[\s,]*")


def iter_records(path: str) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs of a file, streamed; a line that is not JSON is yielded as a DataError."""
    p = Path(path)
    if not p.is_file():
        raise ChatsmithError(f"data file not found: {path}")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl(p, path)
    if suffix == ".json":
        with p.open("r", encoding="utf-8-sig") as f:
            head = f.read(4096).lstrip()
        if head.startswith("["):
            return _json_list(p, path)
        if head.startswith("{") and "\n{" in head:
            return _jsonl(p, path)   # JSON lines saved as .json
    return read_records(path)


def _jsonl(p: Path, path: str) -> Iterator[tuple[str, Any]]:
    with p.open("r", encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {n}", DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=path,
                                             record=f"line {n}", hint="each line must be one complete JSON object")


def _json_list(p: Path, path: str) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level JSON list, parsed one at a time from a rolling buffer."""
    decoder = json.JSONDecoder()
    with p.open("r", encoding="utf-8-sig") as f:
        buf = f.read(_CHUNK).lstrip()
        if not buf.startswith("["):
            raise DataError("expected a JSON list of records", path=path)
        pos, index, eof = 1, 0, False
        while True:
            pos = _WS.match(buf, pos).end()
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if eof:
                    raise DataError(f"invalid JSON in record {index} ({e.msg})", path=path, record=f"record {index}") \
                        from None
                more = f.read(_CHUNK)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            if end == len(buf) and not eof:   # a number may go on in the next chunk
                more = f.read(_CHUNK)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield f"record {index}", value
            index += 1
            pos = end
            if pos > _CHUNK:                   # drop what was parsed
                buf, pos = buf[pos:], 0
            if len(buf) - pos < 64 and not eof:
                more = f.read(_CHUNK)
                eof = not more
                buf, pos = buf[pos:] + more, 0


def count_records(path: str) -> int:
    """How many records a file holds (one streaming pass; JSONL counts non-blank lines)."""
    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        with p.open("rb") as f:
            return sum(1 for line in f if line.strip())
    return sum(1 for _ in iter_records(path))


def good_records(path: str, skip_bad: bool = False, bad: list[DataError] | None = None) -> Iterator[tuple[str, Any]]:
    """iter_records without the unreadable ones: they raise, or with `skip_bad` are listed in `bad`."""
    for where, rec in iter_records(path):
        if isinstance(rec, DataError):
            if not skip_bad:
                raise rec
            if bad is not None:
                bad.append(rec)
            continue
        yield where, rec


def numbered_records(path: str, skip_bad: bool = False) -> Iterator[tuple[int, Any]]:
    """(index, record) with the index counting every record, readable or not, as count_records
    does, so a choice made by index lands on the same record; unreadable ones raise, or with
    `skip_bad` are passed over."""
    for i, (_, rec) in enumerate(iter_records(path)):
        if isinstance(rec, DataError):
            if not skip_bad:
                raise rec
            continue
        yield i, rec


class RecordWriter:
    """Writes records to .jsonl (one per line) or .json (a list, element by element)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".json", ".jsonl"):
            raise ChatsmithError(f"{path}: output must end in .jsonl (JSON lines) or .json (a JSON list)")
        self.as_list = suffix == ".json"
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("w", encoding="utf-8")
        if self.as_list:
            self._f.write("[\n")

    def write(self, record: Any) -> None:
        self.write_json(json.dumps(record, ensure_ascii=False))

    def write_json(self, text: str) -> None:
        """Write one record given as its JSON text (no newline)."""
        if self.as_list:
            self._f.write((",\n" if self.count else "") + text)
        else:
            self._f.write(text + "\n")
        self.count += 1

    def close(self) -> None:
        if self.as_list:
            self._f.write("\n]\n")
        self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the text of a record --------------------------------------------------------------------------

def text_fields(record: Any) -> list[tuple[tuple[Any, ...], str]]:
    """(path, text) for every text a record holds, in every format chatsmith reads: Alpaca
    instruction/input/output/history, ShareGPT values, message contents (typed text parts too),
    chosen/rejected, prompt/response columns, a plain string. `path` addresses the text inside the
    record (see `set_field`)."""
    if isinstance(record, str):
        return [((), record)]
    out: list[tuple[tuple[Any, ...], str]] = []

    def walk(value: Any, path: tuple[Any, ...]) -> None:
        if isinstance(value, str):
            out.append((path, value))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, (*path, i))
        elif isinstance(value, dict):
            for k, v in value.items():
                if k in _TEXT_KEYS or isinstance(v, (list, dict)):
                    if k not in _SKIP_KEYS:
                        walk(v, (*path, k))

    if isinstance(record, dict):
        walk(record, ())
    return out


_TEXT_KEYS = {"instruction", "input", "output", "value", "content", "text", "chosen", "rejected", "prompt",
              "response", "completion", "question", "answer", "system", "history", "query", "responses", "turns"}
_SKIP_KEYS = {"provenance", "meta", "metadata", "from", "role", "type", "id", "label", "scores", "ranking"}


def record_text(record: Any) -> str:
    """All of a record's text, joined with newlines (what dedupe and the language filter look at)."""
    return "\n".join(t for _, t in text_fields(record))


def set_field(record: Any, path: tuple[Any, ...], text: str) -> Any:
    """The record with the text at `path` replaced (in place for dicts and lists); returns it."""
    if not path:
        return text
    node = record
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = text
    return record
