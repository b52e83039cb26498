"""`chatsmith data dedupe`: drop exact duplicates (same text after lower-casing and collapsing
whitespace) and, with `near`, near duplicates (MinHash LSH at a Jaccard threshold). The first
occurrence is kept; records stream through.

Memory: nothing of a record is kept but 64-bit keys (one per kept record for exact matching, plus
one per LSH band for near matching), in sorted numpy arrays merged from a small pending set, so a
million records need 8 MB for exact and 8 MB per band for near dedupe, whatever their length.
LSH candidates are treated as duplicates without a second exact comparison (which would need the
signatures of every kept record in memory); the bands are chosen so that the candidate curve
crosses the threshold steeply (see minhash.py).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from chatsmith.data.ops.minhash import MinHasher, band_keys, optimal_bands
from chatsmith.data.ops.stream import RecordWriter, good_records, record_text
from chatsmith.errors import ChatsmithError

_SPACE = re.compile(r"\s+")


class SeenKeys:
    """A set of 64-bit keys: a sorted numpy array plus a small pending Python set, merged when the
    pending set grows past `merge_every` (8 bytes a key instead of a Python int's ~70). Keys are
    added only when absent, so a merge is a sort of two sorted runs (timsort: linear)."""

    def __init__(self, merge_every: int = 8192) -> None:
        self.sorted = np.zeros(0, dtype=np.uint64)
        self.pending: set[int] = set()
        self.merge_every = merge_every

    def __len__(self) -> int:
        return len(self.sorted) + len(self.pending)

    def __contains__(self, key: int) -> bool:
        if key in self.pending:
            return True
        i = int(np.searchsorted(self.sorted, np.uint64(key)))
        return i < len(self.sorted) and int(self.sorted[i]) == key

    def add(self, key: int) -> None:
        """Add a key that is not in the set yet."""
        self.pending.add(key)
        if len(self.pending) >= self.merge_every:
            new = np.sort(np.fromiter(self.pending, dtype=np.uint64, count=len(self.pending)))
            self.sorted = np.sort(np.concatenate([self.sorted, new]), kind="stable")
            self.pending.clear()


def exact_key(text: str) -> int:
    """64 bits of BLAKE2 over the lower-cased, whitespace-collapsed text."""
    norm = _SPACE.sub(" ", text.lower()).strip()
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little")


def dedupe(input_path: str, output_path: str, *, near: bool = False, threshold: float = 0.8, num_perm: int = 128,
           ngram: int = 3, seed: int = 1, skip_bad: bool = False, removed_path: str | None = None,
           text_of: Callable[[Any], str] = record_text) -> dict[str, Any]:
    """Write `input_path`'s records without duplicates to `output_path`; returns counts."""
    if near and not 0 < threshold <= 1:
        raise ChatsmithError(f"--threshold must be in (0, 1], got {threshold}")
    exact = SeenKeys()
    bands_seen: list[SeenKeys] = []
    hasher = None
    bands = rows = 0
    if near:
        hasher = MinHasher(num_perm, seed, ngram)
        bands, rows = optimal_bands(threshold, num_perm)
        bands_seen = [SeenKeys() for _ in range(bands)]
    counts = {"read": 0, "written": 0, "exact_duplicates": 0, "near_duplicates": 0}
    removed = RecordWriter(removed_path) if removed_path else None
    bad: list[Any] = []
    with RecordWriter(output_path) as out:
        for _, rec in good_records(input_path, skip_bad, bad):
            counts["read"] += 1
            text = text_of(rec)
            key = exact_key(text)
            if key in exact:
                counts["exact_duplicates"] += 1
                if removed:
                    removed.write(rec)
                continue
            if hasher is not None:
                keys = [int(k) for k in band_keys(hasher.signature(text), bands, rows)]
                if any(k in seen for k, seen in zip(keys, bands_seen)):
                    counts["near_duplicates"] += 1
                    if removed:
                        removed.write(rec)
                    continue
                for k, seen in zip(keys, bands_seen):
                    seen.add(k)
            exact.add(key)
            out.write(rec)
            counts["written"] += 1
    if removed:
        removed.close()
    counts["unreadable_skipped"] = len(bad)
    if near:
        counts["lsh"] = {"threshold": threshold, "num_perm": num_perm, "bands": bands, "rows": rows, "ngram": ngram}
    return counts
