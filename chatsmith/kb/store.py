"""The knowledge base on disk: one SQLite file (standard library, no server) holding documents,
chunks, an FTS5 index for BM25 and each chunk's float32 embedding as a blob.

Why this and not a vector database: at 100K chunks the vectors are 150 MB, and a full scan of them
is one matrix-vector product (milliseconds; docs/benchmarks.md has the numbers), so an approximate
index would buy little and add a dependency and a second file to keep consistent.

Writes are safe across processes: WAL journal, a busy timeout, and each batch of documents
replaced in one `BEGIN IMMEDIATE` transaction (the embeddings are computed before it, so the
write lock is held for milliseconds). `generation` in the meta table grows with every write:
readers reload their vector matrix when it changes, and the response cache keys on it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
  id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, kind TEXT NOT NULL, title TEXT NOT NULL DEFAULT '',
  hash TEXT NOT NULL, size INTEGER NOT NULL, mtime REAL NOT NULL, chunks INTEGER NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
  id INTEGER PRIMARY KEY, doc INTEGER NOT NULL REFERENCES documents(id), ord INTEGER NOT NULL,
  heading TEXT NOT NULL, location TEXT NOT NULL, text TEXT NOT NULL, hash TEXT NOT NULL, tokens INTEGER NOT NULL,
  vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc);
CREATE INDEX IF NOT EXISTS chunks_hash ON chunks(hash);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
  text, heading, content='chunks', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
  INSERT INTO chunks_fts(rowid, text, heading) VALUES (new.id, new.text, new.heading); END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
  INSERT INTO chunks_fts(chunks_fts, rowid, text, heading) VALUES ('delete', old.id, old.text, old.heading); END;
"""


def missing_kb_message(path: str | Path) -> str:
    return (f"no knowledge base at {path}; create it with `chatsmith kb add {path} FILE_OR_FOLDER...` (text, "
            "Markdown, HTML, PDF and source code)")


@dataclass
class DocumentRow:
    """A document as stored: its absolute path, kind, content hash, size, mtime and chunk count."""

    id: int
    path: str
    kind: str
    title: str
    hash: str
    size: int
    mtime: float
    chunks: int
    added: float


@dataclass
class NewChunk:
    """A chunk to store (the vector is float32 bytes)."""

    ord: int
    heading: str
    location: str
    text: str
    hash: str
    tokens: int
    vector: bytes


