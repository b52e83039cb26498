"""Reward model on real data: held-out pairwise accuracy against the number of training pairs.

`../shared/data/hh_rlhf_harmless_train_1600.jsonl` holds 1,600 real hh-rlhf (harmless-base) pairs.
This script shuffles them once (seed 0), holds out the first HELD pairs (default 400), and trains
`chatsmith rm` (LoRA on the embedded model) on the first N of the rest for each N of --sizes, each
run from scratch, then scores the held-out pairs with `chatsmith eval rm`. The commands it runs are
the ones a user types; the files they read are the real file's lines, unchanged.

Reported per N: held-out accuracy with its Wilson 95% interval, the one-sided binomial p-value
against chance, training time; and, on the same held-out pairs, the accuracy of "the longer answer
wins" for context. A plot (accuracy with intervals against N) goes beside the JSON.

    python benchmarks/rm_learning_curve.py                          # N = 200, 600, 1200 (~1 h here)
    python benchmarks/rm_learning_curve.py --sizes 200 --held 100   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh_rlhf_harmless_train_1600.jsonl"


def binomial_p_at_least(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): the one-sided p-value against chance."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def last_reply(transcript: str) -> str:
    return transcript.rsplit("\n\nAssistant:", 1)[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA), help="an hh-rlhf JSONL file (default: the shared 1,600 pairs)")
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 600, 1200], help="training pairs per run")
    p.add_argument("--held", type=int, default=400, help="held-out pairs (default 400)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--method", default="lora", choices=["lora", "head", "freeze", "full"])
    p.add_argument("--workdir", default="bench-out/rm_curve")
    p.add_argument("--out", default="bench-out/rm_learning_curve.json")
    args = p.parse_args(argv)

    lines = [ln for ln in Path(args.data).read_text(encoding="utf-8").splitlines() if ln.strip()]
    random.Random(0).shuffle(lines)
    if args.held + max(args.sizes) > len(lines):
        raise SystemExit(f"{len(lines)} pairs cannot give {args.held} held out and {max(args.sizes)} to train on")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    held = work / "heldout.jsonl"
    held.write_text("\n".join(lines[:args.held]) + "\n", encoding="utf-8")
    pool = lines[args.held:]
    longer = sum(len(last_reply(json.loads(x)["chosen"])) > len(last_reply(json.loads(x)["rejected"]))
                 for x in lines[:args.held])
    cli = [sys.executable, "-m", "chatsmith"]
    rows = []
    for n in args.sizes:
        train = work / f"train_{n}.jsonl"
        train.write_text("\n".join(pool[:n]) + "\n", encoding="utf-8")
        run, results = work / f"rm_{n}", work / f"eval_{n}"
        train_cmd = [*cli, "rm", "--data", str(train), "--output", str(run), "--method", args.method,
                     "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
                     "--max-length", str(args.max_length), "--eval-split", "0", "--save-every", "0",
                     "--log-every", "10"]
        eval_cmd = [*cli, "eval", "rm", str(run), "--data", str(held), "--output", str(results)]
        print("$", " ".join(train_cmd[2:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(train_cmd, check=True, cwd=REPO)
        train_s = time.perf_counter() - t0
        print("$", " ".join(eval_cmd[2:]), flush=True)
        t1 = time.perf_counter()
        subprocess.run(eval_cmd, check=True, cwd=REPO)
        eval_s = time.perf_counter() - t1
        s = json.loads((results / "summary.json").read_text())
        acc = s["accuracy"]["pairwise accuracy"]
        rows.append({"train_pairs": n, "heldout_pairs": s["pairs"], "correct": s["correct"], "accuracy": acc,
                     "margin": s["margin"], "p_value_vs_chance": binomial_p_at_least(s["correct"], s["pairs"]),
                     "train_s": train_s, "eval_s": eval_s})
        print(f"N={n}: held-out accuracy {acc['value']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}], "
              f"trained in {train_s:.0f}s", flush=True)
    print("\n| training pairs | held-out accuracy | Wilson 95% | p vs chance | train s |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        a = r["accuracy"]
        print(f"| {r['train_pairs']} | {a['value']:.3f} ({r['correct']}/{r['heldout_pairs']}) | "
              f"{a['low']:.3f}-{a['high']:.3f} | {r['p_value_vs_chance']:.2g} | {r['train_s']:.0f} |")
    print(f"\nfor context, 'the longer answer wins' on the same held-out pairs: {longer / args.held:.3f}")
    result = {"settings": vars(args), "rows": rows, "longer_answer_wins": longer / args.held}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["train_pairs"] for r in rows]
    ys = [r["accuracy"]["value"] for r in rows]
    err = [[y - r["accuracy"]["low"] for y, r in zip(ys, rows)], [r["accuracy"]["high"] - y for y, r in zip(ys, rows)]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label="chatsmith rm (LoRA, smollm2-135m)")
    ax.axhline(0.5, color="grey", ls="--", label="chance")
    ax.axhline(longer / args.held, color="orange", ls=":", label="longer answer wins")
    ax.set_xlabel("training pairs")
    ax.set_ylabel(f"held-out pairwise accuracy ({args.held} pairs)")
    ax.set_title("hh-rlhf harmless-base: reward model learning curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
