"""The response cache: an exact tier and an opt-in semantic tier, persisted in one SQLite file.

Exact: the key is a hash of everything that shapes the answer (model, adapter, the server's
fingerprint, every sampling setting) and the whole rendered prompt, so a different system prompt
or an earlier turn is a different key, never only the last message (GPTCache issues #8, #526, #373).

Semantic: a conversation whose earlier part (system prompt and every turn before the last user
message) and settings are identical to a cached one's, and whose last user message embeds close
enough (cosine >= threshold), gets that answer, but only if the guard (cache/guard.py) finds no
difference in negation, numbers, names, quoted strings or opposite words.

Entries expire after `ttl` seconds; past `max_entries` the least recently used are evicted.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatsmith.cache.guard import Features, features, refusal

DEFAULT_THRESHOLD = 0.80
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
  key TEXT PRIMARY KEY, grp TEXT, last TEXT, vector BLOB, response TEXT NOT NULL,
  created REAL NOT NULL, used REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS entries_used ON entries(used);
"""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


@dataclass
class CacheKey:
    """What a request is cached under. `exact`: hash of the settings and the whole prompt.
    `group`: hash of the settings and the conversation before its last user message (None when
    the conversation does not end with one: no semantic lookup). `last`: that message's text."""

    exact: str
    group: str | None
    last: str | None
    vector: Any = None          # the embedding of `last`, computed once per request
    _features: Features | None = None

    @classmethod
    def from_messages(cls, settings: dict[str, Any], messages: list[dict[str, Any]], prompt: Any) -> CacheKey:
        """`settings`: everything but the prompt that changes the answer; `messages`: the
        conversation as [{role, content}]; `prompt`: the rendered prompt (text or token ids)."""
        exact = _digest({"settings": settings, "prompt": prompt})
        if messages and messages[-1].get("role") == "user":
            context = [(m.get("role"), m.get("content")) for m in messages[:-1]]
            return cls(exact, _digest({"settings": settings, "context": context}), str(messages[-1].get("content")))
        return cls(exact, None, None)

    @property
    def features(self) -> Features:
        if self._features is None:
            self._features = features(self.last or "")
        return self._features


@dataclass
class CacheHit:
    """A cached response: its tier ("exact" or "semantic"), the cosine of the match (1.0 for
    exact), its age in seconds, and the prompt it was cached for (semantic hits)."""

    response: dict[str, Any]
    tier: str
    similarity: float
    age: float
    cached_prompt: str | None = None


@dataclass
class Lookup:
    """A lookup's outcome: the hit (or None) and, for a miss, why a close entry was refused."""

    hit: CacheHit | None
    refused: str | None = None


@dataclass
class _Entry:
    key: str
    vector: Any
    features: Features
    last: str
    created: float


