"""SFT throughput: chatsmith against TRL's SFTTrainer, side by side, on the same records.

LoRA r=16 (alpha 32, dropout 0) on every linear layer of the embedded smollm2-135m, fp32, on real
instruction records (Alpaca + self-instruct seed tasks) rendered with the model's own chat template,
loss on the assistant tokens only. Every contender runs in its own fresh process, so its peak RSS
(taken from the kernel with os.wait4) is its own. TRL without packing is fed chatsmith's data
order, so both train on the same examples in every step (the JSON records whether they did).

Reported per contender: real (non-pad) tokens per second over the timed steps (the first
WARMUP_STEPS optimizer steps are excluded for every contender), optimizer steps, the wall time of
the timed steps, peak RSS, model FLOPs utilisation and chatsmith's rate as a multiple of each.

MFU = tokens/s x FLOPs/token / peak, with FLOPs/token = 4 N for LoRA on a frozen base: forward 2N
plus the backward through the activations 2N (no weight gradients for the frozen base; LoRA's own
FLOPs and attention scores are left out). N counts every base parameter once, the tied embedding
as the LM head. The peak is this machine's measured fp32 matmul rate (torch.mm, 2048 x 2048).

    python benchmarks/sft_throughput.py                 # chatsmith + the default TRL settings
    python benchmarks/sft_throughput.py --all-trl       # every setting in TRL_SETTINGS

On a shared machine it waits for other processes to go quiet before each contender and runs a
contender again when they took CPU during its timed steps (--wait-idle, --retries).
    python benchmarks/sft_throughput.py --quick         # smoke check, about two minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL = "smollm2-135m"
WARMUP_STEPS = 2
LR = 2e-4
SEED = 42
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"}

# TRL settings: SFTConfig overrides on top of the common ones set in `run_trl`. "Defaults" means
# SFTConfig's own defaults (gradient checkpointing on, no packing) with fp32 on the CPU.
TRL_SETTINGS: dict[str, dict[str, Any]] = {
    "trl-defaults": {},
    "trl-packing": {"packing": True},
    "trl-no-gc": {"gradient_checkpointing": False},
    "trl-packing-no-gc": {"packing": True, "gradient_checkpointing": False},
    "trl-padding-free": {"padding_free": True, "gradient_checkpointing": False},
}
# Packing fills every row to --max-length, so a step holds about 3x the tokens of the others and
# takes minutes here: those two settings run with --all-trl.
DEFAULT_TRL = ("trl-defaults", "trl-no-gc", "trl-padding-free")
CONTENDERS = ("chatsmith", *TRL_SETTINGS)
# Two processes with torch's threads on two cores slow each other far more than 2x (each parallel
# region waits for a descheduled thread), so a run that shared the machine is flagged.
CONTENDED_CORES = 0.2


# -- data ----------------------------------------------------------------------------------------
def instruction_records(n: int) -> list[dict[str, str]]:
    """Alpaca records then the self-instruct seed instances as Alpaca records, cycled to n."""
    alpaca = json.loads((DATA_DIR / "alpaca_50.json").read_text())
    records = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in alpaca]
    for line in (DATA_DIR / "self_instruct_seed_tasks.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        task = json.loads(line)
        for inst in task["instances"]:
            records.append({"instruction": task["instruction"], "input": inst["input"], "output": inst["output"]})
    return [records[i % len(records)] for i in range(n)]


def user_text(record: dict[str, str]) -> str:
    return record["instruction"] + ("\n\n" + record["input"] if record["input"].strip() else "")


# -- measurements shared by all contenders -------------------------------------------------------
def peak_matmul_gflops(seconds: float = 2.0, n: int = 2048) -> float:
    """This machine's fp32 matmul rate with torch's default thread count (GFLOP/s): torch.mm of
    n x n matrices for about `seconds`, rated by the median of the 5 fastest calls, so that a
    moment of contention from another process does not lower the peak."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 10:
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    fastest = sorted(times)[:5]
    return 2 * n**3 / fastest[len(fastest) // 2] / 1e9


def model_path() -> str:
    from chatsmith.models import resolve_model
    from chatsmith.models.loading import local_path

    return local_path(resolve_model(MODEL))


def base_parameter_count(path: str) -> int:
    """Parameters in the model's safetensors files; a tied LM head is stored (and counted) once."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def machine() -> dict[str, Any]:
    import psutil
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "versions": versions}


def rate(steps: list[dict[str, float]]) -> dict[str, float]:
    """Tokens/s over the steps after the warm-up ones: sum of tokens / sum of step times."""
    timed = [s for s in steps if s["step"] > WARMUP_STEPS]
    tokens = sum(s["tokens"] for s in timed)
    wall = sum(s["step_time_s"] for s in timed)
    return {"timed_steps": len(timed), "timed_tokens": int(tokens), "timed_wall_s": wall,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0}


# -- contenders (each runs in its own process) ---------------------------------------------------
def run_chatsmith(args: argparse.Namespace) -> dict[str, Any]:
    import chatsmith.train.sft as sft
    from chatsmith.config import SFTConfig
    from chatsmith.data import Conversation, Message

    # run_sft ends by merging the adapter and saving final/; TRL's run (save_strategy "no") does not,
    # so note the peak reached before that save as well.
    peak_before_save: dict[str, float] = {}
    save_final = sft.save_final

    def noting_save_final(*a: Any, **kw: Any) -> Any:
        peak_before_save["mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return save_final(*a, **kw)

    sft.save_final = noting_save_final

    # The loop logs each step as soon as it ends (log_every=1): note when, to tell the parent which
    # stretch of time each step was.
    import chatsmith.train.loop as loop

    step_ends: dict[int, float] = {}
    log_record = loop.Trainer._log

    def noting_log(self: Any, record: dict[str, float]) -> None:
        step_ends.setdefault(int(record["step"]), time.time())
        log_record(self, record)

    loop.Trainer._log = noting_log

    convs = [Conversation([Message("user", user_text(r)), Message("assistant", r["output"])])
             for r in instruction_records(args.records)]
    with tempfile.TemporaryDirectory(prefix="bench-chatsmith-") as tmp:
        cfg = SFTConfig(model=MODEL, output=tmp, method="lora", lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                        lora_dropout=LORA["dropout"], lora_targets=LORA["targets"], max_steps=args.steps,
                        batch_size=args.batch_size, max_length=args.max_length, lr=LR, save_every=0,
                        log_every=1, seed=SEED, precision="fp32")
        sft.run_sft(cfg, conversations=convs)
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    steps = [{"step": r["step"], "tokens": r["tokens"], "step_time_s": r["step_time_s"], "loss": r["loss"],
              "end_unix": step_ends[r["step"]]} for r in map(json.loads, lines) if "tokens" in r]
    return {"steps": steps, "optimizer_steps": len(steps), "train_examples": summary["train_examples"],
            "peak_rss_before_final_save_mb": peak_before_save.get("mb"),
            "loss_on": "assistant tokens (chatsmith's template renderer: the reply and its <|im_end|>)",
            "settings": {"batching": "padding-free rows (examples concatenated, position ids restart)",
                         "gradient_checkpointing": cfg.gradient_checkpointing, "packing": cfg.packing}}


def run_trl(args: argparse.Namespace, name: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    records = instruction_records(args.records)

    # assistant_only_loss needs {% generation %} markers, which TRL adds only to templates it knows.
    try:
        assistant_only = has_generation_markers(tokenizer.chat_template) or \
            get_training_chat_template(tokenizer) is not None
    except ValueError:
        assistant_only = False
    if assistant_only:
        rows = [{"messages": [{"role": "user", "content": user_text(r)},
                              {"role": "assistant", "content": r["output"]}]} for r in records]
        loss_on = "assistant tokens (conversational 'messages', assistant_only_loss=True)"
    else:
        rows = [{"prompt": [{"role": "user", "content": user_text(r)}],
                 "completion": [{"role": "assistant", "content": r["output"]}]} for r in records]
        loss_on = ("completion tokens (conversational prompt/completion, completion_only_loss; "
                   "assistant_only_loss=True is refused: this template has no {% generation %} markers "
                   "and TRL cannot patch it)")

    overrides = dict(TRL_SETTINGS[name])
    # TRL refuses max_length with padding_free but no packing; truncate after preparation instead,
    # exactly as its own max_length would.
    truncate_after = overrides.get("padding_free") and not overrides.get("packing")
    config = SFTConfig(
        output_dir=str(Path(tempfile.gettempdir()) / f"bench-{name}"), report_to="none", use_cpu=True, bf16=False, fp16=False,
        learning_rate=LR, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, save_strategy="no", logging_steps=1, dataloader_num_workers=0,
        seed=SEED, max_length=None if truncate_after else args.max_length, disable_tqdm=False, **overrides)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["targets"], task_type="CAUSAL_LM")

    steps: list[dict[str, float]] = []
    pending = {"tokens": 0, "targets": 0}

    class CountingTrainer(SFTTrainer):
        def _get_train_sampler(self, *a: Any, **kw: Any) -> Any:
            if config.packing:   # packed rows are other units than examples: TRL's own shuffle
                return super()._get_train_sampler(*a, **kw)
            # chatsmith's data order (it depends only on the number of examples and the seed), so
            # that every step trains on the same examples in both and the rates compare like for like.
            from chatsmith.train.plan import plan_steps

            plan = plan_steps([1] * len(self.train_dataset), batch_size=args.batch_size, grad_accum=1,
                              max_steps=args.steps, epochs=1.0, seed=SEED)
            return [i for micro in plan for mb in micro for i in mb]

        def training_step(self, model: Any, inputs: dict[str, Any], *a: Any, **kw: Any) -> Any:
            # Padded batches carry an attention mask; padding-free ones are a single row with no pad.
            if "attention_mask" in inputs:
                pending["tokens"] += int(inputs["attention_mask"].sum())
            else:
                pending["tokens"] += int(inputs["input_ids"].numel())
            pending["targets"] += int((inputs["labels"] != -100).sum())
            return super().training_step(model, inputs, *a, **kw)

    class StepClock(TrainerCallback):
        # A step's time runs from the end of the previous step to the end of this one, so it holds
        # the data loading and collation of the step, as chatsmith's step_time_s does.
        last = 0.0

        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            StepClock.last = time.perf_counter()

        def on_step_end(self, args_: Any, state: Any, *a: Any, **kw: Any) -> None:
            now = time.perf_counter()
            steps.append({"step": state.global_step, "tokens": pending["tokens"], "targets": pending["targets"],
                          "step_time_s": now - StepClock.last, "end_unix": time.time()})
            pending["tokens"] = pending["targets"] = 0
            StepClock.last = now

    trainer = CountingTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, peft_config=peft_config, callbacks=[StepClock()])
    if truncate_after:
        trainer.train_dataset = trainer.train_dataset.map(
            lambda ex: {"input_ids": ex["input_ids"][: args.max_length], "labels": ex["labels"][: args.max_length]}
        ).filter(lambda ex: any(t != -100 for t in ex["labels"]))
    out = trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)   # save_strategy "no": only run metadata is there
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for s, loss in zip(steps, losses, strict=False):
        s["loss"] = loss
    return {"steps": steps, "optimizer_steps": out.global_step, "loss_on": loss_on,
            "train_examples": len(trainer.train_dataset),
            "settings": {"gradient_checkpointing": config.gradient_checkpointing, "packing": config.packing,
                         "padding_free": trainer.padding_free, "max_length": config.max_length,
                         "truncated_after_preparation": bool(truncate_after)}}


def child_main(args: argparse.Namespace) -> None:
    """Run one contender and write its result to args.result."""
    t0 = time.perf_counter()
    result = run_chatsmith(args) if args.child == "chatsmith" else run_trl(args, args.child)
    result["process_wall_s"] = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps(result))


# -- the parent ------------------------------------------------------------------------------------
def _busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds all processes of the machine have run, seconds stolen by the hypervisor)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0), getattr(t, "steal", 0.0)


def wait_for_idle(max_wait_s: float, threshold_cores: float = 0.3, window_s: float = 3.0) -> float:
    """Wait (at most max_wait_s) until other processes keep fewer than `threshold_cores` cores busy
    over a `window_s` window; return the cores they kept busy in the last window."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0, _ = _busy_cpu_s()
        me0 = sum(os.times()[:2])
        time.sleep(window_s)
        others = max(0.0, _busy_cpu_s()[0] - busy0 - (sum(os.times()[:2]) - me0)) / window_s
        if others < threshold_cores or time.monotonic() >= deadline:
            return others


class CpuSampler:
    """Samples, every `interval_s`, the machine's busy CPU seconds, one child's and this process's,
    so that the cores other processes kept busy can be told for any stretch of a child's run."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        import threading

        import psutil

        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, float, float]] = []   # (unix time, machine, child, me)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            t = self.proc.cpu_times()
            child = t.user + t.system
        except Exception:   # the child has exited
            child = self.samples[-1][2] if self.samples else 0.0
        self.samples.append((time.time(), _busy_cpu_s()[0], child, sum(os.times()[:2])))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def other_cores(self, t0: float, t1: float) -> float | None:
        """Mean cores busy with other processes between unix times t0 and t1 (None: no samples)."""
        before = [s for s in self.samples if s[0] <= t0]
        after = [s for s in self.samples if s[0] >= t1]
        if not before or not after:
            return None
        a, b = before[-1], after[0]
        return max(0.0, (b[1] - a[1]) - (b[2] - a[2]) - (b[3] - a[3])) / max(b[0] - a[0], 1e-9)


def run_child(name: str, args: argparse.Namespace, model_dir: str, log_dir: Path) -> dict[str, Any]:
    """Run one contender in a fresh process. Its peak RSS and CPU time come from the kernel (wait4
    rusage of that child alone). The cores other processes kept busy during each of its steps are
    recorded too: on a shared machine they are what makes two runs of the same contender differ."""
    result_file = log_dir / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--result", str(result_file),
           "--model-dir", model_dir, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--records", str(args.records), "--max-length", str(args.max_length)]
    log_path = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        sampler = CpuSampler(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_file.is_file():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        return {"error": f"exit status {proc.returncode}; log {log_path}", "log_tail": tail}
    result = json.loads(result_file.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024   # Linux reports kilobytes
    result["child_wall_s"] = wall
    result["child_cpu_s"] = usage.ru_utime + usage.ru_stime
    for st in result["steps"]:
        st["other_processes_cores"] = sampler.other_cores(st["end_unix"] - st["step_time_s"], st["end_unix"])
    steps = result["steps"]
    if len(steps) > WARMUP_STEPS:   # over the timed steps: from the end of the warm-up to the last step's end
        result["other_processes_cores"] = sampler.other_cores(steps[WARMUP_STEPS - 1]["end_unix"],
                                                              steps[-1]["end_unix"])
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per contender (default 20; --quick 3)")
    p.add_argument("--batch-size", type=int, default=None, help="examples (TRL packing: rows) per step (default 4)")
    p.add_argument("--records", type=int, default=None, help="instruction records, cycled (default 256)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (packed row for TRL packing)")
    p.add_argument("--quick", action="store_true", help="a very short run for smoke checks")
    p.add_argument("--only", choices=CONTENDERS, action="append", help="run only this contender (repeatable)")
    p.add_argument("--all-trl", action="store_true", help=f"every TRL setting, not only {', '.join(DEFAULT_TRL)}")
    p.add_argument("--wait-idle", type=float, default=300, metavar="SECONDS",
                   help="on a shared machine, wait up to this long before each contender for other processes "
                        "to go quiet (0: do not wait)")
    p.add_argument("--retries", type=int, default=2,
                   help="run a contender again (up to this many times) when other processes shared the CPU "
                        f"during its timed steps (more than {CONTENDED_CORES} cores on average)")
    p.add_argument("--out", default="bench-out/sft_throughput.json", help="where to write the JSON results")
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = {"steps": 3, "batch_size": 2, "records": 16}
    full = {"steps": 20, "batch_size": 4, "records": 256}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps <= WARMUP_STEPS:
        p.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    return args


def run_contender(name: str, args: argparse.Namespace, model_dir: str, log_dir: Path, console: Any) -> dict[str, Any]:
    """Run one contender, again (up to --retries times) when other processes shared the CPU."""
    for attempt in range(1, args.retries + 2):
        console.print(f"[bold]{name}[/]: {args.steps} steps, batch {args.batch_size}, {args.records} records "
                      f"(log: {log_dir / (name + '.log')})" + (f", attempt {attempt}" if attempt > 1 else ""))
        before = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
        res = run_child(name, args, model_dir, log_dir)
        res.update(attempt=attempt, other_processes_cores_before=before)
        if "error" in res:
            console.print(f"  [red]failed[/]: {res['error']}\n{res['log_tail']}")
            return res
        res.update(rate(res["steps"]))
        console.print(f"  {res['tokens_per_s']:.1f} real tokens/s, peak RSS {res['peak_rss_mb']:.0f} MB, process "
                      f"{res['child_wall_s']:.0f} s; other processes kept {res['other_processes_cores']:.2f} cores "
                      "busy during the timed steps")
        if res["other_processes_cores"] <= CONTENDED_CORES:
            break
        if attempt <= args.retries:
            console.print("  [yellow]the machine was shared: running it again[/]")
    return res


def results_table(results: dict[str, dict[str, Any]], ratios: dict[str, float], args: argparse.Namespace) -> Any:
    from rich.table import Table

    table = Table(title=f"SFT throughput: LoRA r=16 on {MODEL}, fp32, batch {args.batch_size}, {args.steps} steps "
                        f"(first {WARMUP_STEPS} not timed), {args.records} records")
    for col in ("contender", "real tok/s", "opt. steps", "timed wall s", "peak RSS MB", "MFU", "chatsmith x",
                "others' cores"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for name, res in results.items():
        if "error" in res:
            table.add_row(name, "failed", *[""] * 6)
            continue
        ratio = ratios.get(f"chatsmith / {name}")
        contended = res["other_processes_cores"] > CONTENDED_CORES
        table.add_row(name + (" (contended)" if contended else ""), f"{res['tokens_per_s']:.1f}",
                      str(res["optimizer_steps"]), f"{res['timed_wall_s']:.1f}", f"{res['peak_rss_mb']:.0f}",
                      f"{100 * res['mfu']:.1f}%", f"{ratio:.2f}" if ratio else "",
                      f"{res['other_processes_cores']:.2f}")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    import torch
    from rich.console import Console

    console = Console(width=max(Console().width, 120))
    names = args.only or (["chatsmith", "trl-defaults"] if args.quick else
                          ["chatsmith", *(TRL_SETTINGS if args.all_trl else DEFAULT_TRL)])
    out = Path(args.out)
    log_dir = out.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    model_dir = model_path()   # converts the embedded GGUF once (cached), outside every contender's clock
    n_params = base_parameter_count(model_dir)
    flops_per_token = 4 * n_params
    # The peak is measured before and after the contenders and the higher one kept: a process busy
    # during one measurement would otherwise inflate every MFU.
    console.print("measuring the fp32 matmul peak (torch.mm 2048x2048, ~2 s; again at the end)...")
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    peaks = [peak_matmul_gflops()]
    console.print(f"peak {peaks[0]:.1f} GFLOP/s; N = {n_params / 1e6:.1f}M parameters; FLOPs/token = 4N")

    results = {name: run_contender(name, args, model_dir, log_dir, console) for name in names}

    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    peaks.append(peak_matmul_gflops())
    peak = max(peaks)
    ok = {name: res for name, res in results.items() if "error" not in res}
    for res in ok.values():
        res["mfu"] = res["tokens_per_s"] * flops_per_token / (peak * 1e9)
    ratios = {}
    if "chatsmith" in ok:
        cs = ok["chatsmith"]
        for name, res in ok.items():
            if name != "chatsmith":
                res["same_batches_as_chatsmith"] = [s["tokens"] for s in res["steps"]] == \
                    [s["tokens"] for s in cs["steps"]]
                if res["tokens_per_s"] > 0:
                    ratios[f"chatsmith / {name}"] = cs["tokens_per_s"] / res["tokens_per_s"]

    console.print(results_table(results, ratios, args))
    if any(r["other_processes_cores"] > CONTENDED_CORES for r in ok.values()):
        console.print(f"[yellow](contended): other processes kept more than {CONTENDED_CORES} cores busy during "
                      "its timed steps on average; its numbers are not comparable, run again on a quiet machine[/]")
    console.print(f"MFU = real tokens/s x 4N / peak; N = {n_params:,} (tied embedding counted once, as the LM "
                  f"head); peak = {peak:.1f} GFLOP/s measured fp32 torch.mm on {torch.get_num_threads()} threads")

    report = {
        "benchmark": "sft_throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "settings": {"model": MODEL, "steps": args.steps, "batch_size": args.batch_size, "records": args.records,
                     "max_length": args.max_length, "warmup_steps_excluded": WARMUP_STEPS, "lr": LR, "seed": SEED,
                     "lora": LORA, "precision": "fp32"},
        "peak_matmul_gflops": peak,
        "peak_matmul_gflops_before_after": peaks,
        "n_params": n_params,
        "flops_per_token": flops_per_token,
        "mfu_formula": "MFU = real_tokens_per_s * 4 * N / peak_fp32_matmul_flops; 4N = forward 2N + backward "
                       "through the activations 2N (LoRA on a frozen base), N counts the tied embedding once",
        "contenders": results,
        "ratios": ratios,
    }
    out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out}")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
