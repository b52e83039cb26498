"""Quality and time of `chatsmith export --to gguf` on the embedded SmolLM2-135M.

Quality: perplexity through llama.cpp (llama-cpp-python) on held-out text of chatsmith's q8_0, q4_0 and
q4_1 files against llama.cpp's own quantizer (`llama_model_quantize`) run on chatsmith's f16 file, with
the f16 file as the reference. Same token ids (from the model's tokenizer), same windows, same llama.cpp.
Time: wall seconds of the export itself (merge/load, convert, quantise, write) per type, and of the
round-trip check. Run the timing on a quiet machine (see --wait-idle in benchmarks/README.md).

llama-cpp-python is never installed into the project's environment: this script reuses the venv
benchmarks/serve_throughput.py builds (benchmarks/.venv-llamacpp; compiles llama.cpp once).

    python benchmarks/export_quality.py [--windows 8] [--ctx 512] [--out bench-out/export_quality.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import ensure_llamacpp_venv  # noqa: E402  (the benchmark's own llama-cpp-python venv)

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO.parent / "shared" / "data" / "hh_rlhf_harmless_train_1600.jsonl"
TYPES = ("q8_0", "q4_0", "q4_1")
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}

PPL = """
import json, sys, numpy as np
from llama_cpp import Llama
path, ids_file, ctx = sys.argv[1], sys.argv[2], int(sys.argv[3])
windows = json.load(open(ids_file))
llm = Llama(model_path=path, n_ctx=ctx, logits_all=True, n_threads=2, n_batch=ctx, verbose=False)
nll, n = 0.0, 0
for w in windows:
    llm.reset()
    llm.eval(w)
    logits = np.array(llm.scores[: len(w)], dtype=np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    tgt = np.array(w[1:])
    nll -= float(logp[np.arange(len(w) - 1), tgt].sum())
    n += len(w) - 1
print(json.dumps({"nll": nll / n, "ppl": float(np.exp(nll / n)), "tokens": n}))
"""


def heldout_windows(tokenizer, n_windows: int, ctx: int) -> list[list[int]]:
    """`n_windows` windows of `ctx` token ids from the hh-rlhf transcripts (text the model was not tuned on)."""
    ids: list[int] = []
    with open(HELDOUT) as f:
        for line in f:
            rec = json.loads(line)
            ids += tokenizer.encode(rec.get("chosen") or rec.get("text") or "", add_special_tokens=False)
            if len(ids) >= n_windows * ctx:
                break
    return [ids[i * ctx:(i + 1) * ctx] for i in range(n_windows)]


def perplexity(py: Path, gguf: Path, ids_file: Path, ctx: int) -> dict:
    r = subprocess.run([str(py), "-c", PPL, str(gguf), str(ids_file), str(ctx)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def llamacpp_quantize(py: Path, src: Path, dst: Path, qtype: str) -> float:
    code = textwrap.dedent(f"""
        import llama_cpp, time
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = llama_cpp.{FTYPES[qtype]}
        p.nthread = 2
        t = time.perf_counter()
        rc = llama_cpp.llama_model_quantize({str(src)!r}.encode(), {str(dst)!r}.encode(), p)
        print(time.perf_counter() - t)
        raise SystemExit(rc)
    """)
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8, help="held-out windows (default 8)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default="bench-out/export_quality")
    ap.add_argument("--out", default="bench-out/export_quality.json")
    args = ap.parse_args()

    from chatsmith.export import export_model
    from chatsmith.models import load_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    py = ensure_llamacpp_venv()
    tok = load_tokenizer(args.model)
    ids_file = work / "heldout_ids.json"
    ids_file.write_text(json.dumps(heldout_windows(tok, args.windows, args.ctx)))

    timing: dict[str, dict] = {}
    t = time.perf_counter()
    export_model(args.model, "hf", work / "hf", progress=False)
    timing["hf f32"] = {"export_s": time.perf_counter() - t}
    files: dict[str, Path] = {}
    for q in ("f16",) + TYPES:
        t = time.perf_counter()
        r = export_model(args.model, "gguf", work / f"chatsmith-{q}.gguf", quant=q, verify=False, progress=False)
        timing[f"gguf {q}"] = {"export_s": time.perf_counter() - t, "convert_write_s": r.seconds,
                               "mb": (work / f"chatsmith-{q}.gguf").stat().st_size / 2**20}
        files[f"chatsmith {q}"] = work / f"chatsmith-{q}.gguf"
    t = time.perf_counter()
    export_model(args.model, "gguf", work / "verify-f16.gguf", quant="f16", verify=True, progress=False)
    timing["gguf f16 + round trip"] = {"export_s": time.perf_counter() - t}
    for q in TYPES:
        dst = work / f"llamacpp-{q}.gguf"
        timing[f"llama.cpp quantize {q}"] = {"quantize_s": llamacpp_quantize(py, files["chatsmith f16"], dst, q),
                                             "mb": dst.stat().st_size / 2**20}
        files[f"llama.cpp {q}"] = dst

    print("\nexport time (s)")
    for k, v in timing.items():
        print(f"  {k:28} " + "  ".join(f"{a}={b:.1f}" for a, b in v.items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"timing": timing}, indent=2))   # kept if the perplexities are cut short

    ppl = {}
    for name, path in files.items():
        ppl[name] = perplexity(py, path, ids_file, args.ctx)
        print(f"  ppl {name}: {ppl[name]['ppl']:.4f}", flush=True)
    rows = []
    for q in TYPES:
        ours, theirs = ppl[f"chatsmith {q}"]["ppl"], ppl[f"llama.cpp {q}"]["ppl"]
        rows.append({"type": q, "chatsmith_ppl": ours, "llamacpp_ppl": theirs, "f16_ppl": ppl["chatsmith f16"]["ppl"],
                     "diff_vs_llamacpp": ours / theirs - 1})
    print(f"\nperplexity through llama.cpp on {ppl['chatsmith f16']['tokens']} held-out tokens "
          f"(f16 reference {ppl['chatsmith f16']['ppl']:.3f})")
    print(f"{'type':6} {'chatsmith':>10} {'llama.cpp':>10} {'difference':>11}")
    for r in rows:
        print(f"{r['type']:6} {r['chatsmith_ppl']:10.3f} {r['llamacpp_ppl']:10.3f} {r['diff_vs_llamacpp']:+10.2%}")
    Path(args.out).write_text(json.dumps({"perplexity": ppl, "rows": rows, "timing": timing,
                                          "windows": args.windows, "ctx": args.ctx}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
