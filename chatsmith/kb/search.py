"""Hybrid retrieval: BM25 (SQLite FTS5) and vector search (cosine over the stored float32 vectors),
fused by a convex combination of their normalised scores, with questions that name something
exactly answered first from the chunks that hold it.

BM25 finds what embeddings blur (exact names, error codes, numbers); vectors find what words miss
(paraphrases). Textbook reciprocal rank fusion (RRF, k = 60) lost on the built-in set to the better
single method on paraphrases (docs/benchmarks.md): it throws the scores away, so a chunk that vectors
put far ahead of the rest loses to chunks both lists rank a few places down. The fusion here keeps
the scores (the convex combination that Bruch, Gai and Ingber, "An Analysis of Fusion Functions for
Hybrid Retrieval", 2023, found better than RRF):

    score = 0.5 * c * bm25' + 0.5 * cosine'

- bm25' and cosine' are min-max normalised over each list's candidates (the best 50), so both lie
  in 0..1 and the best of each list gets 1;
- c is the share of the question's words (stopwords left out) that the chunk contains: BM25 ranks
  a chunk sharing one common word with a paraphrased question as confidently as a real match,
  and c discounts it by exactly what it misses;
- the two halves weigh the same (0.5 is not fitted to any data);
- a question that names something exactly (a code like E-4012, a number, an identifier like
  max_tokens, an option like --max-queue, a quoted phrase) is answered first from the chunks that
  contain all of it (a tier above the rest, ordered by the same score): a chunk about another
  code can be closer in meaning, never a better answer.

How this was chosen without fitting the numbers we report: the built-in set is split in two
(every other question of each type); the fusion family and its settings were picked on the tuning
half only, and docs/benchmarks.md reports the held-out half beside the whole set.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from chatsmith.kb.store import KnowledgeBase

MODES = ("hybrid", "bm25", "vector")
BM25_SHARE = 0.5   # the lexical half of the convex combination (equal weights: not fitted)
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


def query_words(text: str) -> list[str]:
    """The words of a question that search uses: lower-cased, stopwords left out (all of them
    when nothing else is left), each once, at most 64."""
    words = [w for w in re.findall(r"[^\W_]+", text.lower()) if w not in STOPWORDS]
    if not words:
        words = re.findall(r"[^\W_]+", text.lower())
    return list(dict.fromkeys(words))[:64]


def fts_query(text: str, *, without: set[str] | frozenset[str] = frozenset()) -> str | None:
    """An FTS5 query for free text: its words (`query_words`) except those in `without`, each
    quoted, joined by OR (None when nothing is left). Quoting makes FTS5's syntax characters plain text."""
    seen = [w for w in query_words(text) if w not in without]
    return " OR ".join(f'"{w}"' for w in seen) if seen else None


_EXACT = re.compile(r'"([^"]{2,})"|\u201c([^\u201d]{2,})\u201d|`([^`]{2,})`|'
                    r"(\S*\d\S*|\b[A-Z][A-Z0-9]{1,}\b|\S*[a-z][A-Z]\S*|\S+_\S+|\S+\.\S+\.\S+|/\S+|"
                    r"(?<![\w-])--?[A-Za-z][\w-]*)")


def exact_terms(text: str) -> list[str]:
    """What a question names exactly: quoted strings, and tokens with digits (E-4012, 45, v1.2),
    acronyms (RRF, FTS5), identifiers (max_tokens, camelCase, dotted.names, /paths), command-line
    options (--max-queue, -k). Each is
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
    when the query names nothing exactly. `search` ranks these first: a chunk that holds the code
    or number asked about comes before chunks that are merely close in both other lists."""
    terms = exact_terms(query)
    q = fts_query(query)
    if not terms or q is None:
        return []
    match = " AND ".join(f'"{t}"' for t in terms)
    rows = kb.db.execute("SELECT rowid, bm25(chunks_fts, 1.0, 0.5) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
                         "ORDER BY s LIMIT ?", (f"({match}) AND ({q})", limit)).fetchall()
    return [(int(r), -float(s)) for r, s in rows]


