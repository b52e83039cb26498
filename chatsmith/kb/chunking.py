"""Blocks -> chunks of at most `max_tokens` tokens (the embedding model's word pieces), with overlap.

A chunk never spans a heading or a PDF page: a new section starts a new chunk, and each chunk keeps
the path of headings above it ("Serving > Routes > /v1/embeddings") as context, which is both
indexed and embedded with it. Within a section, paragraphs and code blocks are packed whole; one
that is too long alone is split at sentences (prose) or lines (code), and only a single sentence or
line longer than a chunk is cut at words. The next chunk of a section starts with the last pieces
of the one before, up to `overlap` tokens, so an answer that straddles a cut is found whole in one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from chatsmith.kb.readers import Block

_SENTENCE = re.compile(r"(?<=[.!?;:])\s+(?=\S)|\n+")


@dataclass
class Chunk:
    """One retrievable piece: its text, heading path, where it starts (line or page) and its
    position in the document; `hash` identifies its text and heading (reused embeddings)."""

    text: str
    heading: str
    location: str
    ord: int
    tokens: int

    @property
    def hash(self) -> str:
        return hashlib.sha256(f"{self.heading}\x00{self.text}".encode()).hexdigest()[:32]

    def embedding_text(self) -> str:
        """What is embedded: the heading path as context, then the text."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


@dataclass
class _Piece:
    text: str
    tokens: int
    sep: str        # joins it to the piece before it in the same chunk
    line: int
    page: int


def chunk_blocks(blocks: list[Block], count_tokens: Callable[[str], int], max_tokens: int = 200,
                 overlap: int = 30) -> list[Chunk]:
    """Cut `blocks` into chunks (see the module docstring). `count_tokens(text)` counts tokens."""
    if max_tokens < 16:
        raise ValueError("max_tokens must be at least 16")
    overlap = max(0, min(overlap, max_tokens // 2))
    chunks: list[Chunk] = []
    stack: list[tuple[int, str]] = []
    section: list[_Piece] = []

    def flush() -> None:
        if section:
            heading = " > ".join(t for _, t in stack)
            for group in _pack(section, max_tokens, overlap):
                first = group[0]
                loc = f"page {first.page}" if first.page else (f"line {first.line}" if first.line else "")
                text = "".join((p.sep if i else "") + p.text for i, p in enumerate(group))
                chunks.append(Chunk(text, heading, loc, len(chunks), sum(p.tokens for p in group)))
            section.clear()

    for b in blocks:
        if b.kind == "heading":
            flush()
            while stack and stack[-1][0] >= b.level:
                stack.pop()
            stack.append((b.level, b.text))
        elif b.kind == "break":
            flush()
        elif b.text.strip():
            section.extend(_pieces(b, count_tokens, max_tokens))
    flush()
    return chunks


def _pieces(b: Block, count_tokens: Callable[[str], int], max_tokens: int) -> list[_Piece]:
    """A block as pieces of at most max_tokens: whole, else sentences (prose) or blank-line
    separated groups then lines (code), else words."""
    code = b.kind == "code"
    first_sep = "\n\n"
    n = count_tokens(b.text)
    if n <= max_tokens:
        return [_Piece(b.text, n, first_sep, b.line, b.page)]
    out: list[_Piece] = []
    parts = _split_keep(b.text, re.compile(r"\n\s*\n") if code else _SENTENCE)
    line = b.line
    for j, (orig_sep, part) in enumerate(parts):
        if b.line:
            line += orig_sep.count("\n")   # the line this part starts on
        tokens = count_tokens(part)
        sep = first_sep if j == 0 else orig_sep
        if tokens <= max_tokens:
            out.append(_Piece(part, tokens, sep, line, b.page))
        elif code and "\n" in part:
            sub = _pieces(Block("code", part, line=line, page=b.page), count_tokens, max_tokens) \
                if "\n\n" in part else _lines(part, count_tokens, max_tokens, line, b.page)
            sub[0].sep = sep
            out += sub
        else:
            words = _words(part, count_tokens, max_tokens, line, b.page)
            words[0].sep = sep
            out += words
        if b.line:
            line += part.count("\n")
    return out


def _split_keep(text: str, pattern: re.Pattern) -> list[tuple[str, str]]:
    """(separator before, part) pairs; the separators are kept so the text joins back as it was."""
    out: list[tuple[str, str]] = []
    pos, sep = 0, ""
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append((sep, text[pos:m.start()]))
            sep = m.group(0)
        else:
            sep += m.group(0)
        pos = m.end()
    if pos < len(text):
        out.append((sep, text[pos:]))
    return out


def _lines(text: str, count_tokens: Callable[[str], int], max_tokens: int, line: int, page: int) -> list[_Piece]:
    out: list[_Piece] = []
    for j, part in enumerate(text.split("\n")):
        tokens = count_tokens(part) if part.strip() else 0
        if tokens <= max_tokens:
            out.append(_Piece(part, tokens, "\n", line + j if line else 0, page))
        else:
            out += _words(part, count_tokens, max_tokens, line + j if line else 0, page, sep="\n")
    return out


def _words(text: str, count_tokens: Callable[[str], int], max_tokens: int, line: int, page: int,
           sep: str = " ") -> list[_Piece]:
    """A sentence or line longer than a chunk, cut at words (a single huge word at characters)."""
    out: list[_Piece] = []
    words = text.split(" ")
    cur: list[str] = []
    for w in words:
        candidate = " ".join(cur + [w])
        if cur and count_tokens(candidate) > max_tokens:
            piece = " ".join(cur)
            out.append(_Piece(piece, count_tokens(piece), sep if not out else " ", line, page))
            cur = [w]
        else:
            cur.append(w)
        while len(cur) == 1 and count_tokens(cur[0]) > max_tokens:   # one "word" longer than a chunk
            w = cur[0]
            cut = max(1, len(w) * max_tokens // (count_tokens(w) + 1))
            out.append(_Piece(w[:cut], count_tokens(w[:cut]), sep if not out else " ", line, page))
            cur = [w[cut:]] if w[cut:] else []
    if cur:
        piece = " ".join(cur)
        out.append(_Piece(piece, count_tokens(piece), sep if not out else " ", line, page))
    return out


def _pack(pieces: list[_Piece], max_tokens: int, overlap: int) -> list[list[_Piece]]:
    """Pieces of one section -> groups of at most max_tokens, each group after the first starting
    with the last pieces of the one before (at most `overlap` tokens, never the whole group)."""
    groups: list[list[_Piece]] = []
    cur: list[_Piece] = []
    total = 0
    fresh = 0   # pieces of `cur` that are not overlap from the previous group
    for p in pieces:
        if cur and total + p.tokens > max_tokens and fresh:
            groups.append(cur)
            tail: list[_Piece] = []
            kept = 0
            for q in reversed(cur[1:]):
                if kept + q.tokens > overlap:
                    break
                tail.insert(0, q)
                kept += q.tokens
            if kept + p.tokens > max_tokens:
                tail, kept = [], 0
            cur, total, fresh = tail, kept, 0
        cur.append(p)
        total += p.tokens
        fresh += 1
    if cur and fresh:
        groups.append(cur)
    return groups
