"""The knowledge base, measured: retrieval recall on the built-in test set, ingestion rate, and
query latency as the knowledge base grows.

1. Recall@1 and recall@5 of BM25 alone, vectors alone, textbook RRF and chatsmith's hybrid on the
   built-in set (tests/fixtures/kb_testset: 54 questions of three types over four documents), by
   type, on the held-out half (the fusion was chosen on the other half, `split()`) and on all.
2. Ingestion of that set through `kb add` (read, chunk, embed, store): chunks/s.
3. Synthetic knowledge bases of N chunks (random words from a Zipf vocabulary, random unit
   vectors; written straight to the store, since embedding 1M chunks on a CPU would take a day):
   write rate, the one-time load of the vector matrix, and query latency p50/p95 for BM25, vector
   and hybrid search (the query's embedding, measured once on its own, comes on top).

    python benchmarks/kb_retrieval.py [--sizes 10000,100000,1000000] [--queries 100] [--kb-dir DIR]
                                      [--skip-recall] [--out bench-out/kb_retrieval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TESTSET = REPO / "tests" / "fixtures" / "kb_testset"


def load_questions() -> list[dict]:
    return [json.loads(line) for line in (TESTSET / "questions.jsonl").read_text().splitlines() if line.strip()]


def split(questions: list[dict]) -> dict[str, list[int]]:
    """The built-in set in two halves, every other question of each type: "tuning" (where the
    fusion was chosen) and "held-out" (never looked at while choosing), plus "all"."""
    seen: dict[str, int] = {}
    halves: dict[str, list[int]] = {"tuning": [], "held-out": [], "all": list(range(len(questions)))}
    for i, q in enumerate(questions):
        n = seen[q["type"]] = seen.get(q["type"], -1) + 1
        halves["tuning" if n % 2 == 0 else "held-out"].append(i)
    return halves


def recall(kb, questions: list[dict], embedder) -> dict:
    """recall@1 and recall@5 by method, half of the set and question type."""
    from chatsmith.kb.search import search

    # Every question embedded once, in one batch; each method reads the same vectors.
    vectors = dict(zip([q["question"] for q in questions], embedder.encode_array([q["question"] for q in questions])))

    class Embedded:
        def encode_array(self, texts, **_):
            return np.stack([vectors[t] for t in texts])

    out: dict = {}
    halves = split(questions)
    for mode in ("bm25", "vector", "plain RRF", "hybrid"):
        ranks = []
        for q in questions:
            hits = search(kb, q["question"], k=5, mode="hybrid" if mode == "plain RRF" else mode, embedder=Embedded(),
                          plain=mode == "plain RRF")
            ranks.append(next((i for i, h in enumerate(hits, 1)
                               if Path(h.source).name == q["source"] and q["answer"] in h.text), None))
        out[mode] = {}
        for half, idx in halves.items():
            table = {}
            for kind in sorted({questions[i]["type"] for i in idx}) + ["all"]:
                rs = [ranks[i] for i in idx if kind in ("all", questions[i]["type"])]
                table[kind] = {"n": len(rs), "recall@1": sum(r == 1 for r in rs) / len(rs),
                               "recall@5": sum(r is not None for r in rs) / len(rs)}
            out[mode][half] = table
        out[mode]["missed@1"] = [questions[i]["question"] for i, r in enumerate(ranks) if r != 1]
    return out


def write_synthetic(path: Path, n: int, dim: int = 384, seed: int = 0) -> float:
    """Write n synthetic chunks (100 documents of 100 chunks per transaction) to a new KB at
    `path`; returns the seconds it took."""
    from chatsmith.kb.store import KnowledgeBase, NewChunk

    rng = np.random.default_rng(seed)
    kb = KnowledgeBase(path, create=True)
    start = time.perf_counter()
    per_doc, written = 100, 0
    while written < n:
        with kb.write():
            for _ in range(100):
                if written >= n:
                    break
                m = min(per_doc, n - written)
                words = rng.choice(VOCAB, size=(m, 120), p=ZIPF)
                vecs = rng.standard_normal((m, dim)).astype(np.float32)
                vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
                chunks = [NewChunk(i, f"section {i % 7}", f"line {i}", " ".join(words[i]), f"{written + i:032x}",
                                   120, vecs[i].tobytes()) for i in range(m)]
                kb.replace_document(f"/syn/doc{written // per_doc}.txt", "text", "", f"{written}", 0, 0.0, chunks)
                written += m
    kb.close()
    return time.perf_counter() - start


# Words of letters only: a word with a digit would count as an exact term (kb/search.py).
VOCAB = np.array(["".join("abcdefghijklmnopqrstuvwxyz"[(i // 26**j) % 26] for j in range(4)) + "x"
                  for i in range(50_000)])
ZIPF = 1.0 / np.arange(1, len(VOCAB) + 1) ** 1.1
ZIPF /= ZIPF.sum()


def synthetic(n: int, queries: int, kb_dir: Path | None, dim: int = 384) -> dict:
    """Query latency on a synthetic KB of n chunks (written first, or reused from `kb_dir`)."""
    from chatsmith.kb.search import bm25_search, search, vector_search
    from chatsmith.kb.store import KnowledgeBase

    folder = kb_dir or Path(tempfile.mkdtemp(prefix="kb-bench-"))
    path = folder / f"syn{n}.kb"
    try:
        write_s = None
        if not path.exists():
            write_s = write_synthetic(path, n, dim)
        kb = KnowledgeBase(path)
        t = time.perf_counter()
        kb.matrix()
        load_s = time.perf_counter() - t
        rng = np.random.default_rng(1)
        qwords = [" ".join(rng.choice(VOCAB[:5000], size=6)) for _ in range(queries)]
        qvecs = rng.standard_normal((queries, dim)).astype(np.float32)
        qvecs /= np.linalg.norm(qvecs, axis=1, keepdims=True)

        class Fixed:   # the query vector, as if embedded (embedding is timed separately)
            def __init__(self) -> None:
                self.i = 0

            def encode_array(self, texts, **_):
                v = qvecs[self.i % queries][None]
                self.i += 1
                return v

        times: dict[str, list[float]] = {"bm25": [], "vector": [], "hybrid": []}
        emb = Fixed()
        for i in range(queries):
            t = time.perf_counter()
            bm25_search(kb, qwords[i], 50)
            times["bm25"].append(time.perf_counter() - t)
            t = time.perf_counter()
            vector_search(kb, qvecs[i], 50)
            times["vector"].append(time.perf_counter() - t)
            t = time.perf_counter()
            search(kb, qwords[i], k=5, embedder=emb)
            times["hybrid"].append(time.perf_counter() - t)
        size = sum(p.stat().st_size for p in folder.glob(path.name + "*"))
        kb.close()
        return {"chunks": n, "write_chunks_per_s": n / write_s if write_s else None, "matrix_load_s": load_s,
                "file_mb": size / 2**20,
                **{f"{m}_p50_ms": 1000 * statistics.median(v) for m, v in times.items()},
                **{f"{m}_p95_ms": 1000 * float(np.percentile(v, 95)) for m, v in times.items()}}
    finally:
        if kb_dir is None:
            shutil.rmtree(folder, ignore_errors=True)


def scan_only(n: int, queries: int, dim: int = 384) -> dict:
    """The vector half alone at n chunks (no database: a random float32 matrix in memory), for
    sizes whose FTS5 index takes too long to build here."""
    from chatsmith.kb.search import vector_search

    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((n, dim), dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)

    class InMemory:
        def matrix(self):
            return ids, matrix

    times = []
    for _ in range(queries):
        q = rng.standard_normal(dim).astype(np.float32)
        t = time.perf_counter()
        vector_search(InMemory(), q / np.linalg.norm(q), 50)
        times.append(time.perf_counter() - t)
    return {"chunks": n, "matrix_mb": matrix.nbytes / 2**20, "vector_p50_ms": 1000 * statistics.median(times),
            "vector_p95_ms": 1000 * float(np.percentile(times, 95))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="synthetic KB sizes, comma-separated")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--scan-sizes", default="", help="sizes for the vector scan alone (no database)")
    ap.add_argument("--kb-dir", type=Path, help="keep the synthetic KBs here (synN.kb) and reuse them on the next "
                                                "run (1M chunks take minutes to write and 4.5 GB)")
    ap.add_argument("--skip-recall", action="store_true", help="only the synthetic measurements")
    ap.add_argument("--out", default="bench-out/kb_retrieval.json")
    args = ap.parse_args()

    from chatsmith.embed import shared_embedder

    result: dict = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    if not args.skip_recall:
        embedder = shared_embedder()
        embedder.encode_array(["warm-up"])
        recall_part(result, embedder)
    synthetic_part(result, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


def recall_part(result: dict, embedder) -> None:
    from chatsmith.kb.ingest import add_paths
    from chatsmith.kb.store import KnowledgeBase

    with tempfile.TemporaryDirectory() as tmp:
        report = add_paths(Path(tmp) / "set.kb", [TESTSET / "docs"], embedder=embedder, progress=False)
        result["ingest"] = {"files": report.added, "chunks": report.chunks, "seconds": report.seconds,
                            "chunks_per_s": report.chunks_per_second}
        kb = KnowledgeBase(Path(tmp) / "set.kb")
        questions = load_questions()
        result["recall"] = recall(kb, questions, embedder)
        t = time.perf_counter()
        for q in questions:
            embedder.encode_array([q["question"]])
        result["query_embedding_ms"] = 1000 * (time.perf_counter() - t) / len(questions)
        kb.close()

    print(f"\ningestion of the test set: {report.chunks} chunks from {report.added} files in {report.seconds:.1f} s "
          f"= {report.chunks_per_second:.1f} chunks/s (embedding dominates)")
    print(f"query embedding: {result['query_embedding_ms']:.1f} ms per question\n")
    for half in ("held-out", "all"):
        kinds = list(result["recall"]["hybrid"][half])
        print(f"recall@1 / recall@5 on the built-in set, {half} questions")
        print(f"{'mode':10s}" + "".join(f"{k + ' (' + str(result['recall']['hybrid'][half][k]['n']) + ')':>22s}"
                                        for k in kinds))
        for mode, tables in result["recall"].items():
            table = tables[half]
            print(f"{mode:10s}" + "".join(f"{table[k]['recall@1']:>13.2f} / {table[k]['recall@5']:.2f}" for k in kinds))
        print()


def synthetic_part(result: dict, args) -> None:
    result["synthetic"] = []
    for n in [int(x) for x in args.sizes.split(",") if x]:
        r = synthetic(n, args.queries, args.kb_dir)
        result["synthetic"].append(r)
        rate = f"written at {r['write_chunks_per_s']:,.0f} chunks/s" if r["write_chunks_per_s"] else "reused"
        print(f"\n{n:>9,} chunks: {rate}, {r['file_mb']:.0f} MB, vectors loaded in {r['matrix_load_s']:.2f} s")
        for m in ("bm25", "vector", "hybrid"):
            print(f"    {m:7s} p50 {r[m + '_p50_ms']:7.1f} ms   p95 {r[m + '_p95_ms']:7.1f} ms")
    result["scan_only"] = []
    for n in [int(x) for x in args.scan_sizes.split(",") if x]:
        r = scan_only(n, args.queries)
        result["scan_only"].append(r)
        print(f"\n{n:>9,} vectors in memory ({r['matrix_mb']:.0f} MB), the vector scan alone: "
              f"p50 {r['vector_p50_ms']:.1f} ms   p95 {r['vector_p95_ms']:.1f} ms")


if __name__ == "__main__":
    main()
