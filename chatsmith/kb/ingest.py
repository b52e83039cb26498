"""`chatsmith kb add`: files and folders -> chunks with embeddings in a knowledge base.

A re-run reads only what changed: a file whose size and mtime match the stored ones is skipped
unread; one whose content hash matches is only re-stamped; a changed file is re-chunked, and its
chunks whose text did not change keep their stored vectors (only new text is embedded). Documents
under a folder given again that are no longer on disk are dropped. A file that cannot be read is
reported by name with the reason and skipped; the summary counts them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from chatsmith.errors import ChatsmithError
from chatsmith.kb.chunking import Chunk, chunk_blocks
from chatsmith.kb.readers import UnreadableFile, kind_of, read_bytes, read_document
from chatsmith.kb.store import KnowledgeBase, NewChunk

SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox", ".mypy_cache",
             ".pytest_cache", ".ruff_cache", "dist", "build", ".idea", ".vscode"}
BATCH_CHUNKS = 256   # chunks embedded (and documents written) together


@dataclass
class IngestReport:
    """What one `add` did: file counts by outcome, chunks embedded and stored, skipped files with reasons."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks: int = 0            # chunks stored for added and updated files
    embedded: int = 0          # of which newly embedded (the rest reused a stored vector)
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def chunks_per_second(self) -> float:
        return self.chunks / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        files = self.added + self.updated + self.unchanged + len(self.skipped)
        text = (f"{files} file{'s' if files != 1 else ''}: {self.added} added, {self.updated} updated, "
                f"{self.unchanged} unchanged, {self.removed} removed, {len(self.skipped)} skipped; "
                f"{self.chunks} chunks stored ({self.embedded} embedded) in {self.seconds:.1f} s")
        if self.chunks and self.seconds > 0:
            text += f" ({self.chunks_per_second:.1f} chunks/s)"
        return text


@dataclass
class _Pending:
    path: str
    kind: str
    title: str
    hash: str
    size: int
    mtime: float
    chunks: list[Chunk]
    update: bool


def walk(paths: list[str | Path]) -> tuple[list[Path], list[Path], list[tuple[str, str]]]:
    """(files to ingest, folders given, problems): folders are walked (hidden and build folders
    skipped); files of unsupported types inside folders are left out silently, named ones are not."""
    files: list[Path] = []
    roots: list[Path] = []
    problems: list[tuple[str, str]] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            root = path.resolve()
            roots.append(root)
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
                for name in sorted(filenames):
                    f = Path(dirpath) / name
                    if not name.startswith(".") and kind_of(f) is not None:
                        files.append(f)
        elif path.is_file():
            files.append(path.resolve())
        elif path.exists():
            problems.append((str(p), "not a regular file"))
        else:
            files.append(path.absolute())   # gone: dropped from the KB if it was there, else reported
    return list(dict.fromkeys(files)), roots, problems


def add_paths(kb_path: str | Path, paths: list[str | Path], *, embedder: Any = None, model: str | None = None,
              chunk_tokens: int = 200, overlap: int = 30, progress: bool = True, out: TextIO | None = None,
              batch_chunks: int = BATCH_CHUNKS) -> IngestReport:
    """Ingest files and folders into the knowledge base at `kb_path` (created when missing).
    Unreadable files are reported on `out` (stderr) and skipped; returns the report."""
    out = out if out is not None else sys.stderr
    start = time.monotonic()
    kb = KnowledgeBase(kb_path, create=True, model=model)
    if embedder is None:
        from chatsmith.embed import shared_embedder

        embedder = shared_embedder(kb.model)
    if chunk_tokens + 24 > embedder.max_length:
        raise ChatsmithError(f"--chunk-tokens {chunk_tokens} does not fit the embedding model's window of "
                             f"{embedder.max_length} tokens with its heading path; use at most {embedder.max_length - 24}")
    report = IngestReport()
    files, roots, problems = walk(paths)
    for name, reason in problems:
        _skip(report, out, name, reason)
    seen: set[str] = set()
    pending: list[_Pending] = []
    n_pending = 0
    count = embedder.count_tokens
    for f in files:
        key = str(f)
        seen.add(key)
        old = kb.document(key)
        if not f.exists():
            if old is not None:
                report.removed += kb.remove(key)[0]
            else:
                _skip(report, out, key, "no such file or folder")
            continue
        try:
            st = f.stat()
            if old is not None and old.size == st.st_size and abs(old.mtime - st.st_mtime) < 1e-6:
                report.unchanged += 1
                continue
            data = read_bytes(f)
            digest = hashlib.sha256(data).hexdigest()
            if old is not None and old.hash == digest:
                with kb.write():
                    kb.touch(key, st.st_mtime)
                report.unchanged += 1
                continue
            doc = read_document(f, data)
            chunks = chunk_blocks(doc.blocks, count, chunk_tokens, overlap)
            if not chunks:
                raise UnreadableFile("has no text to index")
        except UnreadableFile as e:
            _skip(report, out, key, str(e))
            continue
        except Exception as e:   # a reader's bug must not end the run for every other file
            _skip(report, out, key, f"could not be read ({type(e).__name__}: {str(e)[:200]})")
            continue
        pending.append(_Pending(key, doc.kind, doc.title, digest, st.st_size, st.st_mtime, chunks, old is not None))
        n_pending += len(chunks)
        if n_pending >= batch_chunks:
            _store(kb, embedder, pending, report, progress)
            pending, n_pending = [], 0
    if pending:
        _store(kb, embedder, pending, report, progress)
    # Documents under a folder given again that are gone from the disk.
    for root in roots:
        for d in kb.documents(under=str(root)):
            if d.path not in seen and not Path(d.path).exists():
                report.removed += kb.remove(d.path)[0]
    report.seconds = time.monotonic() - start
    kb.close()
    return report


def _skip(report: IngestReport, out: TextIO, name: str, reason: str) -> None:
    report.skipped.append((name, reason))
    out.write(f"skipped {name}: {reason}\n")
    out.flush()


def _store(kb: KnowledgeBase, embedder: Any, pending: list[_Pending], report: IngestReport, progress: bool) -> None:
    """Embed the new chunks of `pending` documents (stored vectors of unchanged chunk texts are
    reused) and write the documents in one transaction."""
    all_chunks = [c for p in pending for c in p.chunks]
    known = kb.vectors_by_hash(list({c.hash for c in all_chunks}))
    todo = list({c.hash: c for c in all_chunks if c.hash not in known}.values())
    if todo:
        vectors = embedder.encode_array([c.embedding_text() for c in todo], progress="embedding" if progress else None)
        for c, v in zip(todo, vectors):
            known[c.hash] = v.astype("<f4").tobytes()
    with kb.write():
        for p in pending:
            current = kb.document(p.path)
            if current is not None and current.hash == p.hash:   # another process stored this version meanwhile
                report.unchanged += 1
                continue
            kb.replace_document(p.path, p.kind, p.title, p.hash, p.size, p.mtime,
                                [NewChunk(c.ord, c.heading, c.location, c.text, c.hash, c.tokens, known[c.hash])
                                 for c in p.chunks])
            report.chunks += len(p.chunks)
            if p.update:
                report.updated += 1
            else:
                report.added += 1
    report.embedded += len(todo)
