"""Every distribution recipe against one process, on this CPU: the same sft job (tiny seeded Llama,
Alpaca sample, 3 steps, packing, clipping at 1.0) on 1 process with --grad-accum 2 and on 2 gloo
processes through `chatsmith sft --num-processes 2 --accelerate-config recipes/accelerate/X.yaml`
for ddp, fsdp, fsdp_offload, zero2 and zero3 (the last two need `pip install 'chatsmith[deepspeed]'`;
without it their rows say so). Then each run resumes from its step-2 checkpoint (the last
checkpoint and final/ removed) and must finish with the same weights.

Reported per recipe: largest weight difference of final/ against 1 process, largest relative
difference of the step losses and of the logged gradient norms, the same after resuming, what the
checkpoint holds, and the wall time of the launch. There is no peer: the point is that the one loop
gives the 1-process answer under every strategy. Hold the benchmark lock on a shared machine:

    flock /tmp/bench.lock python benchmarks/sharded_cpu.py [--out bench-out/sharded_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RECIPES = ["ddp", "fsdp", "fsdp_offload", "zero2", "zero3"]


def sft_args(out: Path) -> list[str]:
    """The job (evaluation off: the table in docs/scaling.md compares training alone)."""
    return ["sft", "--model", "tiny-random-llama", "--data", str(SHARED / "alpaca_50.json"), "--method", "full",
            "--max-steps", "3", "--batch-size", "2", "--lr", "1e-3", "--max-length", "96", "--max-grad-norm", "1.0",
            "--warmup-ratio", "0", "--scheduler", "constant", "--seed", "3", "--eval-split", "0", "--packing",
            "--save-every", "2", "--output", str(out)]


def run(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "chatsmith", *cmd], capture_output=True, text=True, env=env,
                       timeout=900)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return dt, r.stderr


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def compare(a: Path, b: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    ra, rb = records(a), records(b)

    def rel(x: float, y: float) -> float:
        return abs(x - y) / max(abs(x), 1e-12)

    return {"max_weight_diff": max((wa[k] - wb[k]).abs().max().item() for k in wa),
            "max_loss_rel_diff": max(rel(x["loss"], y["loss"]) for x, y in zip(ra, rb, strict=True)),
            "max_grad_norm_rel_diff": max(rel(x["grad_norm"], y["grad_norm"]) for x, y in zip(ra, rb, strict=True))}


def main() -> None:
    """Run the table; print it and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-out/sharded_cpu.json")
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    args = ap.parse_args()
    try:
        import deepspeed  # noqa: F401
        have_ds = True
    except ImportError:
        have_ds = False
    work = Path(tempfile.mkdtemp(prefix="sharded_cpu_"))
    rows = []
    try:
        t_one, _ = run([*sft_args(work / "one"), "--grad-accum", "2"])
        rows.append({"recipe": "1 process", "wall_s": round(t_one, 1)})
        for name in args.recipes:
            if name.startswith("zero") and not have_ds:
                rows.append({"recipe": name, "note": "deepspeed not installed"})
                continue
            out = work / name
            launch = ["--num-processes", "2", "--accelerate-config", str(REPO / "recipes" / "accelerate" / f"{name}.yaml")]
            t, _ = run([*sft_args(out), *launch])
            row = {"recipe": name, "wall_s": round(t, 1), **compare(work / "one", out)}
            ckpt = out / "checkpoints" / "step-000002"
            row["checkpoint"] = sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("random_states"))
            first = out.with_name(name + "_uninterrupted")
            shutil.copytree(out, first)
            shutil.rmtree(out / "checkpoints" / "step-000003")
            shutil.rmtree(out / "final")
            _, err = run([*sft_args(out), *launch, "--resume"])
            assert "resumed from checkpoint at step 2 of 3" in err, err[-2000:]
            row["resume_max_weight_diff"] = compare(first, out)["max_weight_diff"]
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'recipe':14} {'wall s':>7} {'max |dw|':>10} {'loss rel':>9} {'gnorm rel':>9} {'resume |dw|':>11}  checkpoint")
    for r in rows:
        if "max_weight_diff" not in r:
            print(f"{r['recipe']:14} {r.get('wall_s', ''):>7} {r.get('note', '')}")
            continue
        print(f"{r['recipe']:14} {r['wall_s']:>7} {r['max_weight_diff']:>10.2e} {r['max_loss_rel_diff']:>9.1e} "
              f"{r['max_grad_norm_rel_diff']:>9.1e} {r['resume_max_weight_diff']:>11.1e}  {', '.join(r['checkpoint'])}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "load_average": os.getloadavg()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
