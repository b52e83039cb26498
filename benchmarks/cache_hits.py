"""The response cache, measured.

1. Hit rate and false-hit rate on the built-in set (chatsmith/cache/pairs.py: 91 paraphrase pairs
   that should hit, 307 near misses that must not: negations, numbers, names, quoted strings,
   opposite words, another system prompt, other earlier turns) at several thresholds, for
   chatsmith's semantic tier (same context + guard) and for GPTCache-style matching (the last
   message's embedding alone), by kind at the default threshold.
2. Latency through a real `chatsmith serve` (the embedded smollm2-135m, greedy, 64 new tokens):
   a generation (cache miss, stored), an exact hit, a semantic hit (a paraphrase: one embedding
   more), non-streamed, over the openai client.

    python benchmarks/cache_hits.py [--model smollm2-135m] [--requests 8] [--out bench-out/cache_hits.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pair_rates(thresholds: list[float]) -> dict:
    from chatsmith.cache import DEFAULT_THRESHOLD
    from chatsmith.cache.pairs import builtin_pairs, evaluate
    from chatsmith.embed import shared_embedder

    pairs = builtin_pairs()
    embedder, vectors = shared_embedder(), {}   # every text embedded once (one batch), for every threshold
    rows = []
    for th in thresholds:
        for last in (False, True):
            rows.append(evaluate(pairs, th, embedder=embedder, last_message=last, vectors=vectors).to_dict())
    default = {"chatsmith": evaluate(pairs, DEFAULT_THRESHOLD, embedder=embedder, vectors=vectors).to_dict(),
               "gptcache": evaluate(pairs, DEFAULT_THRESHOLD, embedder=embedder, last_message=True,
                                    vectors=vectors).to_dict()}
    return {"pairs": len(pairs), "rows": rows, "default_threshold": DEFAULT_THRESHOLD, "default": default}


def latency(model: str, n: int) -> dict:
    from openai import OpenAI

    from chatsmith.cache import ResponseCache
    from chatsmith.cache.pairs import BASES
    from chatsmith.serve.app import ServerState, ServerThread, load_state

    with tempfile.TemporaryDirectory() as tmp:
        from chatsmith.embed import shared_embedder

        state = ServerState(model, cache=ResponseCache(Path(tmp) / "c.db", semantic=True, embedder=shared_embedder()))
        with ServerThread(state) as url:
            load_state(state, model, max_concurrency=2)
            client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            state.cache.embedder.encode_array(["warm-up"])
            kw = dict(model=model, max_tokens=64, temperature=0)
            times: dict[str, list[float]] = {"generation": [], "exact hit": [], "semantic hit": []}
            tokens = []
            for question, paraphrase, _ in BASES[:n]:
                for kind, text in (("generation", question), ("exact hit", question), ("semantic hit", paraphrase)):
                    t = time.perf_counter()
                    r = client.chat.completions.create(messages=[{"role": "user", "content": text}], **kw)
                    times[kind].append(time.perf_counter() - t)
                    tier = (r.model_extra.get("cache") or {}).get("tier")
                    expected = {"generation": None, "exact hit": "exact", "semantic hit": "semantic"}[kind]
                    if tier != expected:
                        times[kind].pop()   # a paraphrase the guard refused: not a semantic hit
                    if kind == "generation":
                        tokens.append(r.usage.completion_tokens)
            state.engine.stop()
        return {"model": model, "completion_tokens_mean": statistics.mean(tokens),
                **{k: {"n": len(v), "median_ms": 1000 * statistics.median(v), "max_ms": 1000 * max(v)}
                   for k, v in times.items() if v}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--thresholds", default="0.7,0.75,0.8,0.85,0.9")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", default="bench-out/cache_hits.json")
    args = ap.parse_args()
    result = {"cpus": os.cpu_count(), "load_avg": os.getloadavg(),
              "rates": pair_rates([float(x) for x in args.thresholds.split(",")])}
    rates = result["rates"]
    print(f"built-in set: {rates['pairs']} pairs\n")
    print(f"{'threshold':>9}  {'method':26s} {'hit rate':>9} {'false hits':>11}")
    for r in rates["rows"]:
        print(f"{r['threshold']:>9.2f}  {r['method']:26s} {r['hit_rate']:>9.1%} {r['false_hit_rate']:>11.1%}")
    print(f"\nby kind at the default threshold {rates['default_threshold']}: (hits or false hits) / pairs")
    ours, theirs = rates["default"]["chatsmith"]["by_kind"], rates["default"]["gptcache"]["by_kind"]
    for kind in ours:
        key = "hits" if kind == "paraphrase" else "false_hits"
        print(f"  {kind:14s} chatsmith {ours[kind][key]:>3}/{ours[kind]['pairs']:<3}  last message "
              f"{theirs[kind][key]:>3}/{theirs[kind]['pairs']}")
    if not args.no_latency:
        lat = result["latency"] = latency(args.model, args.requests)
        print(f"\nlatency through chatsmith serve ({lat['model']}, greedy, {lat['completion_tokens_mean']:.0f} "
              "tokens per answer on average)")
        for kind in ("generation", "exact hit", "semantic hit"):
            if kind in lat:
                print(f"  {kind:13s} median {lat[kind]['median_ms']:8.1f} ms   max {lat[kind]['max_ms']:8.1f} ms   "
                      f"(n={lat[kind]['n']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
