"""`--max-memory` disk offload against the model loaded whole: tokens/s and memory, side by side.

Each case runs in its own process (so its peak memory is its own): load the embedded model (fp32,
513 MiB of weights) whole or with `--max-memory BUDGET`, greedy-decode the same prompt through
chatsmith's engine in precision "module" (what chat and serve use with --max-memory), and read:

- peak RSS (ru_maxrss: every resident page, the mapped safetensors file and the libraries included),
- peak anonymous and file-backed RSS (RssAnon and RssFile of /proc/self/status, sampled every 5 ms;
  safetensors weights are memory-mapped, so resident weights count as file pages, which the kernel
  may drop and re-read under pressure),
- USS at the end (psutil: pages no other process shares),
- each of those after the imports (torch, transformers, chatsmith's engine) as the baseline.

    python benchmarks/offload.py                            # whole vs --max-memory 300MB and 200MB
    python benchmarks/offload.py --budgets 150MB --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = "Explain in a few sentences why the sky is blue."


def _status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


class PeakSampler:
    """The largest RssAnon and RssFile seen by a thread sampling /proc/self/status every `interval` seconds."""

    def __init__(self, interval: float = 0.005) -> None:
        self.peak = 0
        self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(interval)

    def _sample(self) -> None:
        now = _status()
        self.peak, self.peak_file = max(self.peak, now["RssAnon"]), max(self.peak_file, now["RssFile"])

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def child(budget: str | None, tokens: int) -> dict:
    """One case in this process; returns its measurements."""
    import psutil
    import torch

    from chatsmith.infer.engine import Engine
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.models.loading import load_model, offload_fast_path

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = _status()
    base_uss = psutil.Process().memory_full_info().uss
    with PeakSampler() as anon:
        t0 = time.perf_counter()
        model, tok = load_model("smollm2-135m", max_memory=budget)
        load_s = time.perf_counter() - t0
        fast = offload_fast_path(model) if budget else True
        engine = Engine(model, tok, max_batch_size=1, precision="module", fast_path=fast)
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=2))     # warm-up
        t0 = time.perf_counter()
        done = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=tokens))[0]
        gen_s = time.perf_counter() - t0
    end = _status()
    plan = getattr(model, "chatsmith_offload", None)
    return {
        "budget": budget or "none (whole)",
        "in_memory_mib": (plan.bytes_on.get("cpu", 0) if plan else plan_bytes(model)) / 2**20,
        "on_disk_mib": (plan.bytes_on.get("disk", 0) if plan else 0) / 2**20,
        "runner": type(engine.runner).__name__,
        "load_s": load_s,
        "tokens": len(done.token_ids),
        "tokens_per_s": len(done.token_ids) / gen_s,
        "peak_rss_mib": end["VmHWM"] / 2**20,
        "peak_anon_mib": anon.peak / 2**20,
        "peak_file_mib": anon.peak_file / 2**20,
        "end_rss_file_mib": end["RssFile"] / 2**20,
        "baseline_file_mib": base["RssFile"] / 2**20,
        "uss_end_mib": psutil.Process().memory_full_info().uss / 2**20,
        "baseline_rss_mib": base["VmRSS"] / 2**20,
        "baseline_anon_mib": base["RssAnon"] / 2**20,
        "baseline_uss_mib": base_uss / 2**20,
        "token_ids": done.token_ids,
        "text": done.text,
    }


def plan_bytes(model) -> int:
    """Bytes of the model's parameters (each tied tensor once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="+", default=["300MB", "200MB"], help="--max-memory values to compare")
    ap.add_argument("--tokens", type=int, default=48, help="greedy tokens to time (default 48)")
    ap.add_argument("--out", default="bench-out/offload.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.child or None, args.tokens)), flush=True)
        return
    rows = []
    for budget in ["", *args.budgets]:
        proc = subprocess.run([sys.executable, __file__, "--child", budget, "--tokens", str(args.tokens)],
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get(
                                  "OMP_NUM_THREADS", "1")))
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"case {budget or 'whole'} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
    whole = rows[0]
    print(f"embedded model (fp32), greedy, {args.tokens} tokens, precision module, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
    cols = ["budget", "in mem MiB", "disk MiB", "tok/s", "x whole", "peak RSS MiB", "x whole", "RSS - base",
            "peak anon MiB", "peak file MiB", "USS end", "same tokens"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join([
            r["budget"], f"{r['in_memory_mib']:.1f}", f"{r['on_disk_mib']:.1f}", f"{r['tokens_per_s']:.2f}",
            f"{r['tokens_per_s'] / whole['tokens_per_s']:.3f}", f"{r['peak_rss_mib']:.0f}",
            f"{r['peak_rss_mib'] / whole['peak_rss_mib']:.3f}", f"{r['peak_rss_mib'] - r['baseline_rss_mib']:.0f}",
            f"{r['peak_anon_mib']:.0f}", f"{r['peak_file_mib']:.0f}", f"{r['uss_end_mib']:.0f}",
            str(r["token_ids"] == whole["token_ids"])]))
    print(f"baseline after imports: RSS {whole['baseline_rss_mib']:.0f} MiB (anon {whole['baseline_anon_mib']:.0f}, "
          f"file {whole['baseline_file_mib']:.0f}), USS {whole['baseline_uss_mib']:.0f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tokens": args.tokens, "prompt": PROMPT, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
