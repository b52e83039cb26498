"""Speed of chatsmith's int4 (Q4_1) and block-int8 (Q8_0 head) CPU kernels (chatsmith/infer/native/q4.cpp).

Times the kernels on the embedded SmolLM2-135M's shapes (random weights, quantized as the engine
does) at one activation row (decode) and at 47 rows (a 47-token prompt's prefill), and the whole
int4 engine: one decode step and a 47-token prefill (runner.prefill, LM head included). Each number
is the median (and the minimum) of 5 repeats of the mean over many calls.

The chatsmith package measured is the one Python imports, so an older kernel is measured from a
git worktree of an older commit:

    git worktree add --detach /tmp/old HEAD~1
    OMP_NUM_THREADS=2 PYTHONPATH=/tmp/old python benchmarks/q4_kernel.py --label old --threads 2
    OMP_NUM_THREADS=2 python benchmarks/q4_kernel.py --label new --threads 2
    python benchmarks/q4_kernel.py --compare bench-out/q4_kernel_old_t2.json bench-out/q4_kernel_new_t2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "bench-out"
# (name, in, out) of SmolLM2-135M's matmuls: fused q/k/v, o, fused gate/up, down; the head is Q8_0.
SHAPES = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576), ("head_q8", 576, 49152)]
PROMPT_TOKENS = 47
REPEATS = 5


def timed(fn, calls: int, repeats: int = REPEATS) -> tuple[float, float]:
    """(median, min) over `repeats` of the mean milliseconds per call of fn() over `calls` calls. On
    a shared machine the minimum is the steadier number: other work only ever adds time."""
    fn()
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(means), min(means)


def kernels() -> dict[str, tuple[float, float]]:
    """ms per call of each shape at 1 and at PROMPT_TOKENS activation rows."""
    import torch

    from chatsmith.infer.int4 import BlockInt8Linear, Int4Linear, own_kernel

    own = own_kernel()
    assert own is not None, "chatsmith's kernel needs the native build and AVX512-VNNI"
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, k, n in SHAPES:
        w = torch.randn(n, k, generator=g) * 0.05
        norm = torch.rand(k, generator=g) + 0.5
        lin = BlockInt8Linear(w, None, norm, own) if name == "head_q8" else Int4Linear(w, None, norm, kernel="chatsmith")
        for m in (1, PROMPT_TOKENS):
            x = torch.randn(m, k, generator=g)
            calls = max(5, int(2e8 / (n * k * m)))
            out[f"{name} M={m}"] = timed(lambda lin=lin, x=x: lin.after_rms_norm(x, 1e-5), calls)
    return out


def engine() -> dict[str, tuple[float, float]]:
    """ms of one int4 decode step (batch 1) and of a PROMPT_TOKENS-token prefill."""
    import torch

    from chatsmith.infer.engine import Engine
    from chatsmith.models import load_model

    model, tok = load_model("smollm2-135m")
    runner = Engine(model, tok, precision="int4", max_batch_size=1).runner
    text = "Explain in a few sentences why the sky is blue during the day and red at sunset. " * 4
    ids = tok(text, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS
    res = {}
    with torch.inference_mode():
        res["engine prefill 47"] = timed(lambda: runner.prefill(0, ids, 0, None), 10)
        steps = 32

        def decode_run() -> None:
            for i in range(steps):
                runner.decode([0], [ids[i % PROMPT_TOKENS]], [PROMPT_TOKENS + i], [None])

        runner.prefill(0, ids, 0, None)
        med, low = timed(decode_run, 3)
        res["engine decode step"] = med / steps, low / steps
    return res


def compare(paths: list[str]) -> None:
    """Prints the rows of several result files side by side (ms: median / min), with the ratio of the
    medians and of the minima, first / last."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    labels = [f"{r['label']} t{r['threads']}" for r in runs]
    print(f"| {'ms (median / min)':<20} |" + "".join(f" {lab:>17} |" for lab in labels) + " first/last |")
    for key in runs[0]["ms"]:
        vals = [r["ms"].get(key, (float("nan"), float("nan"))) for r in runs]
        print(f"| {key:<20} |" + "".join(f" {a:>8.3f} / {b:<6.3f} |" for a, b in vals)
              + f" {vals[0][0] / vals[-1][0]:.2f}x / {vals[0][1] / vals[-1][1]:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="current", help="name of this run in the JSON and the table")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the engine uses 2 here)")
    ap.add_argument("--only", choices=["kernels", "engine"], help="time only the kernels or only the engine")
    ap.add_argument("--compare", nargs="+", metavar="JSON", help="print saved runs side by side and exit")
    args = ap.parse_args()
    if args.compare:
        compare(args.compare)
        return
    import torch

    torch.set_num_threads(args.threads)
    ms = {**(kernels() if args.only != "engine" else {}), **(engine() if args.only != "kernels" else {})}
    OUT.mkdir(exist_ok=True)
    path = OUT / f"q4_kernel_{args.label}_t{args.threads}{'_' + args.only if args.only else ''}.json"
    path.write_text(json.dumps({"label": args.label, "threads": args.threads, "ms": ms}, indent=1))
    for key, (med, low) in ms.items():
        print(f"{key:<22}{med:>10.3f} ms median {low:>10.3f} ms min")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