@dataclass
class ResponseCache:
    """Exact and semantic response cache over one SQLite file (`path` None: in memory)."""

    path: str | Path | None
    semantic: bool = False
    threshold: float = DEFAULT_THRESHOLD
    ttl: float | None = None
    max_entries: int = 10_000
    embedder: Any = None
    guard: bool = True
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import numpy as np

        self._np = np
        self._lock = threading.RLock()
        if self.path is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(":memory:" if self.path is None else str(self.path), check_same_thread=False,
                                  isolation_level=None, timeout=30)
        if self.path is not None:
            self.db.execute("PRAGMA journal_mode = WAL")
        self.db.executescript(SCHEMA)
        self._groups: dict[str, dict[str, _Entry]] = {}
        self._expire()
        if self.semantic:
            for key, grp, last, blob, created in self.db.execute(
                    "SELECT key, grp, last, vector, created FROM entries WHERE vector IS NOT NULL"):
                self._index(key, grp, last, np.frombuffer(blob, dtype=np.float32), created)

    # ---- public ----------------------------------------------------------------------------------

    def lookup(self, key: CacheKey) -> Lookup:
        """The exact entry for `key`, else (semantic tier) the closest guarded one, else a miss."""
        now = time.time()
        with self._lock:
            row = self.db.execute("SELECT response, created FROM entries WHERE key = ?", (key.exact,)).fetchone()
            if row is not None and not self._expired(row[1], now):
                self._touch(key.exact, now)
                self._count("exact")
                return Lookup(CacheHit(json.loads(row[0]), "exact", 1.0, now - row[1]))
            if row is not None:
                self._delete([key.exact])
        if not self.semantic or key.group is None:
            self._count("miss")
            return Lookup(None)
        with self._lock:
            group = list(self._groups.get(key.group, {}).values())
        if not group:
            self._count("miss")
            return Lookup(None)
        vec = self._vector(key)
        np = self._np
        sims = np.stack([e.vector for e in group]) @ vec
        refused = None
        for i in np.argsort(-sims):
            if sims[i] < self.threshold:
                break
            e = group[int(i)]
            if self._expired(e.created, now):
                continue
            why = refusal(e.features, key.features) if self.guard else None
            if why is not None:
                refused = refused or why
                continue
            with self._lock:
                row = self.db.execute("SELECT response, created FROM entries WHERE key = ?", (e.key,)).fetchone()
                if row is None:
                    continue
                self._touch(e.key, now)
            self._count("semantic")
            return Lookup(CacheHit(json.loads(row[0]), "semantic", float(sims[i]), now - row[1], e.last))
        self._count("miss")
        if refused:
            self._count("refused_" + refused)
        return Lookup(None, refused)

    def store(self, key: CacheKey, response: dict[str, Any]) -> int:
        """Cache `response` under `key`; returns how many entries were evicted to make room."""
        vec = self._vector(key) if self.semantic and key.group is not None else None
        now = time.time()
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO entries(key, grp, last, vector, response, created, used) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (key.exact, key.group, key.last, None if vec is None else vec.astype("<f4").tobytes(),
                             json.dumps(response, ensure_ascii=False), now, now))
            if vec is not None:
                self._index(key.exact, key.group, key.last, vec, now)
            self._count("stored")
            evicted = self._evict()
        return evicted

    def __len__(self) -> int:
        """Entries that have not expired."""
        oldest = -1.0 if self.ttl is None else time.time() - self.ttl
        with self._lock:
            return self.db.execute("SELECT count(*) FROM entries WHERE created >= ?", (oldest,)).fetchone()[0]

    def clear(self) -> None:
        with self._lock:
            self.db.execute("DELETE FROM entries")
            self._groups.clear()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # ---- internals -------------------------------------------------------------------------------

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def _vector(self, key: CacheKey) -> Any:
        if key.vector is None:
            if self.embedder is None:
                from chatsmith.embed import shared_embedder

                self.embedder = shared_embedder()
            key.vector = self.embedder.encode_array([key.last or ""])[0]
        return key.vector

    def _index(self, key: str, grp: str | None, last: str | None, vec: Any, created: float) -> None:
        if grp is None:
            return
        self._groups.setdefault(grp, {})[key] = _Entry(key, vec, features(last or ""), last or "", created)

    def _expired(self, created: float, now: float) -> bool:
        return self.ttl is not None and now - created > self.ttl

    def _touch(self, key: str, now: float) -> None:
        self.db.execute("UPDATE entries SET used = ?, hits = hits + 1 WHERE key = ?", (now, key))

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            self.db.execute(f"DELETE FROM entries WHERE key IN ({','.join('?' * len(part))})", part)
        gone = set(keys)
        for grp in list(self._groups):
            entries = self._groups[grp]
            for k in gone & entries.keys():
                del entries[k]
            if not entries:
                del self._groups[grp]

    def _expire(self) -> int:
        if self.ttl is None:
            return 0
        keys = [r[0] for r in self.db.execute("SELECT key FROM entries WHERE created < ?", (time.time() - self.ttl,))]
        self._delete(keys)
        self._count("expired", len(keys))
        return len(keys)

    def _evict(self) -> int:
        n = self.db.execute("SELECT count(*) FROM entries").fetchone()[0]
        if n <= self.max_entries:
            return 0
        expired = self._expire()
        n -= expired
        if n <= self.max_entries:
            return expired
        keys = [r[0] for r in self.db.execute("SELECT key FROM entries ORDER BY used LIMIT ?", (n - self.max_entries,))]
        self._delete(keys)
        self._count("evicted", len(keys))
        return expired + len(keys)
