"""Token-balanced ranks: max/mean tokens per process per optimizer step, naive split vs chatsmith's.

With P processes, each optimizer step's examples are split among the processes. The naive split
(consecutive micro-batches of --batch-size examples, process r taking micro-batches r, r+P, ...)
gives each process the same number of examples, so on real data some process gets far more tokens
than the others, and every process waits for it (and it needs the most memory). chatsmith deals
each step's examples by tokens (`chatsmith.train.plan.balance_step`). This script measures both on
the plans the training loop really runs (`plan_steps`), with lengths in tokens of the rendered chat
template of the embedded model's tokenizer:

- the shared Alpaca and ShareGPT samples (small: cycled over several epochs),
- the 1,600 real hh-rlhf conversations (the chosen transcripts, as SFT conversations),
- a long-tailed synthetic distribution (log-normal, 20,000 examples, cut at 4,096 tokens).

Reported per data set, P and accumulation A: the mean over steps of max/mean tokens per process,
and the worst step, beside the best any split can do (a step's longest example goes whole to one
process: max(1, longest / mean)). Pure planning: no model runs, a few seconds.

    python benchmarks/rank_balance.py
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def rendered_lengths(tokenizer, conversations) -> list[int]:
    from chatsmith.data.template import render_conversation

    return [len(render_conversation(tokenizer, c).input_ids) for c in conversations]


def datasets(tokenizer) -> dict[str, list[int]]:
    from chatsmith.data.formats import read_conversations
    from chatsmith.data.preference import read_preferences

    out = {
        "alpaca_50": rendered_lengths(tokenizer, read_conversations(str(SHARED / "alpaca_50.json")).conversations),
        "sharegpt_20": rendered_lengths(tokenizer, read_conversations(str(SHARED / "sharegpt_20.json")).conversations),
        "hh_rlhf_1600": rendered_lengths(tokenizer, [r.conversation(0) for r in read_preferences(
            str(SHARED / "hh_rlhf_harmless_train_1600.jsonl")).records]),
    }
    rng = random.Random(0)
    out["lognormal_20k"] = [1 + int(min(4095, rng.lognormvariate(5.5, 1.0))) for _ in range(20000)]
    return out


def spread(lengths: list[int], processes: int, accum: int, batch_size: int, balance: bool,
           epochs: float) -> dict[str, float]:
    from chatsmith.train.plan import plan_steps, rank_tokens

    plan = plan_steps(lengths, batch_size=batch_size, grad_accum=accum, max_steps=-1, epochs=epochs, seed=0,
                      processes=processes, balance=balance)
    ratios, bounds = [], []
    for s in plan:
        t = rank_tokens(s, lengths, processes)
        ratios.append(max(t) / statistics.mean(t))
        # No split does better than the step's longest example (it goes whole to one process).
        bounds.append(max(1.0, max(lengths[i] for mb in s for i in mb) / statistics.mean(t)))
    micro = [sum(lengths[i] for i in mb) for s in plan for mb in s]
    return {"mean_max_over_mean": statistics.mean(ratios), "worst_step": max(ratios), "steps": len(plan),
            "best_possible_mean": statistics.mean(bounds), "largest_micro_batch_tokens": max(micro)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--accum", type=int, nargs="+", default=[1, 4])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default="bench-out/rank_balance.json")
    args = p.parse_args(argv)

    from chatsmith.models.loading import load_tokenizer

    data = datasets(load_tokenizer("smollm2-135m"))
    rows = []
    print("| data | examples | tokens p50/p99/max | P | A | naive max/mean (worst) | chatsmith max/mean (worst) "
          "| bound |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, lengths in data.items():
        s = sorted(lengths)
        dist = f"{s[len(s) // 2]}/{s[int(0.99 * (len(s) - 1))]}/{s[-1]}"
        for processes in args.processes:
            for accum in args.accum:
                per_step = args.batch_size * processes * accum
                epochs = max(1.0, 20 * per_step / len(lengths))   # at least 20 steps on the small samples
                naive = spread(lengths, processes, accum, args.batch_size, False, epochs)
                ours = spread(lengths, processes, accum, args.batch_size, True, epochs)
                rows.append({"data": name, "examples": len(lengths), "processes": processes, "accum": accum,
                             "batch_size": args.batch_size, "naive": naive, "chatsmith": ours})
                print(f"| {name} | {len(lengths)} | {dist} | {processes} | {accum} | "
                      f"{naive['mean_max_over_mean']:.3f} ({naive['worst_step']:.2f}) | "
                      f"{ours['mean_max_over_mean']:.3f} ({ours['worst_step']:.2f}) | "
                      f"{ours['best_possible_mean']:.3f} |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
