"""Reward model on real data: held-out pairwise accuracy against the number of training pairs.

`../shared/data/hh_rlhf_harmless_train_1600.jsonl` holds 1,600 real hh-rlhf (harmless-base) pairs.
This script shuffles them once (seed 0) and holds out the first HELD pairs (default 400). Then:

- `--separate`: for each N of --sizes, `chatsmith rm` (LoRA on the embedded model) trains from
  scratch on the first N of the other pairs, and `chatsmith eval rm` scores the held-out pairs;
- default (one pass, cheaper): ONE `chatsmith rm` run over the first max(N) pairs, evaluated on the
  held-out file (`--eval-data`) before the first step and every time another gcd(N) pairs have been
  trained, so each point is "the accuracy after the first N pairs of one pass"; the final model is
  scored once more by `chatsmith eval rm`, which must agree with the run's last evaluation.

The commands it runs are the ones a user types; the files they read are the real file's lines,
unchanged.

Reported per N: held-out accuracy with its Wilson 95% interval, the one-sided binomial p-value
against chance, training time; and, on the same held-out pairs, the accuracy of "the longer answer
wins" for context. A plot (accuracy with intervals against N) goes beside the JSON.

    python benchmarks/rm_learning_curve.py                          # one pass, N = 300, 600, 900
    python benchmarks/rm_learning_curve.py --separate --sizes 200 600 1200   # a run per N (hours here)
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
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 600, 900], help="training pairs per point")
    p.add_argument("--held", type=int, default=400, help="held-out pairs (default 400)")
    p.add_argument("--separate", action="store_true", help="train a separate run for each size")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=192, help="tokens per prompt+answer; the prompt's start is "
                   "cut first, so the last exchange stays (default 192)")
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
    common = ["--method", args.method, "--lr", str(args.lr), "--batch-size", str(args.batch_size),
              "--max-length", str(args.max_length), "--eval-split", "0", "--save-every", "0", "--log-every", "5"]
    rows = []

    def run(cmd: list[str]) -> float:
        print("$ chatsmith", " ".join(cmd[3:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        return time.perf_counter() - t0

    def evaluate(run_dir: Path, results: Path) -> dict:
        eval_s = run([*cli, "eval", "rm", str(run_dir), "--data", str(held), "--output", str(results)])
        s = json.loads((results / "summary.json").read_text())
        return {"heldout_pairs": s["pairs"], "correct": s["correct"], "accuracy": s["accuracy"]["pairwise accuracy"],
                "margin": s["margin"], "p_value_vs_chance": binomial_p_at_least(s["correct"], s["pairs"]),
                "eval_s": eval_s}

    if args.separate:
        for n in args.sizes:
            train = work / f"train_{n}.jsonl"
            train.write_text("\n".join(pool[:n]) + "\n", encoding="utf-8")
            run_dir = work / f"rm_{n}"
            train_s = run([*cli, "rm", "--data", str(train), "--output", str(run_dir), "--epochs", str(args.epochs),
                           *common])
            rows.append({"train_pairs": n, **evaluate(run_dir, work / f"eval_{n}"), "train_s": train_s})
    else:
        from math import gcd

        from chatsmith.eval.stats import wilson_interval

        n_max = max(args.sizes)
        every_pairs = 0
        for n in args.sizes:
            every_pairs = gcd(every_pairs, n)
        if every_pairs % args.batch_size:
            raise SystemExit(f"the sizes' gcd ({every_pairs}) must be a multiple of --batch-size {args.batch_size}")
        train = work / f"train_{n_max}.jsonl"
        train.write_text("\n".join(pool[:n_max]) + "\n", encoding="utf-8")
        run_dir = work / f"rm_{n_max}_one_pass"
        train_s = run([*cli, "rm", "--data", str(train), "--output", str(run_dir), "--epochs", "1",
                       "--eval-data", str(held), "--eval-every", str(every_pairs // args.batch_size), *common])
        evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                 if "eval_accuracy" in r]
        for r in evals:
            n = r["step"] * args.batch_size
            if n != 0 and n not in args.sizes:
                continue
            correct = round(r["eval_accuracy"] * args.held)
            rows.append({"train_pairs": n, "heldout_pairs": args.held, "correct": correct,
                         "accuracy": wilson_interval(correct, args.held).as_dict(),
                         "p_value_vs_chance": binomial_p_at_least(correct, args.held),
                         "eval_margin": r.get("eval_margin"), "train_s": train_s if n == n_max else None})
        final = evaluate(run_dir, work / "eval_final")
        print(f"chatsmith eval rm on the final model: {final['correct']}/{final['heldout_pairs']} "
              f"(the run's last evaluation: {rows[-1]['correct']}/{args.held})", flush=True)
        rows[-1]["eval_rm"] = final
    for r in rows:
        a = r["accuracy"]
        print(f"N={r['train_pairs']}: held-out accuracy {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}]", flush=True)
    print("\n| training pairs | held-out accuracy | Wilson 95% | p vs chance |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        a = r["accuracy"]
        print(f"| {r['train_pairs']} | {a['value']:.3f} ({r['correct']}/{r['heldout_pairs']}) | "
              f"{a['low']:.3f}-{a['high']:.3f} | {r['p_value_vs_chance']:.2g} |")
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
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label="chatsmith rm (LoRA, smollm2-135m)"
                + ("" if args.separate else ", one pass"))
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
