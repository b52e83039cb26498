"""Quality of chatsmith's quantized engine against llama.cpp's on the same model and text.

Perplexity of the embedded SmolLM2-135M on the assistant tokens of the Alpaca sample
(../shared/data/alpaca_50.json, every answer; the model never trained on it), the same token ids
for every contender:

- chatsmith engine: fp32 (precision module), int8, int4 (and int4-sym / int4-g64 with --all), each
  through the engine's own prefill (the forward pass that fills the KV cache, where prompt
  log-probs come from);
- llama.cpp (llama-cpp-python, `logits_all`) on the shipped Q4_1 GGUF and on a Q8_0 made from it
  with llama.cpp's quantizer (serve_throughput.py builds both, and the benchmark's own venv), and on
  an F32 GGUF that llama.cpp's quantizer de-quantizes from the Q4_1: llama.cpp's own fp32 baseline,
  so that each engine's quantized perplexity can be read against its own exact computation.

The fp32 model is the Q4_1 GGUF de-quantized, so Q4_1's own weights are the fp32 weights: what
each contender adds is how it computes (activation rounding), plus its own weight grid.

    python benchmarks/quant_quality.py            # prints a table, writes bench-out/quant_quality.json
    python benchmarks/quant_quality.py --all --limit 20
    python benchmarks/quant_quality.py --data hh --limit 800   # the last answers of 800 hh-rlhf dialogues

Two engines that round activations in equally good ways still land a little apart on one text: which
way each value happens to round decides it. So the table also gives each ratio to llama.cpp Q4_1
with a 95% interval from a paired bootstrap over the texts (2,000 resamples): a ratio whose interval
holds 1 is a tie on this text. A larger text narrows the interval (`--data hh`).

And the steadier measure of the same thing: the mean KL divergence per answer token from chatsmith's
fp32 distribution over the whole vocabulary (what llama.cpp's `perplexity --kl-divergence` reports),
which counts every probability a rounding moves, not only the one of the token that came next. The
fp32 log-probs wait in a temporary folder (4 bytes x 49,152 per answer token: 1.6 GB for Alpaca;
`--no-kl` skips it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
DATA = REPO.parent / "shared" / "data" / "alpaca_50.json"
HH = REPO.parent / "shared" / "data" / "hh_rlhf_harmless_train_1600.jsonl"


def _dialogues(name: str, limit: int | None) -> list[list[dict]]:
    """Chat messages per text, the last one the assistant's answer that is scored."""
    if name == "alpaca":
        return [[{"role": "user", "content": (r["instruction"] + "\n" + r.get("input", "")).strip()},
                 {"role": "assistant", "content": r["output"]}] for r in json.loads(DATA.read_text())[:limit]]
    out = []
    for line in HH.read_text().splitlines():
        parts = re.split(r"\n\n(Human|Assistant): ", json.loads(line)["chosen"])[1:]
        msgs = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                for who, text in zip(parts[::2], parts[1::2])]
        if len(msgs) >= 2 and msgs[-1]["role"] == "assistant" and msgs[-1]["content"]:
            out.append(msgs)
        if limit is not None and len(out) >= limit:
            break
    return out


def conversations(tok, limit: int | None, data: str = "alpaca") -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per text: the conversation before the last answer, then it
    (at most 512 tokens; texts whose prompt alone fills them are left out)."""
    out = []
    for msgs in _dialogues(data, limit):
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        assert ids[: len(p_ids)] == p_ids
        if len(p_ids) < 500:
            out.append((ids[:512], len(p_ids)))
    return out


def paired_interval(a: list[tuple[float, int]], b: list[tuple[float, int]], rounds: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Perplexity ratio a / b over the same texts ((summed NLL, tokens) per text), with a 95% interval
    from resampling the texts (the same resample for both)."""
    import numpy as np

    na, nb = np.array([x[0] for x in a]), np.array([x[0] for x in b])
    n = np.array([x[1] for x in a])
    ratio = math.exp((na.sum() - nb.sum()) / n.sum())
    idx = np.random.default_rng(seed).integers(0, len(n), size=(rounds, len(n)))
    boot = np.exp((na[idx].sum(1) - nb[idx].sum(1)) / n[idx].sum(1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return ratio, float(lo), float(hi)


def chatsmith_nll(model, tok, texts, precision: str, ref: Path | None, save: bool = False
                  ) -> tuple[list[tuple[float, int, float]], float]:
    """((summed NLL of its answer tokens, their count, summed KL from the fp32 log-probs in `ref`)
    per text, seconds) through the engine's prefill. With `save`, writes its log-probs to `ref`."""
    import numpy as np
    import torch

    from chatsmith.infer.engine import Engine

    runner = Engine(model, tok, precision=precision, max_batch_size=1, kv_cache_mb=64).runner
    per, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for i, (ids, n_prompt) in enumerate(texts):
            _, scored = runner.prefill_scored(0, ids, 0, None, len(ids) - 1)   # row i predicts ids[i + 1]
            logp = torch.log_softmax(scored.double(), -1)[n_prompt - 1:]        # answer tokens only
            picked = logp.gather(1, torch.tensor(ids[n_prompt:])[:, None])[:, 0]
            kl = float("nan")
            if ref is not None and save:
                np.save(ref / f"{i}.npy", logp.float().numpy())
                kl = 0.0
            elif ref is not None:
                p = torch.from_numpy(np.load(ref / f"{i}.npy")).double()
                kl = (p.exp() * (p - logp)).sum().item()
            per.append((-picked.sum().item(), picked.numel(), kl))
    return per, time.perf_counter() - t0


LLAMACPP_NLL = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from llama_cpp import Llama
    path, threads, ref = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    texts = json.load(sys.stdin)
    llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=threads, logits_all=True, verbose=False)
    per, t0 = [], time.perf_counter()
    for i, (ids, n_prompt) in enumerate(texts):
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[n_prompt - 1: len(ids) - 1], dtype=np.float64)   # answer tokens only
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = logp[np.arange(len(logp)), ids[n_prompt:]]
        kl = float("nan")
        if ref:
            p = np.load(f"{ref}/{i}.npy").astype(np.float64)
            kl = float((np.exp(p) * (p - logp)).sum())
        per.append((-float(picked.sum()), int(picked.size), kl))
    print(json.dumps({"per": per, "seconds": time.perf_counter() - t0}))
