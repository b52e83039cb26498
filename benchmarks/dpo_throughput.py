"""Preference-tuning throughput: chatsmith against TRL, side by side, on the same pairs.

Two tasks, each with the same records, batch (pairs per optimizer step), max length, LoRA (r=16,
alpha 32, dropout 0, every linear layer of the embedded smollm2-135m), fp32, on the CPU:

- dpo: `chatsmith dpo --loss dpo` against TRL's `DPOTrainer` (sigmoid loss, same beta; both get
  the reference by disabling the adapter, no second model copy).
- rm:  `chatsmith rm` (Bradley-Terry) against TRL's `RewardTrainer` (LoRA, SEQ_CLS head).

The pairs are the built-in preference demo set (`builtin:identity-preferences`), in TRL's
conversational format for TRL ({prompt: [user], chosen: [assistant], rejected: [assistant]}), so
both render them with the model's own chat template. Every contender runs in its own fresh
process, so its peak RSS (from os.wait4) is its own. The first WARMUP_STEPS steps are not timed.

Reported: pairs per second over the timed steps, peak RSS, and chatsmith's rate and memory as a
multiple of TRL's. Target (issue 3): at least 1.5x TRL's pairs/s at no more than its memory.

    python benchmarks/dpo_throughput.py               # both tasks, 20 steps each
    python benchmarks/dpo_throughput.py --quick       # smoke check (3 steps, 2 TRL settings)
    python benchmarks/dpo_throughput.py --task dpo --only chatsmith
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m"
WARMUP_STEPS = 2
SEED = 42
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
# TRL settings on top of the common ones in run_trl; "defaults" are its config's own defaults.
TRL_SETTINGS: dict[str, dict[str, Any]] = {
    "trl-defaults": {},
    "trl-no-gc": {"gradient_checkpointing": False},
}
# chatsmith-gc: chatsmith with gradient checkpointing, to compare memory with TRL's defaults (which
# checkpoint). chatsmith-accum: the same optimizer batch as micro-batches of --micro-batch records with gradient
# accumulation (the same gradient; activations of one micro-batch at a time, no recomputation).
# Both run only when asked for with --only.
CONTENDERS = ("chatsmith", "chatsmith-gc", "chatsmith-accum", *TRL_SETTINGS)
TASKS = ("dpo", "rm")


def pair_records(n: int) -> list[dict[str, str]]:
    from chatsmith.data.builtin import preference_demo_records

    recs = preference_demo_records()
    return [recs[i % len(recs)] for i in range(n)]


def model_path() -> str:
    from chatsmith.models.loading import local_path
    from chatsmith.models.registry import resolve_model

    return local_path(resolve_model(MODEL))


def timed_rate(step_times: list[float], pairs_per_step: int) -> dict[str, float]:
    timed = step_times[WARMUP_STEPS:] or step_times
    total = sum(timed)
    return {"timed_steps": len(timed), "timed_s": total, "pairs_per_s": pairs_per_step * len(timed) / max(total, 1e-9)}


# -- contenders (each in a child process) --------------------------------------------------------------
def run_chatsmith(args: argparse.Namespace, out_dir: Path, gc: bool = False, accum: bool = False) -> dict[str, Any]:
    from chatsmith.config import DPOConfig, RMConfig

    data = out_dir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pair_records(args.records)))
    common = dict(model=MODEL, data=[str(data)], output=str(out_dir / "run"), method="lora", lora_r=LORA["r"],
                  lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                  batch_size=args.micro_batch if accum else args.batch_size,
                  grad_accum=args.batch_size // args.micro_batch if accum else 1,
                  max_steps=args.steps, max_length=args.max_length, eval_split=0, lr=args.lr, seed=SEED,
                  precision="fp32", log_every=1, gradient_checkpointing=gc)
    if args.task == "dpo":
        from chatsmith.train.dpo import run_dpo

        run = run_dpo(DPOConfig(loss="dpo", beta=args.beta, **common))
    else:
        from chatsmith.train.rm import run_rm

        run = run_rm(RMConfig(**common))
    steps = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    times = [s["step_time_s"] for s in steps if "step_time_s" in s]
    return {"steps": len(times), **timed_rate(times, args.batch_size)}


def run_trl(args: argparse.Namespace, name: str, out_dir: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    path = model_path()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pair_records(args.records)]
    ds = Dataset.from_list(rows)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    common = dict(output_dir=str(out_dir / "trl"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                  learning_rate=args.lr, max_length=args.max_length, logging_steps=1, report_to=[], save_strategy="no",
                  use_cpu=True, bf16=False, fp16=False, seed=SEED, dataloader_num_workers=0, lr_scheduler_type="cosine", max_grad_norm=1.0,
                  warmup_steps=1, **TRL_SETTINGS[name])
    if args.task == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                              target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=model, args=DPOConfig(beta=args.beta, **common), train_dataset=ds,
                             processing_class=tok, peft_config=peft_cfg, callbacks=[Clock()])
    else:
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                              target_modules="all-linear", task_type="SEQ_CLS")
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=ds, processing_class=tok,
                                peft_config=peft_cfg, callbacks=[Clock()])
    trainer.train()
    return {"steps": len(times), **timed_rate(times, args.batch_size)}


def child_main(args: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        res = (run_chatsmith(args, out, gc=args.child == "chatsmith-gc", accum=args.child == "chatsmith-accum")
               if args.child.startswith("chatsmith")
               else run_trl(args, args.child, out))
    Path(args.result).write_text(json.dumps(res))


def run_child_measured(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one contender in a fresh process; its own peak RSS is ru_maxrss of exactly that process (os.wait4)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [sys.executable, __file__, "--child", name, "--result", result, "--task", args.task,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--records", str(args.records),
           "--max-length", str(args.max_length), "--micro-batch", str(args.micro_batch), "--beta", str(args.beta), "--lr", str(args.lr)]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as errf:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        errf.seek(0)
        err = errf.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": err[-3000:], "wall_s": wall}
    res = json.loads(Path(result).read_text())
    os.unlink(result)
    res.update(wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024)   # Linux: ru_maxrss in KiB
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, action="append", help="dpo and/or rm (default both)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per contender (default 20; --quick 3)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--micro-batch", type=int, default=2,
                   help="chatsmith-accum: records per micro-batch (must divide --batch-size)")
    p.add_argument("--records", type=int, default=240, help="preference pairs (the demo set, cycled)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per prompt+answer")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--quick", action="store_true", help="a very short run for smoke checks")
    p.add_argument("--only", choices=CONTENDERS, action="append", help="run only this contender (repeatable)")
    p.add_argument("--out", default="bench-out/dpo_throughput.json", help="where to write the JSON results")
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 20
    if args.micro_batch < 1 or args.batch_size % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide --batch-size {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        args.task = args.task[0]
        child_main(args)
        return 0
    tasks = args.task or list(TASKS)
    contenders = args.only or [c for c in CONTENDERS if c not in ("chatsmith-gc", "chatsmith-accum")]
    results: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
                               "settings": {"model": MODEL, "lora": LORA, "steps": args.steps,
                                            "batch_size_pairs": args.batch_size, "max_length": args.max_length,
                                            "beta": args.beta, "records": args.records, "warmup_steps": WARMUP_STEPS},
                               "tasks": {}}
    for task in tasks:
        args.task = task
        rows = {}
        for name in contenders:
            print(f"[{task}] running {name} ...", file=sys.stderr, flush=True)
            rows[name] = run_child_measured(name, args)
            if "error" in rows[name]:
                print(f"[{task}] {name} failed:\n{rows[name]['error']}", file=sys.stderr)
        results["tasks"][task] = rows
    print(f"\n{'task':5} {'contender':14} {'pairs/s':>9} {'peak RSS MB':>12} {'chatsmith x':>12} {'mem ratio':>10}")
    for task, rows in results["tasks"].items():
        ours = rows.get("chatsmith", {})
        for name, r in rows.items():
            if "error" in r:
                print(f"{task:5} {name:14} {'failed':>9}")
                continue
            speed = ours.get("pairs_per_s", 0) / r["pairs_per_s"] if r["pairs_per_s"] and "pairs_per_s" in ours else 0
            mem = ours.get("peak_rss_mb", 0) / r["peak_rss_mb"] if "peak_rss_mb" in ours else 0
            r["chatsmith_speedup"], r["chatsmith_memory_ratio"] = speed, mem
            print(f"{task:5} {name:14} {r['pairs_per_s']:9.3f} {r['peak_rss_mb']:12.0f} "
                  f"{speed if name != 'chatsmith' else 1.0:12.2f} {mem if name != 'chatsmith' else 1.0:10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
