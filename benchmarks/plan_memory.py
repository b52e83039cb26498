"""`chatsmith plan` against measured memory: real chatsmith runs of the embedded model on this CPU.

Each case runs in its own process, forked from one that has made the imports a run makes (torch,
model code, peft, accelerate, TensorBoard, matplotlib), so they are paid once: RSS is read in the child
before the run, the stage runs a few optimizer steps and saves its model, and the child's peak RSS
(ru_maxrss, which Linux starts at the RSS of the fork) minus that baseline is the measured peak of the
run. Each case's data renders to exactly the row the planner assumes (`micro_batch_tokens`). The
planner's estimate for the same stage, method, sequence length and batch is printed beside it with
the ratio; the target is within 20%.

    python benchmarks/plan_memory.py                      # sft lora, sft full, dpo lora, grpo lora
    python benchmarks/plan_memory.py --cases sft-lora --seq-len 512 --batch 4
    python benchmarks/plan_memory.py --workers 2            # two cases at once (peak RSS is per process)

tests/test_planner.py calls `compare` with small shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "sft-lora": ("sft", "lora"),
    "sft-full": ("sft", "full"),
    "dpo-lora": ("dpo", "lora"),
    "grpo-lora": ("grpo", "lora"),
}


def _words(tok, n: int, word: str) -> str:
    """A text of exactly n tokens of the embedded tokenizer (one token per word, first one included)."""
    text = word + (" " + word) * (n - 1)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == n, word
    return text


def make_data(stage: str, seq_len: int, batch: int, steps: int, folder: Path) -> str:
    """A data file whose rendered examples are exactly the rows micro_batch_tokens plans: sft and dpo
    put seq_len // 2 tokens before the answer (template included) and the rest in each answer
    (answer words and the end-of-turn tokens after them); a grpo prompt renders to seq_len tokens with
    the assistant header."""
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation
    from chatsmith.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    one = render_conversation(tok, Conversation([Message("user", "x"), Message("assistant", "y")]))
    first_answer = one.loss_mask.index(1)                 # where "y" sits
    tail = len(one.input_ids) - first_answer - 1          # template tokens after the answer
    head = first_answer - 1                               # template tokens before it, but for "x"
    half = seq_len // 2
    n = batch * steps
    path = folder / f"{stage}.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            if stage == "sft":
                rec = {"instruction": _words(tok, half - head, "apple"), "output": _words(tok, seq_len - half - tail, "cat")}
                rows = [render_conversation(tok, Conversation([Message("user", rec["instruction"]),
                                                               Message("assistant", rec["output"])]))]
                assert len(rows[0].input_ids) == seq_len, len(rows[0].input_ids)
            elif stage == "dpo":
                rec = {"prompt": _words(tok, half - head, "apple"), "chosen": _words(tok, seq_len - half - tail, "cat"),
                       "rejected": _words(tok, seq_len - half - tail, "dog")}
            else:
                rec = {"prompt": _words(tok, seq_len - head, "apple"), "answer": "1"}
            f.write(json.dumps(rec) + "\n")
    return str(path)


def import_run_modules() -> None:
    """Import what a run imports lazily (model code, peft, accelerate, TensorBoard, matplotlib), so that the
    baseline is taken after them: their code and import-time arenas (about 0.1 GiB) are the program's, not
    the run's, and the planner does not count the imports of torch either."""
    import accelerate  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import chatsmith.train.dpo  # noqa: F401
    import chatsmith.train.grpo  # noqa: F401
    import chatsmith.train.sft  # noqa: F401


def measured_peak(fn) -> dict:
    """Run `fn()`; RSS before it and the process's peak RSS after it, in bytes (Linux)."""
    import resource

    import psutil

    before = psutil.Process().memory_info().rss
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"before": float(before), "peak": float(peak), "delta": float(peak - before)}


