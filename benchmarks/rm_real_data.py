"""Reward model on real preference data: cross-validated held-out pairwise accuracy.

The real preference files on this machine are `../shared/data/sharegpt_preference_20.json`
(LLaMA-Factory's dpo_en_demo, ShareGPT style) and `../shared/data/hh_rlhf_transcripts_10.jsonl`
(Anthropic hh-rlhf, whole transcripts): 30 pairs together. A single 10% held-out split is 3 pairs
and says nothing, so this script trains `chatsmith rm` K times (K folds), each time on the other
folds, and scores every pair exactly once while it is held out. It reports:

- held-out pairwise accuracy over all pairs, with its Wilson 95% interval and the one-sided
  binomial p-value against chance (0.5);
- for context, on the same pairs, the accuracy of "the longer answer wins".

The files are read by chatsmith's own readers, unchanged; each fold's training records go to
`chatsmith rm` as a JSONL file of {messages, chosen, rejected}.

    python benchmarks/rm_real_data.py                 # 5 folds, LoRA r16, 3 epochs (~15 min here)
    python benchmarks/rm_real_data.py --folds 3 --epochs 1 --max-length 256   # quicker
    python benchmarks/rm_real_data.py --data hh-rlhf-harmless-test.jsonl      # your own real file
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FILES = [REPO.parent / "shared" / "data" / "sharegpt_preference_20.json",
         REPO.parent / "shared" / "data" / "hh_rlhf_transcripts_10.jsonl"]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def binomial_p_at_least(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 0.5): the one-sided p-value against chance."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def messages(msgs: list[Any]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in msgs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", help="a real preference file (repeatable; default: the two "
                   "files of ../shared/data named above); any format `chatsmith rm` reads")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--method", default="lora", choices=["lora", "head", "freeze", "full"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-out/rm_real_data.json")
    args = p.parse_args(argv)

    from chatsmith.config import RMConfig
    from chatsmith.data.preference import read_preferences
    from chatsmith.models.reward import load_reward_model
    from chatsmith.train.rm import run_rm

    records: list[Any] = []
    for f in [Path(x) for x in args.data] if args.data else FILES:
        got = read_preferences(str(f)).records
        print(f"{f.name}: {len(got)} pairs", flush=True)
        records.extend(got)
    order = list(range(len(records)))
    random.Random(args.seed).shuffle(order)
    folds = [order[k::args.folds] for k in range(args.folds)]
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for k, held in enumerate(folds):
            held_set = set(held)
            train = [records[i] for i in order if i not in held_set]
            data = Path(tmp) / f"fold{k}.jsonl"
            data.write_text("".join(json.dumps({"messages": messages(r.prompt), "chosen": messages(r.responses[0]),
                                                "rejected": messages(r.responses[1])}) + "\n" for r in train))
            cfg = RMConfig(model="smollm2-135m", data=[str(data)], output=str(Path(tmp) / f"run{k}"),
                           method=args.method, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                           max_length=args.max_length, eval_split=0, seed=args.seed, log_every=5)
            t0 = time.perf_counter()
            run = run_rm(cfg)
            rm = load_reward_model(str(run))
            for i in held:
                r = records[i]
                prompt = messages(r.prompt)
                chosen, rejected = r.responses[0][-1].content, r.responses[1][-1].content
                s = rm.score([prompt, prompt], [chosen, rejected])
                rows.append({"record": i, "source": Path(r.source.split(",")[0].split(":")[0]).name if r.source else "",
                             "fold": k, "chosen_score": s[0], "rejected_score": s[1], "correct": s[0] > s[1],
                             "longer_is_chosen": len(chosen) > len(rejected)})
            acc = sum(x["correct"] for x in rows if x["fold"] == k) / len(held)
            print(f"fold {k + 1}/{args.folds}: trained on {len(train)} pairs in {time.perf_counter() - t0:.0f}s, "
                  f"held-out accuracy {acc:.2f} on {len(held)} pairs", flush=True)
    n = len(rows)
    k_ok = sum(x["correct"] for x in rows)
    k_len = sum(x["longer_is_chosen"] for x in rows)
    lo, hi = wilson(k_ok, n)
    result = {"settings": vars(args), "pairs": n, "correct": k_ok, "accuracy": k_ok / n, "wilson95": [lo, hi],
              "p_value_vs_chance": binomial_p_at_least(k_ok, n), "longer_answer_wins_accuracy": k_len / n,
              "wall_s": time.perf_counter() - t_start, "rows": rows}
    by_source: dict[str, list[bool]] = {}
    for x in rows:
        by_source.setdefault(x["source"], []).append(x["correct"])
    print("\n| data | held-out pairs | reward model accuracy | longer answer wins |")
    print("|---|---:|---:|---:|")
    for src, oks in by_source.items():
        lens = [x["longer_is_chosen"] for x in rows if x["source"] == src]
        print(f"| {src} | {len(oks)} | {sum(oks) / len(oks):.2f} | {sum(lens) / len(lens):.2f} |")
    print(f"| all | {n} | {k_ok / n:.2f} ({k_ok}/{n}; Wilson 95% {lo:.2f}-{hi:.2f}; "
          f"p = {result['p_value_vs_chance']:.3f} vs chance) | {k_len / n:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
