"""The ROUGE-L filter of `chatsmith data self-instruct` as the pool grows: instructions/s checked
(and added) against pools of 1K, 10K and 50K instructions.

Contenders, on the same pool and the same new instructions:

- indexed: chatsmith's RougePool (rapidfuzz LCS on token-id strings, inverted-index prefilter);
- rapidfuzz, all pairs: the same exact LCS against every pool entry, no prefilter;
- rouge-score, all pairs: Alpaca's loop (rouge_scorer's `_score_lcs` on pre-tokenized text against
  every pool entry; Alpaca spread it over a process pool), measured on fewer instructions.

The pool and the new instructions are synthetic but instruction-like: 6-30 words drawn from the
vocabulary of the 175 self-instruct seed tasks with Zipf weights, a quarter of the new ones near
copies of a pool entry (2-4 words changed), so the filter has real work. Every contender must
reach the same decisions as the all-pairs scan (checked). Rates are per second of this process's
CPU time (time.process_time; everything here is single-threaded), so a busy shared machine
slows the wall clock but not the numbers.

    python benchmarks/rouge_filter.py                       # pools of 1K, 10K, 50K
    python benchmarks/rouge_filter.py --pools 1000 --queries 200

Prints a Markdown table and writes bench-out/rouge_filter.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chatsmith.datagen.rouge import RougePool, rouge_tokens  # noqa: E402

SEEDS = REPO.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"


def vocabulary() -> list[str]:
    words: dict[str, int] = {}
    for line in SEEDS.read_text().splitlines():
        rec = json.loads(line)
        text = rec["instruction"] + " " + " ".join(i["input"] + " " + i["output"] for i in rec["instances"])
        for w in re.findall(r"[A-Za-z]+", text.lower()):
            words[w] = words.get(w, 0) + 1
    return [w for w, _ in sorted(words.items(), key=lambda kv: -kv[1])]


def make_texts(n: int, rng: random.Random, vocab: list[str]) -> list[str]:
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    out = []
    for _ in range(n):
        words = rng.choices(vocab, weights, k=rng.randint(6, 30))
        out.append(words[0].capitalize() + " " + " ".join(words[1:]) + ".")
    return out


def near_copy(text: str, rng: random.Random, vocab: list[str]) -> str:
    words = text.rstrip(".").split()
    for _ in range(rng.randint(2, 4)):
        words[rng.randrange(len(words))] = rng.choice(vocab[:500])
    return " ".join(words) + "."


def run_indexed(pool_texts: list[str], queries: list[str], threshold: float) -> tuple[float, list[bool]]:
    pool = RougePool(threshold, pool_texts)
    start = time.process_time()
    decisions = []
    for q in queries:
        rejected = pool.too_similar(q)
        decisions.append(rejected)
        if not rejected:
            pool.add(q)
    return time.process_time() - start, decisions


def run_rapidfuzz_all_pairs(pool_texts: list[str], queries: list[str], threshold: float) -> tuple[float, list[bool]]:
    from rapidfuzz.distance import LCSseq

    vocab: dict[str, int] = {}

    def enc(text: str) -> str:
        return "".join(chr(0x100 + vocab.setdefault(t, len(vocab))) for t in rouge_tokens(text))

    pool = [enc(t) for t in pool_texts]
    start = time.process_time()
    decisions = []
    for q in queries:
        e = enc(q)
        best = max((2.0 * LCSseq.similarity(e, p) / (len(e) + len(p)) for p in pool if p and e), default=0.0)
        decisions.append(best > threshold)
        if best <= threshold:
            pool.append(e)
    return time.process_time() - start, decisions


def run_rouge_score(pool_texts: list[str], queries: list[str], threshold: float) -> tuple[float, list[bool]] | None:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = [scorer._tokenizer.tokenize(t) for t in pool_texts]
    start = time.process_time()
    decisions = []
    for q in queries:
        qt = scorer._tokenizer.tokenize(q)
        best = max((rouge_scorer._score_lcs(qt, p).fmeasure for p in pool), default=0.0)
        decisions.append(best > threshold)
        if best <= threshold:
            pool.append(qt)
    return time.process_time() - start, decisions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", default="1000,10000,50000")
    ap.add_argument("--queries", type=int, default=1000, help="new instructions per pool size")
    ap.add_argument("--rouge-score-queries", type=int, default=20, help="fewer for the slow reference")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--output", default="bench-out/rouge_filter.json")
    args = ap.parse_args()
    vocab = vocabulary()
    rows = []
    for size in (int(x) for x in args.pools.split(",")):
        rng = random.Random(size)
        pool = make_texts(size, rng, vocab)
        queries = make_texts(args.queries, rng, vocab)
        for i in range(0, len(queries), 4):
            queries[i] = near_copy(rng.choice(pool), rng, vocab)
        t_idx, d_idx = run_indexed(pool, queries, args.threshold)
        n_ref = min(len(queries), 200 if size >= 10000 else len(queries))
        t_rf, d_rf = run_rapidfuzz_all_pairs(pool, queries[:n_ref], args.threshold)
        assert d_idx[:n_ref] == d_rf, "the indexed pool decided differently from the all-pairs scan"
        ref = run_rouge_score(pool, queries[: args.rouge_score_queries], args.threshold)
        if ref is not None:
            assert ref[1] == d_idx[: args.rouge_score_queries], "rouge-score decided differently"
        row = {"pool": size, "queries": len(queries), "rejected": sum(d_idx),
               "indexed_per_s": len(queries) / t_idx, "rapidfuzz_all_pairs_per_s": n_ref / t_rf,
               "rouge_score_all_pairs_per_s": (args.rouge_score_queries / ref[0]) if ref else None}
        rows.append(row)
        print(f"pool {size}: indexed {row['indexed_per_s']:.0f}/s, rapidfuzz all pairs "
              f"{row['rapidfuzz_all_pairs_per_s']:.1f}/s, rouge-score all pairs "
              f"{row['rouge_score_all_pairs_per_s'] or float('nan'):.2f}/s", flush=True)
    print("\n| pool | indexed (chatsmith) | rapidfuzz, all pairs | rouge-score, all pairs (Alpaca's loop) | "
          "speed-up over rouge-score |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        rs = r["rouge_score_all_pairs_per_s"]
        print(f"| {r['pool']:,} | {r['indexed_per_s']:,.0f}/s | {r['rapidfuzz_all_pairs_per_s']:,.1f}/s | "
              f"{rs:,.2f}/s | {r['indexed_per_s'] / rs:,.0f}x |" if rs else
              f"| {r['pool']:,} | {r['indexed_per_s']:,.0f}/s | {r['rapidfuzz_all_pairs_per_s']:,.1f}/s | - | - |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threshold": args.threshold, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
