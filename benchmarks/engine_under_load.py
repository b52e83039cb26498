"""Single-stream decode while other processes keep the CPU busy: chatsmith's int4 engine with its
thread governor (the default, chatsmith/infer/threads.py) and with all of torch's threads fixed,
against llama.cpp's Q4_1 (llama-cpp-python) on the same threads and on one.

A laptop that serves its own assistant is also running a browser, an editor, an indexer. A step
split over N threads waits at each matmul for the slowest thread, and a thread the OS has
descheduled holds every matmul of the step for a time slice, so the N-thread engine can fall far
below the 1-thread one. The governor measures decode steps and moves to one thread (and back).

Load: `--load 0,1,2` runs each level in turn with that many busy processes (a Python loop each, one
core's worth), started before and stopped after each contender. Each contender generates
`--tokens` tokens greedily from serve_throughput.py's prompt (47 tokens with the system prompt) in a
fresh process; the table gives decode tokens/s (after the first token) and, for chatsmith, how many
threads the governor settled on.

    python benchmarks/engine_under_load.py                    # load 0, 1, 2 on 2 threads
    python benchmarks/engine_under_load.py --load 1 --tokens 256 --repeats 3

On a machine where anything else runs, every number here moves with it: that is the point, but two
runs never agree closely, so compare the contenders of one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_throughput import (  # noqa: E402
    CHATSMITH_SINGLE,
    LLAMACPP_SINGLE,
    PROMPT,
    SYSTEM,
    _python,
    _run_json,
    ensure_llamacpp_venv,
    ggufs,
)


def _spin() -> None:
    while True:
        pass


def contenders(threads: int, tokens: int, llama_py: Path | None, q4: str | None) -> list[tuple[str, list[str], dict]]:
    """(name, command, environment) of each contender; the first is the governed engine."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    code, n = CHATSMITH_SINGLE.format(prompt=PROMPT, system=SYSTEM), str(tokens)
    out = [(f"chatsmith int4, governor ({threads} threads or 1)", [_python(), "-c", code, "int4", n], env),
           (f"chatsmith int4, {threads} threads fixed", [_python(), "-c", code, "int4", n, "fixed"], env)]
    if llama_py is not None and q4 is not None:
        llama = LLAMACPP_SINGLE.format(prompt=PROMPT, system=SYSTEM)
        out.append((f"llama.cpp Q4_1, {threads} threads", [str(llama_py), "-c", llama, q4, n, str(threads)], env))
        if threads > 1:
            out.append(("llama.cpp Q4_1, 1 thread", [str(llama_py), "-c", llama, q4, n, "1"],
                        dict(env, OMP_NUM_THREADS="1")))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", default="0,1,2", help="busy processes during each run, comma-separated [0,1,2]")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per run [128]")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the N-thread contenders")
    ap.add_argument("--repeats", type=int, default=1, help="runs per contender and load; the median is shown [1]")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama-cpp-python")
    ap.add_argument("--out", default=str(REPO / "bench-out" / "engine_under_load.json"))
    args = ap.parse_args()
    loads = [int(x) for x in args.load.split(",")]
    llama_py = None if args.no_llamacpp else ensure_llamacpp_venv()
    q4 = ggufs(llama_py, REPO / "bench-out")["Q4_1"] if llama_py is not None else None
    rows = []
    for load in loads:
        for name, cmd, env in contenders(args.threads, args.tokens, llama_py, q4):
            runs = []
            for _ in range(args.repeats):
                spinners = [mp.Process(target=_spin, daemon=True) for _ in range(load)]
                for p in spinners:
                    p.start()
                try:
                    runs.append(_run_json(cmd, env))
                finally:
                    for p in spinners:
                        p.terminate()
                        p.join()
            tps = statistics.median(r["decode_tps"] for r in runs)
            row = {"load": load, "contender": name, "decode_tps": tps, "runs": runs}
            rows.append(row)
            print({k: v for k, v in row.items() if k != "runs"}, flush=True)
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"\nsingle-stream decode tokens/s, {args.tokens} new tokens, greedy; busy processes beside it "
          f"({os.cpu_count()} CPUs here)")
    names = list(dict.fromkeys(r["contender"] for r in rows))
    print("| contender | " + " | ".join(f"load {x}" for x in loads) + " |")
    print("|---|" + "---:|" * len(loads))
    for n in names:
        cells = []
        for x in loads:
            r = next(r for r in rows if r["contender"] == n and r["load"] == x)
            now = [q.get("threads_now") for q in r["runs"] if "threads_now" in q]
            cells.append(f"{r['decode_tps']:.1f}" + (f" (on {now[-1]})" if now and n.endswith("or 1)") else ""))
        print(f"| {n} | " + " | ".join(cells) + " |")
    gov = names[0]
    for other in names[1:]:
        ratios = []
        for x in loads:
            a = next(r for r in rows if r["contender"] == gov and r["load"] == x)["decode_tps"]
            b = next(r for r in rows if r["contender"] == other and r["load"] == x)["decode_tps"]
            ratios.append(f"load {x}: {a / b:.2f}x")
        print(f"governor / {other}: " + ", ".join(ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