class KnowledgeBase:
    """One knowledge-base file. `KnowledgeBase(path)` opens an existing one (ChatsmithError when
    there is none); `KnowledgeBase(path, create=True, model=NAME)` creates it when missing."""

    def __init__(self, path: str | Path, *, create: bool = False, model: str | None = None,
                 timeout: float = 120.0) -> None:
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise ChatsmithError(missing_kb_message(path))
            if not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
        elif self.path.is_dir():
            raise ChatsmithError(f"{path} is a directory; a knowledge base is one file (e.g. {path}.kb)")
        self._lock = threading.RLock()
        try:
            self.db = sqlite3.connect(str(self.path), timeout=timeout, check_same_thread=False,
                                      isolation_level=None)
            self.db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if create and "meta" not in tables:
                with self.write():
                    for stmt in SCHEMA.split(";\n"):
                        if stmt.strip():
                            self.db.execute(stmt)
                    self._set_default("schema", str(SCHEMA_VERSION))
                    self._set_default("embedding_model", model or "all-minilm-l6-v2")
                    self._set_default("generation", "0")
                    self._set_default("created", str(time.time()))
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise ChatsmithError(f"{path} is not a chatsmith knowledge base ({e})") from None
        if "chunks" not in tables or "meta" not in tables:
            raise ChatsmithError(f"{path} is not a chatsmith knowledge base (no chunks table); "
                                 + missing_kb_message(path).split("; ", 1)[1])
        self.model = self.meta("embedding_model") or "all-minilm-l6-v2"
        if model is not None and model != self.model:
            from chatsmith.embed import DEFAULT_MODEL

            if {model.lower(), self.model.lower()} != {DEFAULT_MODEL}:
                raise ChatsmithError(f"{path} was built with the embedding model '{self.model}', not '{model}'; "
                                     "use that model, or a new knowledge base file")
        self._matrix: Any = None
        self._ids: Any = None
        self._matrix_generation = -1
        self._counts: dict[str, int] = {}     # word -> chunks holding it (capped), for this generation
        self._counts_generation = -1

    # ---- transactions and meta -------------------------------------------------------------------

    def write(self) -> _Write:
        """`with kb.write():` one immediate (write-locked) transaction; the generation grows at its end."""
        return _Write(self)

    def _set_default(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @property
    def generation(self) -> int:
        """A number that grows with every write (cache keys and the in-memory vectors follow it)."""
        return int(self.meta("generation") or 0)

    def close(self) -> None:
        self.db.close()

    # ---- documents -------------------------------------------------------------------------------

    def documents(self, under: str | None = None) -> list[DocumentRow]:
        """Stored documents (by path), optionally only those at or under the absolute path `under`."""
        sql = "SELECT id, path, kind, title, hash, size, mtime, chunks, added FROM documents"
        args: tuple = ()
        if under is not None:
            sql += " WHERE path = ? OR substr(path, 1, ?) = ?"
            prefix = under.rstrip("/") + "/"
            args = (under, len(prefix), prefix)
        return [DocumentRow(*r) for r in self.db.execute(sql + " ORDER BY path", args)]

    def document(self, path: str) -> DocumentRow | None:
        r = self.db.execute("SELECT id, path, kind, title, hash, size, mtime, chunks, added FROM documents "
                            "WHERE path = ?", (path,)).fetchone()
        return DocumentRow(*r) if r else None

    def vectors_by_hash(self, hashes: list[str]) -> dict[str, bytes]:
        """Stored vectors of chunks with these hashes (unchanged chunks of a changed file keep theirs)."""
        out: dict[str, bytes] = {}
        for i in range(0, len(hashes), 500):
            part = hashes[i:i + 500]
            q = f"SELECT hash, vector FROM chunks WHERE hash IN ({','.join('?' * len(part))})"
            out.update(dict(self.db.execute(q, part).fetchall()))
        return out

    def replace_document(self, path: str, kind: str, title: str, hash: str, size: int, mtime: float,
                         chunks: list[NewChunk]) -> None:
        """Store a document and its chunks in place of any earlier version (inside `write()`)."""
        self._delete(path)
        cur = self.db.execute("INSERT INTO documents(path, kind, title, hash, size, mtime, chunks, added) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (path, kind, title, hash, size, mtime, len(chunks),
                                                                  time.time()))
        doc = cur.lastrowid
        self.db.executemany("INSERT INTO chunks(doc, ord, heading, location, text, hash, tokens, vector) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [(doc, c.ord, c.heading, c.location, c.text, c.hash, c.tokens, c.vector) for c in chunks])

    def touch(self, path: str, mtime: float) -> None:
        """Record a new mtime for an unchanged document (so the next run skips it without reading)."""
        self.db.execute("UPDATE documents SET mtime = ? WHERE path = ?", (mtime, path))

    def _delete(self, path: str) -> int:
        row = self.db.execute("SELECT id FROM documents WHERE path = ?", (path,)).fetchone()
        if row is None:
            return 0
        n = self.db.execute("DELETE FROM chunks WHERE doc = ?", (row[0],)).rowcount
        self.db.execute("DELETE FROM documents WHERE id = ?", (row[0],))
        return n

    def remove(self, path: str) -> tuple[int, int]:
        """Remove the document at the absolute `path`, or every document under it: (documents, chunks)."""
        docs = self.documents(under=path)
        chunks = 0
        if docs:
            with self.write():
                for d in docs:
                    chunks += self._delete(d.path)
        return len(docs), chunks

    # ---- reading ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Documents and chunks (by kind), tokens, the embedding model, the file's size on disk."""
        docs = self.db.execute("SELECT count(*), coalesce(sum(chunks), 0) FROM documents").fetchone()
        kinds = dict(self.db.execute("SELECT kind, count(*) FROM documents GROUP BY kind ORDER BY kind").fetchall())
        tokens = self.db.execute("SELECT coalesce(sum(tokens), 0), coalesce(avg(tokens), 0) FROM chunks").fetchone()
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {"path": str(self.path), "documents": docs[0], "chunks": docs[1], "kinds": kinds,
                "tokens": tokens[0], "mean_chunk_tokens": round(tokens[1], 1), "embedding_model": self.model,
                "generation": self.generation, "bytes": size}

    def chunk(self, chunk_id: int) -> dict[str, Any] | None:
        """One chunk with its document's path: {id, source, kind, heading, location, ord, text}."""
        r = self.db.execute("SELECT c.id, d.path, d.kind, c.heading, c.location, c.ord, c.text FROM chunks c "
                            "JOIN documents d ON d.id = c.doc WHERE c.id = ?", (chunk_id,)).fetchone()
        if r is None:
            return None
        return dict(zip(("id", "source", "kind", "heading", "location", "ord", "text"), r))

    def chunks_info(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """`chunk()` of many ids at once."""
        out: dict[int, dict[str, Any]] = {}
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            q = ("SELECT c.id, d.path, d.kind, c.heading, c.location, c.ord, c.text FROM chunks c JOIN documents d "
                 f"ON d.id = c.doc WHERE c.id IN ({','.join('?' * len(part))})")
            for r in self.db.execute(q, part):
                out[r[0]] = dict(zip(("id", "source", "kind", "heading", "location", "ord", "text"), r))
        return out

    def matrix(self) -> tuple[Any, Any]:
        """(chunk ids int64 (n,), vectors float32 (n, dim)) of every chunk, reloaded after writes."""
        import numpy as np

        with self._lock:
            gen = self.generation
            if gen != self._matrix_generation:
                ids, blobs = [], []
                for cid, blob in self.db.execute("SELECT id, vector FROM chunks ORDER BY id"):
                    ids.append(cid)
                    blobs.append(blob)
                if blobs:
                    dim = len(blobs[0]) // 4
                    matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)
                else:
                    matrix = np.zeros((0, 0), dtype=np.float32)
                self._ids, self._matrix, self._matrix_generation = np.array(ids, dtype=np.int64), matrix, gen
            return self._ids, self._matrix

    def common_words(self, words: list[str]) -> set[str]:
        """Those of `words` that more than half of the chunks contain. FTS5's BM25 gives such a word
        an IDF of almost nothing (log((N - n + 0.5) / (n + 0.5)) <= 0, clamped to 1e-6), so a query
        ranks the same without it, and skips reading its posting list, the longest there is (a query
        with one such word took 200 ms at 100K chunks instead of a few). Counting stops at N/2 + 1
        and each count is kept until the next write."""
        with self._lock:
            gen = self.generation
            if gen != self._counts_generation:
                self._counts = {"": self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]}
                self._counts_generation = gen
            half = self._counts[""] // 2
            for w in words:
                if w not in self._counts:
                    self._counts[w] = self.db.execute(
                        "SELECT count(*) FROM (SELECT 1 FROM chunks_fts WHERE chunks_fts MATCH ? LIMIT ?)",
                        (f'"{w}"', half + 1)).fetchone()[0]
            return {w for w in words if self._counts[w] > half}

    def integrity(self) -> list[str]:
        """Problems found by SQLite's and FTS5's integrity checks (empty when sound)."""
        problems = [r[0] for r in self.db.execute("PRAGMA integrity_check") if r[0] != "ok"]
        try:
            self.db.execute("INSERT INTO chunks_fts(chunks_fts, rank) VALUES ('integrity-check', 1)")
        except sqlite3.DatabaseError as e:
            problems.append(f"fts: {e}")
        counted = self.db.execute("SELECT (SELECT coalesce(sum(chunks), 0) FROM documents), (SELECT count(*) "
                                  "FROM chunks)").fetchone()
        if counted[0] != counted[1]:
            problems.append(f"documents list {counted[0]} chunks, the chunks table holds {counted[1]}")
        return problems


class _Write:
    def __init__(self, kb: KnowledgeBase) -> None:
        self.kb = kb

    def __enter__(self) -> KnowledgeBase:
        self.kb._lock.acquire()
        try:
            self.kb.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.kb._lock.release()
            raise
        return self.kb

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            db = self.kb.db
            if exc_type is None:
                if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
                    db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
                db.execute("COMMIT")
            else:
                db.execute("ROLLBACK")
        finally:
            self.kb._lock.release()
