"""Peak resident memory of the streaming dataset tools (`chatsmith data mix|dedupe|split|filter|
sample|clean|translate`) on generated files of 100K and 1M records: bounded memory means the peak
hardly moves when the file grows tenfold.

Each tool runs as its own process (`python -m chatsmith data ...`); its peak RSS is the kernel's
ru_maxrss for that child (os.wait4), its time the CPU seconds the kernel counted for it (the wall
clock is recorded too, but on a shared machine it measures the neighbours). The baseline is the same command on
a 10-record file (the interpreter, numpy and chatsmith's imports). Files: Alpaca records (~300
bytes, 5% exact and 5% near duplicates) and ShareGPT conversations (2-6 turns, 5% with HTML, 2%
with broken roles), generated with a seed. `translate` goes through a local fake teacher (the
test suite's) over HTTP, on 1K and 10K records, since a million requests would measure the
teacher; the two tools that render every record with the model's template run on 10K and 100K.

    python benchmarks/data_tools_memory.py                    # 100K and 1M records (tokenizer tools: 10K, 100K)
    python benchmarks/data_tools_memory.py --sizes 20000,200000 --keep-files

Prints a Markdown table and writes bench-out/data_tools_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact be have do say get make go know take see come think look "
         "want give use find tell ask seem feel try leave call good new first last long great little own other old "
         "right big high different small large next early young important few public bad same able").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_alpaca(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    recent: list[dict] = []
    with path.open("w") as f:
        for _ in range(n):
            r = rng.random()
            if recent and r < 0.05:
                rec = dict(rng.choice(recent))                       # exact duplicate
            elif recent and r < 0.10:
                base = rng.choice(recent)
                words = base["output"].split()
                words[rng.randrange(len(words))] = "changed"
                rec = {**base, "output": " ".join(words)}            # near duplicate
            else:
                rec = {"instruction": _sentence(rng, rng.randint(6, 16)), "input": "" if rng.random() < 0.6 else
                       _sentence(rng, 10), "output": " ".join(_sentence(rng, 12) for _ in range(rng.randint(2, 4)))}
                if rng.random() < 0.1:
                    rec["instruction"] = "Quelle est la " + rec["instruction"].lower()
            recent = (recent + [rec])[-1000:]
            f.write(json.dumps(rec) + "\n")


def make_sharegpt(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            turns = []
            for _turn in range(rng.randint(1, 3)):
                turns.append({"from": "human", "value": _sentence(rng, rng.randint(5, 15))})
                answer = " ".join(_sentence(rng, 12) for _ in range(rng.randint(1, 4)))
                if rng.random() < 0.05:
                    answer = f"<div><p>{answer}</p><ul><li>one</li><li>two</li></ul></div>"
                turns.append({"from": "gpt", "value": answer})
            if rng.random() < 0.02:
                turns.insert(1, {"from": "human", "value": "again?"})
            f.write(json.dumps({"id": str(i), "conversations": turns}) + "\n")


def run(cmd: list[str], env: dict | None = None) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "chatsmith", *cmd], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    last = [ln for ln in out.splitlines() if ln.startswith("{")]
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "result": json.loads(last[-1]) if last else None}


def tools(a: Path, s: Path, work: Path) -> dict[str, list[str]]:
    return {
        "mix (ratios, shuffled)": ["data", "mix", f"{a}:0.6", f"{s}:0.4", "--output", str(work / "mix.jsonl")],
        "dedupe (exact)": ["data", "dedupe", str(a), "--output", str(work / "dd.jsonl")],
        "dedupe (near, MinHash LSH)": ["data", "dedupe", str(a), "--near", "--output", str(work / "nd.jsonl")],
        "split": ["data", "split", str(a), "--test-size", "0.05", "--valid-size", "0.05", "--output-dir",
                  str(work / "splits")],
        "sample": ["data", "sample", str(a), "--n", "0.1", "--output", str(work / "sample.jsonl")],
        "filter (lang + regex)": ["data", "filter", str(a), "--lang", "en", "--drop-regex", "(?i)\\bproblem\\b",
                                  "--output", str(work / "f.jsonl")],
        "clean (ShareGPT: HTML, broken turns)": ["data", "clean", str(s), "--output", str(work / "c0.jsonl")],
    }


def tokenizer_tools(a: Path, s: Path, work: Path) -> dict[str, list[str]]:
    """The tools that render every record with the model's template: CPU-bound per record, so
    measured on smaller files (their memory is the tokenizer's plus one record's)."""
    return {
        "filter (tokens, smollm2 template)": ["data", "filter", str(s), "--model", "smollm2-135m", "--max-tokens",
                                              "200", "--output", str(work / "ft.jsonl")],
        "clean (+ split at 128 tokens)": ["data", "clean", str(s), "--model", "smollm2-135m", "--max-length",
                                          "128", "--output", str(work / "c.jsonl")],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--tokenizer-sizes", default="10000,100000", help="sizes for the tools that render every record")
    ap.add_argument("--translate-sizes", default="1000,10000")
    ap.add_argument("--only", default=None, help="run only tools whose name contains this")
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--output", default="bench-out/data_tools_memory.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="chatsmith-mem-", dir=str(REPO / "bench-out") if (REPO / "bench-out").is_dir()
                                else None))
    results: dict = {"rows": {}, "files": {}}
    try:
        base_a, base_s = tmp / "a10.jsonl", tmp / "s10.jsonl"
        make_alpaca(base_a, 10, 0)
        make_sharegpt(base_s, 10, 0)
        every = {**tools(base_a, base_s, tmp / "w10"), **tokenizer_tools(base_a, base_s, tmp / "w10")}
        baseline = {name: run(cmd)["peak_rss_mb"] for name, cmd in every.items() if not args.only or args.only in name}
        light = [int(x) for x in args.sizes.split(",") if x]
        heavy = [int(x) for x in args.tokenizer_sizes.split(",") if x]
        for n in sorted(set(light) | set(heavy)):
            a, s = tmp / f"a{n}.jsonl", tmp / f"s{n}.jsonl"
            t = time.perf_counter()
            make_alpaca(a, n, 1)
            make_sharegpt(s, n, 2)
            results["files"][n] = {"alpaca_mb": a.stat().st_size / 2**20, "sharegpt_mb": s.stat().st_size / 2**20}
            print(f"{n} records: {a.stat().st_size / 2**20:.0f} MB + {s.stat().st_size / 2**20:.0f} MB "
                  f"({time.perf_counter() - t:.0f} s to write)", flush=True)
            todo = {**(tools(a, s, tmp / f"w{n}") if n in light else {}),
                    **(tokenizer_tools(a, s, tmp / f"w{n}") if n in heavy else {})}
            for name, cmd in todo.items():
                if args.only and args.only not in name:
                    continue
                r = run(cmd)
                results["rows"].setdefault(name, {"baseline_mb": baseline[name]})[n] = r
                print(f"  {name}: peak {r['peak_rss_mb']:.0f} MB, {r['seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU",
                      flush=True)
            if not args.keep_files:
                a.unlink()
                s.unlink()
                shutil.rmtree(tmp / f"w{n}", ignore_errors=True)
        if not args.only or "translate" in args.only:
            sys.path.insert(0, str(REPO / "tests"))
            from fake_teacher import FakeTeacher

            with FakeTeacher(rate_limit_first=0) as url:
                name = "translate (fake teacher over HTTP)"
                for n in (int(x) for x in args.translate_sizes.split(",")):
                    a = tmp / f"t{n}.jsonl"
                    make_alpaca(a, n, 3)
                    r = run(["data", "translate", str(a), "--to", "Upper Case", "--teacher-url", url,
                             "--teacher-model", "fake", "--concurrency", "8", "--output", str(tmp / f"t{n}.out.jsonl")])
                    results["rows"].setdefault(name, {"baseline_mb": None})[n] = r
                    print(f"  {name} {n}: peak {r['peak_rss_mb']:.0f} MB, {r['seconds']:.0f} s", flush=True)
    finally:
        if not args.keep_files:
            shutil.rmtree(tmp, ignore_errors=True)
    sizes = sorted({n for row in results["rows"].values() for n in row if isinstance(n, int)})
    print("\n| tool | baseline (10 records) | " + " | ".join(f"peak RSS, {n:,} records (CPU time)" for n in sizes) + " |")
    print("|---|---:|" + "---:|" * len(sizes))
    for name, row in results["rows"].items():
        cells = [f"{row[n]['peak_rss_mb']:.0f} MB ({row[n]['cpu_seconds']:.0f} s)" if n in row else "" for n in sizes]
        base = f"{row['baseline_mb']:.0f} MB" if row.get("baseline_mb") else "-"
        print(f"| {name} | {base} | " + " | ".join(cells) + " |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
