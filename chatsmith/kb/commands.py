"""What `chatsmith kb add|query|list|remove|stats` print (the CLI parses; this module runs and shows)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path
from typing import TextIO

from chatsmith.kb.store import KnowledgeBase


def shown_path(path: str) -> str:
    """A stored absolute path as the user would type it: relative when under the current folder."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def run_add(kb: str, paths: list[str], *, chunk_tokens: int, overlap: int, model: str | None,
            quiet: bool = False, out: TextIO | None = None) -> int:
    from chatsmith.kb.ingest import add_paths

    out = out or sys.stdout
    report = add_paths(kb, paths, model=model, chunk_tokens=chunk_tokens, overlap=overlap, progress=not quiet)
    out.write(report.summary() + "\n")
    if report.skipped:
        out.write(f"skipped {len(report.skipped)} file{'s' if len(report.skipped) != 1 else ''} (reasons above)\n")
    nothing_done = report.added + report.updated + report.unchanged + report.removed == 0
    return 1 if report.skipped and nothing_done else 0


def run_query(kb: str, question: str, *, k: int, mode: str, as_json: bool, out: TextIO | None = None) -> int:
    from chatsmith.kb.search import search

    out = out or sys.stdout
    base = KnowledgeBase(kb)
    hits = search(base, question, k=k, mode=mode)
    if as_json:
        out.write(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2) + "\n")
        return 0
    if not hits:
        out.write("no matching chunks\n")
        return 0
    for i, h in enumerate(hits, 1):
        where = " > ".join(x for x in (h.heading,) if x)
        loc = f" ({h.location})" if h.location else ""
        bm = f"{h.bm25:.2f}" + (f" #{h.bm25_rank}" if h.bm25_rank else "") if h.bm25 is not None else "-"
        cos = f"{h.cosine:.3f}" + (f" #{h.vector_rank}" if h.vector_rank else "") if h.cosine is not None else "-"
        out.write(f"[{i}] {shown_path(h.source)}{loc}" + (f"  {where}" if where else "") + "\n")
        out.write(f"    {mode} {h.score:.4f}   bm25 {bm}   cosine {cos}\n")
        body = " ".join(h.text.split())
        out.write(textwrap.indent(textwrap.fill(body[:400] + ("..." if len(body) > 400 else ""), 100), "    ") + "\n\n")
    return 0


def run_list(kb: str, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    docs = KnowledgeBase(kb).documents()
    for d in docs:
        out.write(f"{d.chunks:6d} chunks  {d.kind:8s}  {shown_path(d.path)}\n")
    out.write(f"{len(docs)} document{'s' if len(docs) != 1 else ''}, {sum(d.chunks for d in docs)} chunks\n")
    return 0


def run_remove(kb: str, paths: list[str], out: TextIO | None = None) -> int:
    out = out or sys.stdout
    base = KnowledgeBase(kb)
    status = 0
    for p in paths:
        target = Path(p).expanduser()
        key = str(target.resolve() if target.exists() else target.absolute())
        docs, chunks = base.remove(key)
        if docs == 0:
            sys.stderr.write(f"{p}: no document at or under this path in {kb} (`chatsmith kb list {kb}` shows them)\n")
            status = 1
        else:
            out.write(f"removed {docs} document{'s' if docs != 1 else ''} ({chunks} chunks) at {p}\n")
    return status


def run_stats(kb: str, as_json: bool = False, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    s = KnowledgeBase(kb).stats()
    if as_json:
        out.write(json.dumps(s, indent=2) + "\n")
        return 0
    kinds = ", ".join(f"{n} {k}" for k, n in s["kinds"].items()) or "none"
    out.write(f"{s['path']}: {s['documents']} documents ({kinds}), {s['chunks']} chunks, {s['tokens']} tokens "
              f"(mean {s['mean_chunk_tokens']} per chunk)\n")
    out.write(f"embedding model {s['embedding_model']}; {s['bytes'] / 2**20:.1f} MB on disk; generation "
              f"{s['generation']}\n")
    return 0
