"""RL throughput: chatsmith GRPO against TRL's GRPOTrainer, side by side, on the same job.

Job: GRPO with LoRA r=16 (alpha 32, dropout 0, all linear layers) on the embedded smollm2-135m,
fp32 on the CPU, P prompts per step x G completions each, at most T new tokens, temperature 1,
no KL term (beta 0), token-level loss aggregation (TRL's "dapo"), one update per rollout, the
same reward (last number of the reply equals the answer), and the same prompts: the built-in
arithmetic word problems, the first P x steps of chatsmith's order given to both (TRL's sampler
shuffles them within the run). TRL runs without vLLM (the CPU has none): `model.generate`.

Each contender runs in its own fresh process, so its peak RSS (from the kernel, os.wait4) is its
own. Reported: episodes/s (prompt x completion pairs per second) and generated tokens/s over the
timed steps (the first step is warm-up and excluded), the share of step time spent generating
(rollout incl. rewards) and training, peak RSS, and chatsmith's episodes/s as a multiple of TRL's.

    python benchmarks/rl_throughput.py              # 8 timed steps, P=4, G=8, T=32
    python benchmarks/rl_throughput.py --quick      # smoke check: 2 steps, P=2, G=4, T=16
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
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LR = 1e-5
SEED = 0


def prompt_records(n: int) -> list[dict[str, Any]]:
    from chatsmith.data.tasks import task_records

    recs = task_records("arithmetic", "train", seed=SEED)
    return [recs[i % len(recs)] for i in range(n)]


def reward_last_number(completions: list[str], answers: list[str]) -> list[float]:
    from chatsmith.eval.rewards import last_number

    return last_number([""] * len(completions), completions, answer=answers)


def summarise(steps: list[dict[str, float]], episodes_per_step: int) -> dict[str, Any]:
    timed = steps[1:] if len(steps) > 1 else steps   # step 1 is warm-up
    wall = sum(s["step_s"] for s in timed)
    gen = sum(s["gen_s"] for s in timed)
    tokens = sum(s["gen_tokens"] for s in timed)
    return {"timed_steps": len(timed), "wall_s": wall, "episodes_per_s": episodes_per_step * len(timed) / wall,
            "gen_tokens_per_s": tokens / max(gen, 1e-9), "generation_share": gen / wall,
            "training_share": 1 - gen / wall, "mean_step_s": wall / len(timed), "steps": steps}


def run_chatsmith(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from chatsmith.config import GRPOConfig
    from chatsmith.data.prompts import render_prompts
    from chatsmith.data.template import stop_token_ids
    from chatsmith.infer.engine import Engine
    from chatsmith.train.grpo import grpo_trainer
    from chatsmith.train.rollout import load_policy

    torch.manual_seed(SEED)
    out = Path(tempfile.mkdtemp(prefix="rl-bench-chatsmith-"))
    cfg = GRPOConfig(model=MODEL, output=str(out), method="lora", lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                     lora_dropout=LORA["dropout"], lr=LR, batch_size=args.prompts, group_size=args.group_size,
                     max_new_tokens=args.max_new_tokens, max_steps=args.steps, temperature=1.0, kl_coef=0.0,
                     loss_aggregation="token", seed=SEED, max_length=256, precision="fp32",
                     generation_batch_size=args.prompts * args.group_size)
    model, tok, ref = load_policy(cfg, need_reference=False)
    recs = prompt_records(args.prompts * args.steps)
    prompts, _ = render_prompts(tok, recs, template=None, system_prompt=None, max_prompt_tokens=200)
    stops = stop_token_ids(tok)
    engine = Engine(model, tok, max_batch_size=cfg.generation_batch_size)

    def score(episodes: list[Any]) -> dict[str, float]:
        for e, r in zip(episodes, reward_last_number([e.text for e in episodes], [e.record["answer"] for e in episodes])):
            e.reward = r
        return {}

    trainer, _ = grpo_trainer(cfg, model, ref, engine, prompts, steps=args.steps, score=score, run=out,
                              stop_ids=stops)
    trainer.fit()
    steps = [{"step_s": r["step_time_s"], "gen_s": r["rollout_time_s"],
              "gen_tokens": r["response_length"] * args.prompts * args.group_size}
             for r in trainer.history if "step_time_s" in r]
    return {"engine": type(engine).__name__, **summarise(steps, args.prompts * args.group_size)}


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from chatsmith.models import resolve_model
    from chatsmith.models.loading import local_path

    torch.manual_seed(SEED)
    path = local_path(resolve_model(MODEL))
    recs = prompt_records(args.prompts * args.steps)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                            for r in recs])

    def reward(prompts: list, completions: list, answer: list, **kw: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward_last_number(texts, answer)

    out = tempfile.mkdtemp(prefix="rl-bench-trl-")
    targs = GRPOConfig(output_dir=out, per_device_train_batch_size=args.prompts * args.group_size,
                       num_generations=args.group_size, max_completion_length=args.max_new_tokens,
                       gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, beta=0.0,
                       loss_type="dapo", learning_rate=LR, max_steps=args.steps, temperature=1.0, top_p=1.0,
                       logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                       seed=SEED, gradient_checkpointing=False, dataloader_num_workers=0, disable_dropout=True)
    timing: dict[str, float] = {"gen_s": 0.0, "gen_tokens": 0.0}
    steps: list[dict[str, float]] = []

    class TimedGRPO(GRPOTrainer):
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            t0 = time.perf_counter()
            result = super()._generate_and_score_completions(inputs)
            timing["gen_s"] += time.perf_counter() - t0
            timing["gen_tokens"] += float(result["completion_mask"].sum())
            return result

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            timing.update(t0=time.perf_counter(), gen_s=0.0, gen_tokens=0.0)

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            steps.append({"step_s": time.perf_counter() - timing["t0"], "gen_s": timing["gen_s"],
                          "gen_tokens": timing["gen_tokens"]})

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    trainer = TimedGRPO(model=model, reward_funcs=[reward], args=targs, train_dataset=ds, processing_class=tok,
                        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                               target_modules="all-linear", task_type="CAUSAL_LM"),
                        callbacks=[StepClock()])
    trainer.train()
    return {"trl_version": __import__("trl").__version__, **summarise(steps, args.prompts * args.group_size)}


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, __file__, "--child", name, "--result", result_path, "--steps", str(args.steps),
           "--prompts", str(args.prompts), "--group-size", str(args.group_size),
           "--max-new-tokens", str(args.max_new_tokens)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        return {"error": f"exit status {status}", "total_s": time.perf_counter() - t0}
    result = json.loads(Path(result_path).read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024   # Linux reports KiB
    result["total_s"] = time.perf_counter() - t0
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke check: 3 steps (2 timed), P=2, G=4, T=16")
    p.add_argument("--steps", type=int, default=9, help="optimizer steps (the first is warm-up)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (P)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="completion length cap (T)")
    p.add_argument("--only", choices=["chatsmith", "trl"], default=None, help="run one contender")
    p.add_argument("--out", default="bench-out/rl_throughput.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.prompts, args.group_size, args.max_new_tokens = 3, 2, 4, 16
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = run_chatsmith(args) if args.child == "chatsmith" else run_trl(args)
        Path(args.result).write_text(json.dumps(result))
        return 0
    names = [args.only] if args.only else ["chatsmith", "trl"]
    results = {n: run_child(n, args) for n in names}
    ok = {n: r for n, r in results.items() if "error" not in r}
    ratio = (ok["chatsmith"]["episodes_per_s"] / ok["trl"]["episodes_per_s"]) if len(ok) == 2 else None
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"GRPO throughput, smollm2-135m LoRA r=16, P={args.prompts} x G={args.group_size}, "
                    f"T={args.max_new_tokens}, {args.steps - 1} timed steps")
    for col in ("contender", "episodes/s", "gen tokens/s", "generation %", "training %", "s/step", "peak RSS MB"):
        t.add_column(col)
    for n, r in results.items():
        if "error" in r:
            t.add_row(n, r["error"], "", "", "", "", "")
            continue
        t.add_row(n, f"{r['episodes_per_s']:.2f}", f"{r['gen_tokens_per_s']:.1f}", f"{100 * r['generation_share']:.0f}",
                  f"{100 * r['training_share']:.0f}", f"{r['mean_step_s']:.1f}", f"{r['peak_rss_mb']:.0f}")
    Console().print(t)
    if ratio is not None:
        print(f"chatsmith / TRL episodes/s: {ratio:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": {"python": platform.python_version(),
                                                               "cpus": os.cpu_count()},
                               "results": results, "ratio_episodes_per_s": ratio}, indent=2))
    print(f"wrote {out}")
    return 0 if len(ok) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
