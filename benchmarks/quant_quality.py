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
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
DATA = REPO.parent / "shared" / "data" / "alpaca_50.json"


def conversations(tok, limit: int | None) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per Alpaca record: the user turn, then the answer."""
    rows = json.loads(DATA.read_text())[:limit]
    out = []
    for r in rows:
        user = [{"role": "user", "content": (r["instruction"] + "\n" + r.get("input", "")).strip()}]
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": r["output"]}], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        assert ids[: len(p_ids)] == p_ids
        out.append((ids[:512], len(p_ids)))
    return out


def chatsmith_nll(model, tok, texts, precision: str) -> tuple[float, int, float]:
    """(summed NLL of the answer tokens, their count, seconds) through the engine's prefill."""
    import torch

    from chatsmith.infer.engine import Engine

    runner = Engine(model, tok, precision=precision, max_batch_size=1, kv_cache_mb=64).runner
    nll, count, t0 = 0.0, 0, time.perf_counter()
    with torch.inference_mode():
        for ids, n_prompt in texts:
            _, scored = runner.prefill_scored(0, ids, 0, None, len(ids) - 1)   # row i predicts ids[i + 1]
            logp = torch.log_softmax(scored.float(), -1)
            targets = torch.tensor(ids[1:])
            picked = logp.gather(1, targets[:, None])[:, 0][n_prompt - 1:]      # answer tokens only
            nll -= picked.sum().item()
            count += picked.numel()
    return nll, count, time.perf_counter() - t0


LLAMACPP_NLL = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from llama_cpp import Llama
    path, threads = sys.argv[1], int(sys.argv[2])
    texts = json.load(sys.stdin)
    llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=threads, logits_all=True, verbose=False)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for ids, n_prompt in texts:
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = logp[np.arange(len(ids) - 1), ids[1:]][n_prompt - 1:]
        nll -= float(picked.sum()); count += picked.size
    print(json.dumps({"nll": nll, "count": count, "seconds": time.perf_counter() - t0}))
""")


def f32_gguf(py: Path, q4: str, out_dir: Path) -> str:
    """The Q4_1 GGUF de-quantized to F32 by llama.cpp's own quantizer (the same weights, exactly)."""
    out = out_dir / "smollm2-135m-f32.gguf"
    if not out.exists():
        code = textwrap.dedent(f"""
            import llama_cpp
            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
            p.allow_requantize = True
            p.nthread = 2
            raise SystemExit(llama_cpp.llama_model_quantize({q4!r}.encode(), {str(out)!r}.encode(), p))
        """)
        subprocess.run([str(py), "-c", code], check=True, capture_output=True)
    return str(out)


def llamacpp_nll(py: Path, path: str, texts, threads: int) -> tuple[float, int, float]:
    r = subprocess.run([str(py), "-c", LLAMACPP_NLL, path, str(threads)], input=json.dumps(texts),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["nll"], out["count"], out["seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="the first N Alpaca records (default: all 50)")
    ap.add_argument("--all", action="store_true", help="also int4-sym and int4-g64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from chatsmith.models import load_model

    model, tok = load_model("smollm2-135m")
    texts = conversations(tok, args.limit)
    rows = []
    precisions = ["module", "int8", "int4"] + (["int4-sym", "int4-g64"] if args.all else [])
    for p in precisions:
        nll, count, secs = chatsmith_nll(model, tok, texts, p)
        rows.append({"contender": f"chatsmith {'fp32' if p == 'module' else p}", "nll": nll, "tokens": count, "seconds": secs})
        print(rows[-1], flush=True)
    if not args.no_llamacpp:
        from serve_throughput import ensure_llamacpp_venv, ggufs

        py = ensure_llamacpp_venv()
        out_dir = REPO / "bench-out"
        out_dir.mkdir(exist_ok=True)
        files = ggufs(py, out_dir)
        files["F32"] = f32_gguf(py, files["Q4_1"], out_dir)
        for name, path in files.items():
            nll, count, secs = llamacpp_nll(py, path, texts, args.threads)
            rows.append({"contender": f"llama.cpp {name}", "nll": nll, "tokens": count, "seconds": secs})
            print(rows[-1], flush=True)
    ref = next((r for r in rows if r["contender"] == "llama.cpp Q4_1"), None)
    print(f"\nperplexity on {rows[0]['tokens']} answer tokens of {len(texts)} Alpaca records (lower is better)")
    print(f"{'contender':<22} {'perplexity':>10} {'vs Q4_1':>8}")
    for r in rows:
        r["perplexity"] = math.exp(r["nll"] / r["tokens"])
    for r in rows:
        vs = f"{r['perplexity'] / ref['perplexity']:.4f}" if ref else "-"
        print(f"{r['contender']:<22} {r['perplexity']:>10.4f} {vs:>8}")
    (REPO / "bench-out").mkdir(exist_ok=True)
    (REPO / "bench-out" / "quant_quality.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
