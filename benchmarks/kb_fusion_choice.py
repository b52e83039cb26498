"""How the hybrid fusion of chatsmith/kb/search.py was chosen: every candidate fusion scored on the
tuning half of the built-in retrieval set only (benchmarks/kb_retrieval.py `split()`: every other
question of each type), ranked by its worst margin over question types and recall@1/@5 against
the better single method (BM25 or vectors), then by recall@1 + recall@5 over the half. The held-out
half is printed for the best candidates, but takes no part in the ranking.

Candidates: weighted reciprocal rank fusion (k 5/10/20/60, BM25 weight 0.5-2, BM25 votes scaled by
c^0/c^1/c^2 where c is the share of the question's words a chunk holds) and the convex combination
of normalised scores (BM25 share 0.3-0.7, the same c powers, min-max or max normalisation of each
list), each with and without the exact-terms tier (chunks holding every exact term first).

    python benchmarks/kb_fusion_choice.py [--kb set.kb]   # --kb: the set already ingested (else ingested here)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def candidates_of(kb, questions, vectors) -> list[dict]:
    """Each question's lists: BM25 and vector top 50 with scores, word shares, exact-term chunks."""
    from chatsmith.kb.search import bm25_search, coverage, exact_search, vector_search

    out = []
    for q in questions:
        lex = bm25_search(kb, q["question"], 50)
        sem = vector_search(kb, vectors[q["question"]], 50)[0]
        out.append({"lex": lex, "sem": sem, "share": coverage(kb, q["question"], [c for c, _ in lex]),
                    "exact": [c for c, _ in exact_search(kb, q["question"], 50)]})
    return out


def rrf(p: dict, k: int, weight: float, power: int, tier: bool) -> list[int]:
    total: dict[int, float] = {}
    for r, (c, _) in enumerate(p["lex"], 1):
        total[c] = weight * p["share"].get(c, 0.0) ** power / (k + r)
    for r, (c, _) in enumerate(p["sem"], 1):
        total[c] = total.get(c, 0.0) + 1.0 / (k + r)
    first = set(p["exact"]) if tier else set()
    return [c for c, _ in sorted(total.items(), key=lambda x: (x[0] not in first, -x[1], x[0]))]


def convex(p: dict, alpha: float, power: int, norm: str, tier: bool) -> list[int]:
    def scaled(pairs):
        if not pairs:
            return {}
        hi, lo = max(s for _, s in pairs), min(s for _, s in pairs)
        if norm == "max":
            return {c: s / hi if hi else 1.0 for c, s in pairs}
        return {c: (s - lo) / (hi - lo) if hi > lo else 1.0 for c, s in pairs}

    total = {c: alpha * p["share"].get(c, 0.0) ** power * x for c, x in scaled(p["lex"]).items()}
    for c, x in scaled(p["sem"]).items():
        total[c] = total.get(c, 0.0) + (1 - alpha) * x
    for c in (p["exact"] if tier else []):
        total.setdefault(c, 0.0)
    first = set(p["exact"]) if tier else set()
    return [c for c, _ in sorted(total.items(), key=lambda x: (x[0] not in first, -x[1], x[0]))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb", type=Path, help="the built-in set already ingested with all-MiniLM-L6-v2")
    args = ap.parse_args()
    from kb_retrieval import TESTSET, load_questions, split

    from chatsmith.embed import shared_embedder
    from chatsmith.kb.ingest import add_paths
    from chatsmith.kb.store import KnowledgeBase

    embedder = shared_embedder()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.kb
        if path is None:
            path = Path(tmp) / "set.kb"
            add_paths(path, [TESTSET / "docs"], embedder=embedder, progress=False)
        kb = KnowledgeBase(path)
        questions = load_questions()
        vectors = dict(zip([q["question"] for q in questions],
                           embedder.encode_array([q["question"] for q in questions])))
        lists = candidates_of(kb, questions, vectors)
        ids = kb.matrix()[0].tolist()
        info = kb.chunks_info(ids)
        kb.close()

    def rank(i: int, ranked: list[int]) -> int | None:
        q = questions[i]
        return next((r for r, c in enumerate(ranked[:5], 1)
                     if Path(info[c]["source"]).name == q["source"] and q["answer"] in info[c]["text"]), None)

    halves = split(questions)
    kinds = sorted({q["type"] for q in questions})

    def table(ranker, idx):
        out = {}
        for kind in kinds + ["all"]:
            rs = [rank(i, ranker(i)) for i in idx if kind in ("all", questions[i]["type"])]
            out[kind] = (sum(r == 1 for r in rs) / len(rs), sum(r is not None for r in rs) / len(rs))
        return out

    singles = {h: {"bm25": table(lambda i: [c for c, _ in lists[i]["lex"]], idx),
                   "vector": table(lambda i: [c for c, _ in lists[i]["sem"]], idx)} for h, idx in halves.items()}

    def score(fn, half):
        t = table(fn, halves[half])
        best = singles[half]
        margin = min(t[k][a] - max(best["bm25"][k][a], best["vector"][k][a]) for k in kinds for a in (0, 1))
        return margin, t["all"][0] + t["all"][1], t

    rows = []
    for k, w, pw, tier in itertools.product((5, 10, 20, 60), (0.5, 1, 1.5, 2), (0, 1, 2), (False, True)):
        fn = functools.partial(lambda i, **kw: rrf(lists[i], **kw), k=k, weight=w, power=pw, tier=tier)
        rows.append((f"RRF k={k} bm25 weight {w} x c^{pw}" + (" + exact tier" if tier else ""), fn))
    for a, pw, norm, tier in itertools.product((0.3, 0.4, 0.5, 0.6, 0.7), (0, 1, 2), ("minmax", "max"), (False, True)):
        fn = functools.partial(lambda i, **kw: convex(lists[i], **kw), alpha=a, power=pw, norm=norm, tier=tier)
        rows.append((f"convex bm25 share {a} x c^{pw}, {norm}" + (" + exact tier" if tier else ""), fn))
    scored = sorted(((score(fn, "tuning"), name, fn) for name, fn in rows), key=lambda x: (-x[0][0], -x[0][1], x[1]))
    print(f"{len(rows)} candidates ranked on the tuning half ({len(halves['tuning'])} questions); "
          "margin = worst (hybrid - better single) over types and recall@1/@5\n")
    print(f"{'candidate':58s} {'tuning margin':>13s} {'tuning r@1+r@5':>15s} {'held-out margin':>16s} {'held-out all':>13s}")
    for (m, s, _), name, fn in scored[:12]:
        hm, _, ht = score(fn, "held-out")
        print(f"{name:58s} {m:>13.2f} {s:>15.2f} {hm:>16.2f} {ht['all'][0]:>7.2f} / {ht['all'][1]:.2f}")


if __name__ == "__main__":
    main()