""")


def llamacpp_nll(py: Path, path: str, texts, threads: int, ref: Path | None
                 ) -> tuple[list[tuple[float, int, float]], float]:
    r = subprocess.run([str(py), "-c", LLAMACPP_NLL, path, str(threads), str(ref or "")], input=json.dumps(texts),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return [tuple(x) for x in out["per"]], out["seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="alpaca", choices=["alpaca", "hh"], help="alpaca: the 50 Alpaca answers "
                    "(default); hh: the last answers of hh-rlhf's harmless dialogues (1,600; use --limit)")
    ap.add_argument("--limit", type=int, default=None, help="the first N texts (default: all)")
    ap.add_argument("--all", action="store_true", help="also int4-sym and int4-g64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--no-kl", action="store_true", help="skip the KL divergence (its fp32 log-probs need "
                    "4 bytes x 49,152 per answer token of disk)")
    args = ap.parse_args()
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    from chatsmith.models import load_model

    model, tok = load_model("smollm2-135m")
    texts = conversations(tok, args.limit, args.data)
    rows = []
    precisions = ["module", "int8", "int4"] + (["int4-sym", "int4-g64"] if args.all else [])
    (REPO / "bench-out").mkdir(exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="quant_quality_", dir=REPO / "bench-out")
    ref = None if args.no_kl else Path(tmp.name)
    for p in precisions:
        per, secs = chatsmith_nll(model, tok, texts, p, ref, save=p == "module")
        rows.append({"contender": f"chatsmith {'fp32' if p == 'module' else p}", "per": per, "seconds": secs})
    if not args.no_llamacpp:
        from serve_throughput import ensure_llamacpp_venv, ggufs, requantize

        py = ensure_llamacpp_venv()
        out_dir = REPO / "bench-out"
        out_dir.mkdir(exist_ok=True)
        files = ggufs(py, out_dir)
        # The Q4_1 de-quantized to F32 by llama.cpp's own quantizer (the same weights, exactly).
        files["F32"] = requantize(py, files["Q4_1"], out_dir / "smollm2-135m-f32.gguf", "LLAMA_FTYPE_ALL_F32")
        for name, path in files.items():
            per, secs = llamacpp_nll(py, path, texts, args.threads, ref)
            rows.append({"contender": f"llama.cpp {name}", "per": per, "seconds": secs})
    tmp.cleanup()
    for r in rows:
        r["nll"], r["tokens"] = sum(x[0] for x in r["per"]), sum(x[1] for x in r["per"])
        r["perplexity"] = math.exp(r["nll"] / r["tokens"])
        r["kl"] = sum(x[2] for x in r["per"]) / r["tokens"]
        print({k: v for k, v in r.items() if k != "per"}, flush=True)
    q41 = next((r for r in rows if r["contender"] == "llama.cpp Q4_1"), None)
    what = "Alpaca records" if args.data == "alpaca" else "hh-rlhf dialogues (last answer)"
    print(f"\nperplexity on {rows[0]['tokens']} answer tokens of {len(texts)} {what} (lower is better)")
    print(f"{'contender':<22} {'perplexity':>10} {'KL/token':>9} {'vs Q4_1':>8}  95% interval of the ratio")
    for r in rows:
        if q41 is not None and r is not q41:
            ratio, lo, hi = paired_interval(r["per"], q41["per"])
            r["vs_q4_1"] = {"ratio": ratio, "low": lo, "high": hi}
            vs = f"{ratio:8.4f}  [{lo:.4f}, {hi:.4f}]"
        else:
            vs = f"{'-':>8}"
        print(f"{r['contender']:<22} {r['perplexity']:>10.4f} {r['kl']:>9.5f} {vs}")
    (REPO / "bench-out").mkdir(exist_ok=True)
    name = "quant_quality.json" if args.data == "alpaca" else f"quant_quality_{args.data}.json"
    (REPO / "bench-out" / name).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
