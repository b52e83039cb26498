"""LLM-as-judge end to end on MT-bench-format questions, with `chatsmith serve` as the judge.

Starts `chatsmith serve JUDGE` (default: the embedded model) on a free port, waits for /health,
then runs what a user types:

    chatsmith eval judge MODEL --questions FILE --limit N --judge-url URL --judge-model NAME --output DIR/single
    chatsmith eval judge MODEL --baseline BASE ... --output DIR/pairwise        (with --baseline)

on the first N questions of FastChat's Vicuna-bench file (`../shared/data/vicuna_bench_questions.jsonl`,
read unchanged). Each run writes results.jsonl, summary.json and a self-contained report.html.
A 135M judge is a weak judge: this shows the flow (serving, parsing, both orders, caching,
report), not a verdict worth quoting.

    python benchmarks/judge_demo.py                                  # single grades, 5 questions
    python benchmarks/judge_demo.py --model runs/dpo --baseline smollm2-135m --limit 8
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO.parent / "shared" / "data" / "vicuna_bench_questions.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the judge server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"the judge server did not answer {url} within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="the model whose answers are judged")
    p.add_argument("--baseline", default=None, help="also run pairwise against this model")
    p.add_argument("--judge", default="smollm2-135m", help="the model `chatsmith serve` runs as the judge")
    p.add_argument("--questions", default=str(QUESTIONS))
    p.add_argument("--limit", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--output", default="bench-out/judge_demo")
    args = p.parse_args(argv)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "chatsmith", "serve", args.judge, "--port", str(port),
                               "--served-name", "judge"], cwd=REPO)
    rows = []
    try:
        wait_healthy(f"{base}/health", server)
        runs = [("single", [])]
        if args.baseline:
            runs.append(("pairwise", ["--baseline", args.baseline]))
        for name, extra in runs:
            out = Path(args.output) / name
            cmd = [sys.executable, "-m", "chatsmith", "eval", "judge", args.model, *extra, "--questions", args.questions,
                   "--limit", str(args.limit), "--judge-url", f"{base}/v1", "--judge-model", "judge",
                   "--max-new-tokens", str(args.max_new_tokens), "--output", str(out)]
            print("$ chatsmith", " ".join(cmd[3:]), flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=REPO)
            summary = json.loads((out / "summary.json").read_text())
            rows.append({"mode": name, "seconds": time.perf_counter() - t0, "summary": summary,
                         "report": str(out / "report.html")})
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = Path(args.output) / "demo.json"
    out.write_text(json.dumps(rows, indent=2))
    for r in rows:
        print(f"{r['mode']}: {r['seconds']:.0f}s, report {r['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