def bm25_search(kb: KnowledgeBase, query: str, limit: int) -> list[tuple[int, float]]:
    """(chunk id, BM25 score, higher better) of the best `limit` chunks for `query`. Words that
    more than half of the chunks hold are left out of the query (`KnowledgeBase.common_words`:
    BM25 weighs them at ~0, and their posting lists are the slowest to read), unless every word is one."""
    words = query_words(query)
    common = kb.common_words(words)
    q = fts_query(query, without=common if len(common) < len(words) else frozenset())
    if q is None:
        return []
    # bm25() weights: the text 1, the heading path 0.5 (a heading repeats across its chunks).
    rows = kb.db.execute("SELECT rowid, bm25(chunks_fts, 1.0, 0.5) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
                         "ORDER BY s LIMIT ?", (q, limit)).fetchall()
    return [(int(r), -float(s)) for r, s in rows]


def coverage(kb: KnowledgeBase, query: str, ids: list[int]) -> dict[int, float]:
    """The share of the query's words (stopwords left out) that each chunk contains, 0..1."""
    words = query_words(query)[:32]
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


def normalised(scores: dict[int, float]) -> dict[int, float]:
    """Min-max normalisation of one list's scores to 0..1 (the best gets 1; a list of one, or of
    equal scores, gets 1 throughout)."""
    if not scores:
        return {}
    hi, lo = max(scores.values()), min(scores.values())
    span = hi - lo
    return {c: (v - lo) / span if span > 0 else 1.0 for c, v in scores.items()}


def fuse(lexical: list[tuple[int, float]], semantic: list[tuple[int, float]], share: dict[int, float],
         exact: list[int] | tuple[int, ...] = ()) -> list[tuple[int, float]]:
    """The hybrid ranking, best first, as (chunk id, fused score): 0.5 x share x normalised BM25 +
    0.5 x normalised cosine (a chunk missing from one list gets 0 from it), the chunks in `exact`
    (holding every exact term of the question) ranked above all others. Ties go to the lower id."""
    b = normalised(dict(lexical))
    v = normalised(dict(semantic))
    total = {c: BM25_SHARE * share.get(c, 0.0) * x for c, x in b.items()}
    for c, x in v.items():
        total[c] = total.get(c, 0.0) + (1 - BM25_SHARE) * x
    for c in exact:
        total.setdefault(c, 0.0)
    first = set(exact)
    return sorted(total.items(), key=lambda x: (x[0] not in first, -x[1], x[0]))


def plain_rrf(lexical: list[tuple[int, float]], semantic: list[tuple[int, float]],
              k: int = 60) -> list[tuple[int, float]]:
    """Textbook reciprocal rank fusion (Cormack, Clarke and Buettcher 2009): sum of 1 / (k + rank)
    over the two lists, k = 60. The benchmark's untuned reference."""
    total: dict[int, float] = {}
    for ranked in (lexical, semantic):
        for r, (cid, _) in enumerate(ranked, 1):
            total[cid] = total.get(cid, 0.0) + 1.0 / (k + r)
    return sorted(total.items(), key=lambda x: (-x[1], x[0]))


def search(kb: KnowledgeBase, query: str, *, k: int = 5, mode: str = "hybrid", embedder: Any = None,
           candidates: int = 50, plain: bool = False) -> list[Hit]:
    """The `k` best chunks for `query`: hybrid (see the module's docstring; `plain`: textbook RRF
    instead, for comparison), bm25 or vector. Each list reads its best `candidates` chunks."""
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
    b_rank = {cid: r for r, (cid, _) in enumerate(lexical, 1)}
    b_score = dict(lexical)
    v_rank = {cid: r for r, (cid, _) in enumerate(semantic, 1)}
    v_score = dict(semantic)
    if mode == "bm25":
        fused = lexical
    elif mode == "vector":
        fused = semantic
    elif plain:
        fused = plain_rrf(lexical, semantic)
    else:
        exact = [cid for cid, _ in exact_search(kb, query, depth)]
        fused = fuse(lexical, semantic, coverage(kb, query, list(b_rank)), exact)
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
