"""Where records come from: a local file (.json, .jsonl, .csv, .tsv, .parquet, .txt) or a hub dataset,
read into (where, record) pairs, with the place of each record named for error messages.

Records are named "line N" (JSONL, 1-based file line), "record N" (index into a JSON list, 0-based,
as in ``data[N]``) or "row N" (CSV: the file line; Parquet and hub: 0-based row index). A record that
cannot be parsed is yielded as a `DataError`, so a reader with --skip-bad can drop it and go on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from chatsmith.errors import ChatsmithError, DataError

T = TypeVar("T")

DATA_EXTENSIONS = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".txt")
SKIP_HINT = "fix the record, or pass --skip-bad to drop malformed records"
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class RecordContext:
    """Where a record sits, for error messages and `Conversation.source`."""

    path: str
    where: str

    @property
    def source(self) -> str:
        """"PATH, WHERE": how a conversation names its record."""
        return f"{self.path}, {self.where}"

    def error(self, message: str, field: str | None = None, hint: str | None = SKIP_HINT) -> DataError:
        """A DataError naming this file and record (and the field, when given)."""
        return DataError(message, path=self.path, record=self.where, field=field, hint=hint)


def read_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) pairs; a record that cannot be parsed is yielded as a DataError."""
    p = Path(path).expanduser()
    if not p.exists():
        if _HUB_NAME.fullmatch(path) and p.suffix.lower() not in DATA_EXTENSIONS:
            return _hub_records(path)
        raise ChatsmithError(f"data file not found: {path}")
    if p.is_dir():
        raise ChatsmithError(f"{path} is a directory: pass a data file ({', '.join(DATA_EXTENSIONS)})")
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _csv_records(p, path, sep="\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _parquet_records(p, path)
    text = _read_text(p, path)
    if suffix == ".txt":
        return _txt_records(text)
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_records(text, path)
    if suffix == ".json" or text.lstrip()[:1] in ("[", "{"):
        return _json_records(text, path)
    raise ChatsmithError(f"{path}: unsupported file type '{suffix}'. Use one of {', '.join(DATA_EXTENSIONS)}")


def _read_text(p: Path, path: str) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM some editors write
    except UnicodeDecodeError as e:
        raise ChatsmithError(f"{path}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None


def _jsonl_records(text: str, path: str) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, record=where,
                                   hint="each line of a .jsonl file must be one complete JSON object")


def _json_records(text: str, path: str) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several objects, one per line: JSON lines saved as .json
            yield from _jsonl_records(text, path)
            return
        raise DataError(f"invalid JSON ({e.msg}) at line {e.lineno}, column {e.colno}", path=path,
                        hint="a .json file must hold one JSON list of records (or one record)") from None
    if isinstance(data, dict):
        yield "record 0", data  # one conversation stored as an object, not a list
    elif isinstance(data, list):
        yield from ((f"record {i}", r) for i, r in enumerate(data))
    else:
        raise DataError(f"expected a JSON list of records, found a {type(data).__name__}", path=path)


def _txt_records(text: str) -> Iterator[tuple[str, Any]]:
    # One document per block of lines separated by blank lines; named by the block's first line.
    block: list[str] = []
    start = 0
    for n, line in enumerate([*text.splitlines(), ""], start=1):
        if line.strip():
            if not block:
                start = n
            block.append(line)
        elif block:
            yield f"line {start}", "\n".join(block)
            block = []


def _csv_records(p: Path, path: str, sep: str) -> Iterator[tuple[str, Any]]:
    import pandas as pd

    try:
        # Everything as text, and empty cells as "" rather than NaN.
        df = pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ChatsmithError(f"{path}: cannot read as {'TSV' if sep == chr(9) else 'CSV'}: {e}") from None
    # "row N" is the file line (line 1 is the header), exact unless a cell holds newlines.
    for i, rec in enumerate(df.to_dict("records")):
        yield f"row {i + 2}", rec


def _parquet_records(p: Path, path: str) -> Iterator[tuple[str, Any]]:
    # pyarrow's to_pylist (pandas' Parquet engine) gives plain lists and dicts for nested
    # columns such as `messages`, where pandas would give numpy object arrays.
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise ChatsmithError(f"{path}: cannot read as Parquet: {e}") from None
    yield from ((f"row {i}", r) for i, r in enumerate(rows))


def _hub_records(name: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a core dependency
        raise ChatsmithError("loading a hub dataset needs the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth, missing repo or split: all end the same way for the user
        raise ChatsmithError(
            f"could not load '{name}' from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If you are offline, or this was meant to be a local file, download the data and pass "
            "its path instead, e.g. --data data/train.jsonl (.json, .jsonl, .csv, .parquet or .txt)"
        ) from None
    yield from ((f"row {i}", dict(r)) for i, r in enumerate(ds))


def convert_records(path: str, records: Iterable[tuple[str, Any]], convert: Callable[[Any, RecordContext], list[T]],
                    skip_bad: bool) -> tuple[list[T], list[DataError]]:
    """`convert(record, context)` applied to every record: (everything it returned, the records
    dropped as malformed). A malformed record raises its DataError unless `skip_bad`; an empty
    file, or one whose every record is malformed, is an error either way."""
    out: list[T] = []
    skipped: list[DataError] = []
    seen = 0
    for where, record in records:
        seen += 1
        ctx = RecordContext(path, where)
        try:
            if isinstance(record, DataError):
                raise record
            out.extend(convert(record, ctx))
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(e)
    if seen == 0:
        raise ChatsmithError(f"{path}: no records found (the file is empty)")
    if not out:
        raise ChatsmithError(f"{path}: all {len(skipped)} records are malformed; the first: {skipped[0]}")
    return out, skipped
