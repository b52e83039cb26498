"""`chatsmith data mix | sample | split | filter`, streaming.

Choosing records by index needs the record count first, so mix, sample and split read their input
twice: once to count, once to copy the chosen records. What stays in memory is one small integer
per input record (how often it is chosen, or which split it goes to), never the records; a
shuffle goes through temporary bucket files (Rao's two-pass shuffle: scatter records to random
buckets, then shuffle each bucket in memory), so memory holds one bucket (32 MB of records by default).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chatsmith.data.mixing import mixture_sizes
from chatsmith.data.ops.stream import RecordWriter, count_records, good_records, numbered_records, record_text
from chatsmith.errors import ChatsmithError

# ---- choosing records ------------------------------------------------------------------------------

def multiplicities(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of `size` records is taken to make `count`: every record once per whole
    pass, the remainder without replacement (as data/mixing.py's sample_indices)."""
    if size == 0:
        return np.zeros(0, dtype=np.uint16)
    full, rest = divmod(count, size)
    if full > 65000:
        raise ChatsmithError(f"cannot take {count} records from {size}: more than 65000 copies of each")
    m = np.full(size, full, dtype=np.uint16)
    if rest:
        m[rng.choice(size, rest, replace=False)] += 1
    return m


class ExternalShuffle:
    """Collects JSON lines, then yields them in a uniformly random order with about `bucket_bytes`
    of them in memory at once (`expected_bytes`: about how much will be added)."""

    def __init__(self, expected_bytes: int, seed: int, bucket_bytes: int = 32 << 20, tmpdir: str | None = None) -> None:
        self.rng = random.Random(seed)
        self.n_buckets = max(1, math.ceil(expected_bytes / bucket_bytes))
        self.dir = tempfile.TemporaryDirectory(prefix="chatsmith-shuffle-", dir=tmpdir)
        self.files = [open(os.path.join(self.dir.name, f"{i}.jsonl"), "w+", encoding="utf-8")
                      for i in range(self.n_buckets)]

    def add(self, line: str) -> None:
        self.files[self.rng.randrange(self.n_buckets)].write(line + "\n")

    def __iter__(self) -> Iterator[str]:
        try:
            for f in self.files:
                f.seek(0)
                lines = f.read().splitlines()
                self.rng.shuffle(lines)
                yield from lines
                del lines
                f.close()
        finally:
            for f in self.files:
                f.close()
            self.dir.cleanup()


# ---- mix ---------------------------------------------------------------------------------------------

