"""Does DPO on real preferences move the model's sampled answers? A reward model trained on the
same kind of data says, with an interval.

`../shared/data/hh_rlhf_harmless_train_1600.jsonl` holds 1,600 real hh-rlhf (harmless-base) pairs.
As `benchmarks/rm_learning_curve.py` does, the lines are shuffled once (seed 0) and the first 400
are held out; the reward model of that script (trained on the next 900) is the judge here. Then:

1. `chatsmith dpo` (LoRA on the embedded model) trains on the first --pairs of the training pool;
2. the prompts of the first --prompts held-out pairs (their conversation up to the answers being
   compared) go to a prompt file;
3. `chatsmith eval rm-compare RM --models smollm2-135m RUN` samples one answer per prompt from each
   model (same seeds, same engine, same precision) and scores them with the reward model: mean
   reward with intervals, and win/tie/loss of the DPO model against the starting model with the
   win rate's Wilson interval.

The commands are the ones a user types; the files are the real file's lines, unchanged.

    python benchmarks/rm_learning_curve.py        # first: trains the reward model used here
    python benchmarks/dpo_rm_compare.py           # DPO on 300 pairs, 100 held-out prompts
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh_rlhf_harmless_train_1600.jsonl"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA), help="an hh-rlhf JSONL file (default: the shared 1,600 pairs)")
    p.add_argument("--reward-model", default="bench-out/rm_curve/rm_900_one_pass",
                   help="a `chatsmith rm` run (default: the one rm_learning_curve.py trains)")
    p.add_argument("--held", type=int, default=400, help="held-out pairs, as in rm_learning_curve.py (default 400)")
    p.add_argument("--pairs", type=int, default=300, help="DPO training pairs (default 300)")
    p.add_argument("--prompts", type=int, default=100, help="held-out prompts to answer (default 100)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--workdir", default="bench-out/dpo_rm_compare")
    p.add_argument("--out", default="bench-out/dpo_rm_compare.json")
    args = p.parse_args(argv)

    from chatsmith.data.preference import read_preferences

    lines = [ln for ln in Path(args.data).read_text(encoding="utf-8").splitlines() if ln.strip()]
    random.Random(0).shuffle(lines)
    held, pool = lines[:args.held], lines[args.held:]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    train = work / f"train_{args.pairs}.jsonl"
    train.write_text("\n".join(pool[:args.pairs]) + "\n", encoding="utf-8")
    held_file = work / "heldout.jsonl"
    held_file.write_text("\n".join(held[:args.prompts]) + "\n", encoding="utf-8")
    prompts = work / "heldout_prompts.jsonl"
    with prompts.open("w", encoding="utf-8") as f:
        for rec in read_preferences(str(held_file)).records:
            f.write(json.dumps({"prompt": [{"role": m.role, "content": m.content} for m in rec.prompt]}) + "\n")

    cli = [sys.executable, "-m", "chatsmith"]

    def run(cmd: list[str]) -> float:
        print("$ chatsmith", " ".join(cmd[3:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        return time.perf_counter() - t0

    run_dir = work / f"dpo_{args.pairs}"
    train_s = run([*cli, "dpo", "--data", str(train), "--output", str(run_dir), "--method", "lora",
                   "--lr", str(args.lr), "--beta", str(args.beta), "--epochs", str(args.epochs),
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--eval-split", "0", "--save-every", "0", "--log-every", "5"])
    results = work / "rm_compare"
    compare_s = run([*cli, "eval", "rm-compare", args.reward_model, "--models", "smollm2-135m", str(run_dir),
                     "--prompts", str(prompts), "--temperature", str(args.temperature),
                     "--max-new-tokens", str(args.max_new_tokens), "--output", str(results)])
    summary = json.loads((results / "summary.json").read_text())
    key = f"{run_dir} vs smollm2-135m"
    wtl = summary["outcomes"][key]
    rewards = summary["rewards"]
    print(f"\nDPO on {args.pairs} hh-rlhf pairs, {summary['n_prompts']} held-out prompts, reward model "
          f"{args.reward_model}:")
    print("| model | mean reward [95%] |")
    print("|---|---|")
    for m in ("smollm2-135m", str(run_dir)):
        r = rewards[m]
        print(f"| {m} | {r['value']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] |")
    print(f"DPO vs start: win/tie/loss {wtl['wins']}/{wtl['ties']}/{wtl['losses']}, win rate "
          f"{wtl['win_rate']['value']:.3f} [{wtl['win_rate']['low']:.3f}, {wtl['win_rate']['high']:.3f}]")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "rewards": rewards, "dpo_vs_start": wtl,
                               "train_s": train_s, "compare_s": compare_s, "report": str(results / "report.html")},
                              indent=2))
    print(f"wrote {out}; report: {results / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
