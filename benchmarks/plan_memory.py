"""`chatsmith plan` against measured memory: real chatsmith runs of the embedded model on this CPU.

Each case runs in its own process: RSS is read after the imports (including those a run makes lazily:
model code, peft, accelerate, TensorBoard, matplotlib), the stage runs a few optimizer steps in-process, and the process's peak RSS (ru_maxrss) minus that baseline is the measured peak
of the run. The planner's estimate for the same stage, method, sequence length and batch is printed
beside it with the ratio; the target is within 20%.

    python benchmarks/plan_memory.py                      # sft lora, sft full, dpo lora, grpo lora
    python benchmarks/plan_memory.py --cases sft-lora --seq-len 512 --batch 4
    python benchmarks/plan_memory.py --workers 2            # two cases at once (peak RSS is per process)

tests/test_planner.py calls `compare` with small shapes.
"""

from __future__ import annotations

import argparse
import json
import os
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
    """A text of exactly n tokens of the embedded tokenizer (one token per ' word')."""
    text = (" " + word) * n
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == n, word
    return text.strip()


def make_data(stage: str, seq_len: int, batch: int, steps: int, folder: Path) -> tuple[str, int]:
    """A data file whose rendered examples are exactly what micro_batch_tokens assumes (about half
    prompt, half answer), and the number of template tokens around them."""
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation
    from chatsmith.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    convo = Conversation([Message("user", "x"), Message("assistant", "y")])
    overhead = len(render_conversation(tok, convo).input_ids) - 2     # template tokens of one exchange
    half = seq_len // 2
    n = batch * steps
    path = folder / f"{stage}.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            if stage == "sft":
                rec = {"instruction": _words(tok, half - overhead, "apple"), "output": _words(tok, seq_len - half, "pear")}
            elif stage == "dpo":
                rec = {"prompt": _words(tok, half - overhead, "apple"), "chosen": _words(tok, seq_len - half, "pear"),
                       "rejected": _words(tok, seq_len - half, "plum")}
            else:
                rec = {"prompt": _words(tok, seq_len - overhead, "apple"), "answer": "1"}
            f.write(json.dumps(rec) + "\n")
    return str(path), overhead


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


def run_case(name: str, seq_len: int, batch: int, steps: int, group_size: int, max_new: int) -> dict:
    """Run one case in this process and return its measured peak (bytes) and the run's shape."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    from chatsmith.config import DPOConfig, GRPOConfig, SFTConfig

    stage, method = CASES[name]
    out = Path(tempfile.mkdtemp(prefix="plan-mem-"))
    data, _ = make_data(stage, seq_len, batch, steps, out)
    import_run_modules()
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
    m = measured_peak(fn)
    mean_new = max_new
    metrics = out / "run" / "metrics.jsonl"
    if stage == "grpo" and metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        lens = [r[k] for r in rows for k in r if "completion" in k and "len" in k and "mean" in k.replace("avg", "mean")]
        if lens:
            mean_new = int(round(sum(lens) / len(lens)))
    return {**m, "mean_new_tokens": mean_new}


def _measure_in_subprocess(name: str, seq_len: int, batch: int, steps: int, group_size: int, max_new: int) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--seq-len", str(seq_len), "--batch", str(batch),
           "--steps", str(steps), "--group-size", str(group_size), "--max-new-tokens", str(max_new)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not line:
        raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
    return json.loads(line[0][7:])


def compare(cases: list[str], *, seq_len: int, batch: int, steps: int, group_size: int, max_new_tokens: int,
            workers: int = 1) -> list[dict]:
    """Run each case in its own process (`workers` at a time: a process's peak RSS is its own, whatever
    runs beside it) and return rows of measured and estimated GiB, their ratio and the estimate's parts."""
    from concurrent.futures import ThreadPoolExecutor

    from chatsmith.planner import GiB, estimate

    with ThreadPoolExecutor(max(1, workers)) as pool:
        measured = list(pool.map(lambda n: _measure_in_subprocess(n, seq_len, batch, steps, group_size,
                                                                  max_new_tokens), cases))
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
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_case(a.one, a.seq_len, a.batch, a.steps, a.group_size, a.max_new_tokens)))
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