def mix(sources: Sequence[tuple[str, float | None]], output_path: str, *, counts: bool = False,
        total: int | None = None, seed: int = 0, shuffle: bool = True, tag_source: bool = False,
        skip_bad: bool = False, bucket_bytes: int = 32 << 20) -> dict[str, Any]:
    """Mix files by ratio (weights, as `--data a:0.7 b:0.3`; the mixture has `total` records, by
    default as many as all sources together) or by record counts (`counts`). Sources too small for
    their share are upsampled (whole passes first). Seeded; shuffled unless `shuffle` is False."""
    if not sources:
        raise ChatsmithError("data mix needs at least one source: FILE[:RATIO] (or FILE:COUNT with --counts)")
    sizes = [count_records(p) for p, _ in sources]
    for (p, _), n in zip(sources, sizes):
        if n == 0:
            raise ChatsmithError(f"{p}: no records in it")
    numbers = [w for _, w in sources]
    if counts:
        if any(w is None or w < 0 or w != int(w) for w in numbers):
            raise ChatsmithError("with --counts every source needs a whole number of records: FILE:COUNT")
        wanted = [int(w) for w in numbers]
    else:
        wanted = mixture_sizes(sizes, numbers)
        if total is not None:
            ws = [1.0 if w is None else float(w) for w in numbers]
            wanted = [round(w / sum(ws) * total) for w in ws]
    rng = np.random.default_rng(seed)
    chosen = [multiplicities(size, n, rng) for size, n in zip(sizes, wanted)]
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)   # the shuffle's buckets go beside the output
    expected_bytes = sum(Path(p).stat().st_size * n // max(1, size) for (p, _), size, n in zip(sources, sizes, wanted))
    shuffler = ExternalShuffle(expected_bytes, seed, bucket_bytes, str(Path(output_path).parent)) if shuffle else None
    with RecordWriter(output_path) as out:
        for (path, _), mult in zip(sources, chosen):
            for i, rec in numbered_records(path, skip_bad):
                if i >= len(mult) or not mult[i]:
                    continue
                if tag_source and isinstance(rec, dict):
                    rec = {**rec, "source": path}
                line = json.dumps(rec, ensure_ascii=False)
                for _ in range(int(mult[i])):
                    shuffler.add(line) if shuffler else out.write_json(line)
        if shuffler:
            for line in shuffler:
                out.write_json(line)
        written = out.count
    return {"written": written, "sources": [{"path": p, "records": s, "taken": n, "upsampled": n > s}
                                            for (p, _), s, n in zip(sources, sizes, wanted)]}


# ---- sample and split --------------------------------------------------------------------------------

def _how_many(value: float, size: int, flag: str) -> int:
    if value < 0:
        raise ChatsmithError(f"{flag} must not be negative, got {value}")
    n = int(value) if value >= 1 else round(value * size)
    if value >= 1 and value != int(value):
        raise ChatsmithError(f"{flag} {value}: a fraction below 1 or a whole number of records")
    return n


def sample(input_path: str, output_path: str, *, n: float, seed: int = 0, skip_bad: bool = False) -> dict[str, Any]:
    """A uniform sample without replacement, `n` records (or a fraction when below 1), in file order."""
    size = count_records(input_path)
    k = _how_many(n, size, "--n")
    if k > size:
        raise ChatsmithError(f"--n {k}: the file has only {size} records (use data mix to upsample)")
    keep = np.zeros(size, dtype=bool)
    keep[np.random.default_rng(seed).choice(size, k, replace=False)] = True
    with RecordWriter(output_path) as out:
        for i, rec in numbered_records(input_path, skip_bad):
            if i < size and keep[i]:
                out.write(rec)
    return {"read": size, "written": out.count}


def split(input_path: str, output_dir: str, *, test: float, valid: float = 0.0, seed: int = 0,
          skip_bad: bool = False) -> dict[str, Any]:
    """train/valid/test files in `output_dir` (same extension as the input); sizes are fractions
    (below 1) or counts, chosen at random with `seed`; each file keeps the input's order."""
    size = count_records(input_path)
    n_test, n_valid = _how_many(test, size, "--test-size"), _how_many(valid, size, "--valid-size")
    if n_test + n_valid >= size:
        raise ChatsmithError(f"--test-size and --valid-size take {n_test + n_valid} of {size} records: nothing left "
                             "to train on")
    where = np.zeros(size, dtype=np.uint8)          # 0 train, 1 valid, 2 test
    order = np.random.default_rng(seed).permutation(size)
    where[order[:n_test]] = 2
    where[order[n_test:n_test + n_valid]] = 1
    suffix = ".json" if Path(input_path).suffix.lower() == ".json" else ".jsonl"
    names = ["train", "valid", "test"]
    writers = [RecordWriter(str(Path(output_dir) / f"{name}{suffix}")) if name != "valid" or n_valid else None
               for name in names]
    try:
        for i, rec in numbered_records(input_path, skip_bad):
            w = writers[where[i]] if i < size else None
            if w is not None:
                w.write(rec)
    finally:
        for w in writers:
            if w is not None:
                w.close()
    return {name: {"path": str(w.path), "records": w.count} for name, w in zip(names, writers) if w is not None}


# ---- filter ------------------------------------------------------------------------------------------

# A predicate looks at a batch of records and returns, for each, None (keep) or the reason to drop it.
BatchPredicate = Callable[[list[Any]], list[str | None]]


def filter_records(input_path: str, output_path: str, predicates: Sequence[tuple[str, BatchPredicate]], *,
                   batch_size: int = 256, rejected_path: str | None = None, skip_bad: bool = False) -> dict[str, Any]:
    """Keep the records every predicate keeps, in order; batches of `batch_size` records go
    through the predicates in turn (a later predicate sees only what earlier ones kept). Returns
    counts, with the drops by reason."""
    reasons: Counter = Counter()
    read = 0
    rejected = RecordWriter(rejected_path) if rejected_path else None
    with RecordWriter(output_path) as out:
        for batch in _batches(good_records(input_path, skip_bad), batch_size):
            read += len(batch)
            alive = list(batch)
            for name, pred in predicates:
                if not alive:
                    break
                verdicts = pred(alive)
                kept = []
                for rec, why in zip(alive, verdicts):
                    if why is None:
                        kept.append(rec)
                    else:
                        reasons[f"{name}: {why}"] += 1
                        if rejected:
                            rejected.write({"record": rec, "rejected": f"{name}: {why}"})
                alive = kept
            for rec in alive:
                out.write(rec)
    if rejected:
        rejected.close()
    return {"read": read, "written": out.count, "dropped": dict(sorted(reasons.items()))}


def _batches(records: Iterable[tuple[str, Any]], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for _, rec in records:
        batch.append(rec)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def regex_predicate(pattern: str, keep_matching: bool) -> BatchPredicate:
    """Drop records whose text matches `pattern` (or, with keep_matching, that do not)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ChatsmithError(f"--{'keep' if keep_matching else 'drop'}-regex {pattern!r}: {e}") from None

    def pred(batch: list[Any]) -> list[str | None]:
        out = []
        for rec in batch:
            hit = rx.search(record_text(rec)) is not None
            out.append(None if hit == keep_matching else ("no match" if keep_matching else "matches"))
        return out

    return pred


def token_length_predicate(tokenizer: Any, *, min_tokens: int | None, max_tokens: int | None,
                           template: str | None = None) -> BatchPredicate:
    """Drop records whose conversation, rendered by the model's chat template, has fewer than
    `min_tokens` or more than `max_tokens` tokens (records that are not conversations: their text)."""
    from chatsmith.data.ops.convert import record_conversation
    from chatsmith.data.template import render_conversation

    def pred(batch: list[Any]) -> list[str | None]:
        out = []
        for rec in batch:
            conv = record_conversation(rec)
            if conv is None:
                n = len(tokenizer(record_text(rec), add_special_tokens=False)["input_ids"])
            else:
                n = len(render_conversation(tokenizer, conv, template=template).input_ids)
            if max_tokens is not None and n > max_tokens:
                out.append(f"longer than {max_tokens} tokens")
            elif min_tokens is not None and n < min_tokens:
                out.append(f"shorter than {min_tokens} tokens")
            else:
                out.append(None)
        return out

    return pred


def language_predicate(languages: Sequence[str]) -> BatchPredicate:
    """Keep records whose text is in one of `languages` (see data/ops/language.py)."""
    from chatsmith.data.ops.language import KNOWN, detect_language

    unknown = [lang for lang in languages if lang not in KNOWN]
    if unknown:
        raise ChatsmithError(f"--lang {','.join(unknown)}: known languages are {', '.join(sorted(KNOWN))}")

    def pred(batch: list[Any]) -> list[str | None]:
        out = []
        for rec in batch:
            lang = detect_language(record_text(rec))
            out.append(None if lang in languages else f"language {lang}")
        return out

    return pred