def run_case(name: str, seq_len: int, batch: int, steps: int, group_size: int, max_new: int,
             threads: int | None = None) -> dict:
    """Run one case in this process and return its measured peak (bytes) and the run's shape."""
    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2)))
    from chatsmith.config import DPOConfig, GRPOConfig, SFTConfig

    stage, method = CASES[name]
    out = Path(tempfile.mkdtemp(prefix="plan-mem-"))
    data = make_data(stage, seq_len, batch, steps, out)
    import_run_modules()   # already imported when forked by serve_cases
    common = dict(model="smollm2-135m", data=[data], output=str(out / "run"), method=method, max_steps=steps,
                  batch_size=batch, max_length=seq_len + (8 if stage != "grpo" else max_new + 8), lr=1e-5,
                  eval_at_start=False, save_every=0, seed=0)
    if stage == "sft":
        from chatsmith.train.sft import run_sft
        fn = lambda: run_sft(SFTConfig(**common))   # noqa: E731
    elif stage == "dpo":
        from chatsmith.train.dpo import run_dpo
        fn = lambda: run_dpo(DPOConfig(**common))   # noqa: E731
    else:
        from chatsmith.train.grpo import run_grpo
        fn = lambda: run_grpo(GRPOConfig(**common, group_size=group_size, max_new_tokens=max_new,   # noqa: E731
                                         reward=["length:1000"], eval_prompts=0, temperature=1.0,
                                         generation_batch_size=batch * group_size))
    try:
        m = measured_peak(fn)
        mean_new = max_new
        metrics = out / "run" / "metrics.jsonl"
        if stage == "grpo" and metrics.is_file():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            lens = [r[k] for r in rows for k in r if "completion" in k and "len" in k and "mean" in k.replace("avg", "mean")]
            if lens:
                mean_new = int(round(sum(lens) / len(lens)))
    finally:   # each run saves a 0.5 GiB model: leaving them filled the disk
        shutil.rmtree(out, ignore_errors=True)
    return {**m, "mean_new_tokens": mean_new}


def serve_cases(cases: list[str], seq_len: int, batch: int, steps: int, group_size: int, max_new: int,
                workers: int) -> dict[str, dict]:
    """Import what a run imports once, then fork one child per case (`workers` at a time) and return
    each child's `run_case` result. A forked child starts with the imports already resident (its peak
    RSS starts at its RSS at the fork, Linux), so each case costs its run, not a fresh interpreter's
    ~9 s of imports; the baseline is the same post-import RSS a fresh process would have."""
    import_run_modules()
    out = Path(tempfile.mkdtemp(prefix="plan-mem-results-"))
    running: dict[int, str] = {}
    failed: list[str] = []
    todo = list(cases)
    while todo or running:
        while todo and len(running) < max(1, workers):
            name = todo.pop(0)
            pid = os.fork()
            if pid == 0:   # the child: one case, its result as JSON, and no return into the parent's code
                code = 1
                try:
                    # the cores shared among the cases running at once: more threads only contend
                    threads = max(1, (os.cpu_count() or 2) // max(1, workers))
                    result = run_case(name, seq_len, batch, steps, group_size, max_new, threads)
                    (out / f"{name}.json").write_text(json.dumps(result))
                    code = 0
                except BaseException:   # noqa: BLE001 - said on stderr; the parent reports the case
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            running[pid] = name
        pid, status = os.wait()
        name = running.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(name)
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in cases if name not in failed}
    shutil.rmtree(out, ignore_errors=True)
    if failed:
        raise RuntimeError(f"cases failed: {', '.join(failed)}")
    return results


def compare(cases: list[str], *, seq_len: int, batch: int, steps: int, group_size: int, max_new_tokens: int,
            workers: int = 1) -> list[dict]:
    """Run each case in its own process (`workers` at a time: a process's peak RSS is its own, whatever
    runs beside it) and return rows of measured and estimated GiB, their ratio and the estimate's parts."""
    from chatsmith.planner import GiB, estimate

    cmd = [sys.executable, __file__, "--serve", "--cases", ",".join(cases), "--seq-len", str(seq_len),
           "--batch", str(batch), "--steps", str(steps), "--group-size", str(group_size),
           "--max-new-tokens", str(max_new_tokens), "--workers", str(workers)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not line:
        raise RuntimeError(f"{cases} failed:\n{res.stderr[-3000:]}")
    results = json.loads(line[0][7:])
    measured = [results[name] for name in cases]
    rows = []
    for name, m in zip(cases, measured):
        stage, method = CASES[name]
        e = estimate("smollm2-135m", stage=stage, method=method, seq_len=seq_len, batch=batch,
                     group_size=group_size, max_new_tokens=m["mean_new_tokens"],
                     generation_batch_size=batch * group_size)
        rows.append({"case": name, "measured_gib": m["delta"] / GiB, "estimate_gib": e.total / GiB,
                     "ratio": e.total / m["delta"], "components_gib": {k: v / GiB for k, v in e.components.items()},
                     "new_tokens": m["mean_new_tokens"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="cases measured at once (each in its own process)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    if a.serve:
        print("RESULT " + json.dumps(serve_cases(a.cases.split(","), a.seq_len, a.batch, a.steps, a.group_size,
                                                 a.max_new_tokens, a.workers)))
        return
    rows = compare(a.cases.split(","), seq_len=a.seq_len, batch=a.batch, steps=a.steps, group_size=a.group_size,
                   max_new_tokens=a.max_new_tokens, workers=a.workers)
    for r in rows:
        print(f"{r['case']:10s} measured {r['measured_gib']:6.3f} GiB  estimate {r['estimate_gib']:6.3f} GiB  "
              f"ratio {r['ratio']:.3f}  " + " ".join(f"{k}={v:.3f}" for k, v in r["components_gib"].items()),
              flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
