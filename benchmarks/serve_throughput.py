"""Serving speed of chatsmith on smollm2-135m against transformers `generate` and llama.cpp.

(a) Single-stream decode tokens/s, each contender in its own process, greedy, a fixed number of new
    tokens (end-of-sequence ignored), after one warm-up generation:
    - chatsmith engine, int4, int8 and module (fp32, exact)
    - transformers `generate` (fp32, KV cache, greedy)
    - llama-cpp-python on the shipped Q4_1 GGUF and on a Q8_0 GGUF of the same model (int8-class, like
      chatsmith's default), made from it with llama.cpp's own quantizer in the benchmark's environment
(b) Servers: aggregate generated tokens/s and p50/p95 time to first token at 1, 4, 8 and 16
    concurrent streaming clients, `chatsmith serve --precision int8` against `python -m
    llama_cpp.server` on Q8_0, and `--precision int4` against it on Q4_1 (`--servers`).

llama-cpp-python is never installed into the project's environment: the script builds its own venv
(benchmarks/.venv-llamacpp, compiles llama.cpp once, several minutes) unless `--no-llamacpp`.

    python benchmarks/serve_throughput.py            # everything, about 15 min here
    python benchmarks/serve_throughput.py --quick    # smoke check: fewer tokens and clients
    python benchmarks/serve_throughput.py --no-llamacpp

Prints a table and writes JSON (bench-out/serve_throughput.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / "benchmarks" / ".venv-llamacpp"
PROMPT = "Write a detailed essay about the history of the printing press and its effect on Europe."
# Sent explicitly, so chatsmith (whose SmolLM2 template adds this default) and llama.cpp's chatml
# format render the same 47 prompt tokens.
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _python() -> str:
    return sys.executable


def ensure_llamacpp_venv() -> Path:
    """The benchmark's own venv with llama-cpp-python[server]; built on first use."""
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llama_cpp, llama_cpp.server"],
                                      capture_output=True).returncode == 0:
        return py
    print(f"building llama-cpp-python in {VENV} (compiles llama.cpp; several minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "llama-cpp-python[server]"], check=True, env=env)
    return py


def ggufs(py: Path, out_dir: Path) -> dict[str, str]:
    """The shipped Q4_1 GGUF and a Q8_0 made from it with llama.cpp's quantizer (same weights, int8 blocks)."""
    from chatsmith.models.registry import embedded_gguf_path

    q4 = str(embedded_gguf_path())
    return {"Q4_1": q4, "Q8_0": requantize(py, q4, out_dir / "smollm2-135m-q8_0.gguf", "LLAMA_FTYPE_MOSTLY_Q8_0")}


def requantize(py: Path, src: str, out: Path, ftype: str) -> str:
    """`src` re-quantized (or de-quantized) to llama.cpp's `ftype` (a llama_cpp constant's name) by
    llama.cpp's own quantizer, once: the path of the file."""
    if not out.exists():
        code = textwrap.dedent(f"""
            import llama_cpp
            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype = llama_cpp.{ftype}
            p.allow_requantize = True
            p.nthread = 2
            raise SystemExit(llama_cpp.llama_model_quantize({src!r}.encode(), {str(out)!r}.encode(), p))
        """)
        subprocess.run([str(py), "-c", code], check=True, capture_output=True)
    return str(out)


# ---- (a) single stream ----------------------------------------------------------------------------

CHATSMITH_SINGLE = """
import json, sys, time, torch
from chatsmith.models import load_model
from chatsmith.infer.engine import Engine
from chatsmith.infer.sampling import SamplingParams
from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.template import render_conversation
precision, n = sys.argv[1], int(sys.argv[2])
adaptive = len(sys.argv) < 4 or sys.argv[3] != "fixed"   # "fixed": all of torch's threads, no governor
model, tok = load_model("smollm2-135m")
ids = render_conversation(tok, Conversation([Message("system", {system!r}), Message("user", {prompt!r})]),
                          add_generation_prompt=True).input_ids
engine = Engine(model, tok, precision=precision, max_batch_size=1, adaptive_threads=adaptive)
p = SamplingParams(temperature=0, max_new_tokens=n)
engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=8), stop_ids=[])
t0 = time.perf_counter(); first = []
req = engine.submit(ids, p, stop_ids=[], on_token=lambda r, t, lp, text: first.append(time.perf_counter()) if not first else None)
with torch.inference_mode():
    while not req.finished:
        engine._step()
t1 = time.perf_counter()
gov = engine.governor
print(json.dumps({{"tokens": len(req.output), "seconds": t1 - t0, "decode_tps": (len(req.output) - 1) / (t1 - first[0]),
                  "prompt_tokens": len(ids), "ttft_s": first[0] - t0,
                  "threads_now": gov.current if gov else torch.get_num_threads(), "switches": gov.switches if gov else 0}}))
"""

HF_SINGLE = """
import json, sys, time, torch
from chatsmith.models import load_model
from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.template import render_conversation
n = int(sys.argv[1])
model, tok = load_model("smollm2-135m")
model.eval()
ids = render_conversation(tok, Conversation([Message("system", {system!r}), Message("user", {prompt!r})]),
                          add_generation_prompt=True).input_ids
x = torch.tensor([ids])
kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(x))
model.generate(x, max_new_tokens=8, min_new_tokens=8, **kw)
t_first = time.perf_counter(); model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw); t_first = time.perf_counter() - t_first
t0 = time.perf_counter(); out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw); t1 = time.perf_counter()
k = out.shape[1] - x.shape[1]
print(json.dumps({{"tokens": k, "seconds": t1 - t0, "decode_tps": (k - 1) / max(t1 - t0 - t_first, 1e-9),
                  "prompt_tokens": len(ids), "ttft_s": t_first}}))
"""

LLAMACPP_SINGLE = """
import json, sys, time
from llama_cpp import Llama
path, n = sys.argv[1], int(sys.argv[2])
llm = Llama(model_path=path, n_ctx=2048, n_threads=int(sys.argv[3]), verbose=False)
prompt = llm.tokenize(("<|im_start|>system\\n" + {system!r} + "<|im_end|>\\n<|im_start|>user\\n" + {prompt!r}
                       + "<|im_end|>\\n<|im_start|>assistant\\n").encode(), special=True)
def run(k):
    llm.reset()
    t0 = time.perf_counter(); first = None; count = 0
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        count += 1
        if first is None:
            first = time.perf_counter()
        if count >= k:
            break
    return count, t0, first, time.perf_counter()
run(8)
count, t0, first, t1 = run(n)
print(json.dumps({{"tokens": count, "seconds": t1 - t0, "decode_tps": (count - 1) / (t1 - first),
                  "prompt_tokens": len(prompt), "ttft_s": first - t0}}))
"""


def _run_json(cmd: list[str], env: dict | None = None) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def single_stream(n: int, threads: int, llama_py: Path | None, models: dict[str, str]) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    rows = []
    for precision in ("int4", "int8", "module"):
        r = _run_json([_python(), "-c", CHATSMITH_SINGLE.format(prompt=PROMPT, system=SYSTEM), precision, str(n)], env)
        rows.append({"contender": f"chatsmith engine ({'fp32 module' if precision == 'module' else precision})", **r})
        print(rows[-1], flush=True)
    r = _run_json([_python(), "-c", HF_SINGLE.format(prompt=PROMPT, system=SYSTEM), str(n)], env)
    rows.append({"contender": "transformers generate (fp32)", **r})
    print(rows[-1], flush=True)
    if llama_py is not None:
        for name, path in models.items():
            r = _run_json([str(llama_py), "-c", LLAMACPP_SINGLE.format(prompt=PROMPT, system=SYSTEM), path, str(n), str(threads)], env)
            rows.append({"contender": f"llama-cpp-python ({name})", **r})
            print(rows[-1], flush=True)
    return rows


# ---- (b) servers ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


_REQUEST_NUMBER = iter(range(10**9))


async def _client(url: str, model: str, requests: int, max_tokens: int, results: list[dict], distinct: bool) -> None:
    """`distinct`: each request's question starts with its own number, so only the system prompt is
    shared with earlier requests; otherwise every request sends the same messages."""
    import httpx

    async with httpx.AsyncClient(timeout=600) as http:
        for _ in range(requests):
            question = f"Request {next(_REQUEST_NUMBER)}. {PROMPT}" if distinct else PROMPT
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
            body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first, chunks, usage = None, 0, None
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        obj = json.loads(line[6:])
                        if obj.get("usage"):
                            usage = obj["usage"]
                        for c in obj.get("choices", []):
                            if (c.get("delta") or {}).get("content"):
                                chunks += 1
                                if first is None:
                                    first = time.perf_counter()
            except httpx.HTTPError as e:  # counted, not fatal: the table shows failed requests
                results.append({"ttft": None, "tokens": 0, "start": t0, "end": time.perf_counter(), "error": str(e)})
                continue
            t1 = time.perf_counter()
            tokens = usage["completion_tokens"] if usage else chunks
            cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
            results.append({"ttft": (first or t1) - t0, "tokens": tokens, "start": t0, "end": t1,
                            "prompt_tokens": (usage or {}).get("prompt_tokens"), "cached_tokens": cached})


def load_test(url: str, model: str, clients: int, requests_each: int, max_tokens: int, distinct: bool = False) -> dict:
    results: list[dict] = []

    async def main() -> None:
        await asyncio.gather(*[_client(url, model, requests_each, max_tokens, results, distinct)
                               for _ in range(clients)])

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None) or [float("nan")]
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]
    prompt_tokens = sorted({r["prompt_tokens"] for r in results if r.get("prompt_tokens")})
    cached = [r["cached_tokens"] for r in results if r.get("cached_tokens") is not None]
    return {"clients": clients, "prompts": "distinct" if distinct else "same", "prompt_tokens": prompt_tokens,
            "cached_tokens_mean": statistics.mean(cached) if cached else None,
            "requests": len(results), "failed": sum(1 for r in results if "error" in r),
            "tokens": sum(r["tokens"] for r in results), "wall_s": wall,
            "aggregate_tps": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": p95}


def servers(levels: list[int], requests_each: int, max_tokens: int, threads: int, llama_py: Path | None,
            models: dict[str, str], pairs: list[str], modes: list[str]) -> list[dict]:
    """chatsmith serve at each precision in `pairs` beside llama-cpp-python's server on the GGUF of the
    same class (int8 - Q8_0, int4 - Q4_1)."""
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    contenders = []
    for precision in pairs:
        contenders.append((f"chatsmith serve {precision}", [_python(), "-m", "chatsmith", "serve", "smollm2-135m",
                                                            "--precision", precision, "--max-concurrency",
                                                            str(max(levels)), "--served-name", "m"]))
        peer = {"int8": "Q8_0", "int4": "Q4_1"}[precision]
        gguf = models.get(peer)
        if llama_py is not None and gguf:
            contenders.append((f"llama-cpp-python server {peer}",
                               [str(llama_py), "-m", "llama_cpp.server", "--model", gguf,
                                "--model_alias", "m", "--n_ctx", "4096",
                                "--n_threads", str(threads), "--chat_format", "chatml",
                                # its default cuts a running stream off when a new
                                # request arrives; queue them instead
                                "--interrupt_requests", "False"]))
    for name, cmd in contenders:
        port = _free_port()
        proc = subprocess.Popen(cmd + ["--port", str(port)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, proc)
            load_test(url, "m", 1, 1, 8)  # warm-up
            for mode in modes:
                for c in levels:
                    row = {"server": name, **load_test(url, "m", c, requests_each, max_tokens, mode == "distinct")}
                    rows.append(row)
                    print(row, flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke check: 32 tokens, 1 and 4 clients, 1 request each")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama-cpp-python (no venv build)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per single-stream run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--servers", default="int8,int4", help="chatsmith precisions to serve, each beside llama.cpp's "
                    "GGUF of its class (int8: Q8_0, int4: Q4_1); '' for none")
    ap.add_argument("--prompts", default="same,distinct", help="server load: 'same' (every request sends the same "
                    "messages: both servers reuse their cached prompt) and/or 'distinct' (each question starts "
                    "with its own number: only the system prompt can be reused)")
    ap.add_argument("--no-single", action="store_true", help="skip the single-stream runs")
    ap.add_argument("--clients", default=None, help="concurrent clients of the server runs, comma-separated "
                    "(default 1,4,8,16; --quick: 1,4)")
    ap.add_argument("--out", default=str(REPO / "bench-out" / "serve_throughput.json"))
    args = ap.parse_args()
    n = 32 if args.quick else args.tokens
    levels = [1, 4] if args.quick else [1, 4, 8, 16]
    if args.clients:
        levels = [int(c) for c in args.clients.split(",")]
    requests_each, max_tokens = (1, 32) if args.quick else (2, 128)

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before starting; other processes will slow every contender "
              "(and llama.cpp's spinning threads most)", flush=True)
    llama_py = None if args.no_llamacpp else ensure_llamacpp_venv()
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    models = ggufs(llama_py, out_dir) if llama_py else {}

    single = [] if args.no_single else single_stream(n, args.threads, llama_py, models)
    pairs = [p for p in args.servers.split(",") if p]
    modes = [m for m in args.prompts.split(",") if m]
    if any(m not in ("same", "distinct") for m in modes):
        ap.error(f"--prompts takes same and/or distinct, got '{args.prompts}'")
    served = servers(levels, requests_each, max_tokens, args.threads, llama_py, models, pairs, modes)

    print(f"\n(a) single-stream decode, {n} new tokens, greedy, {args.threads} threads")
    print(f"| {'contender':42} | decode tokens/s | tokens | seconds | prompt tokens | first token s |")
    print(f"|{'-' * 44}|----------------:|-------:|--------:|--------------:|--------------:|")
    for r in single:
        print(f"| {r['contender']:42} | {r['decode_tps']:15.1f} | {r['tokens']:6d} | {r['seconds']:7.2f} | "
              f"{r.get('prompt_tokens', 0):13d} | {r.get('ttft_s', float('nan')):13.3f} |")
    by = {r["contender"]: r["decode_tps"] for r in single}
    for ours, peer in (("chatsmith engine (int4)", "llama-cpp-python (Q4_1)"), ("chatsmith engine (int8)", "llama-cpp-python (Q8_0)")):
        if ours in by and peer in by:
            print(f"{ours} / {peer}: {by[ours] / by[peer]:.2f}x")
    print(f"\n(b) servers, {requests_each} streaming request(s) per client, max_tokens {max_tokens}")
    print("| server | prompts | clients | aggregate tokens/s | TTFT p50 s | TTFT p95 s | requests | failed | "
          "prompt tokens | cached (mean) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in served:
        cached = "n/a" if r["cached_tokens_mean"] is None else f"{r['cached_tokens_mean']:.1f}"
        print(f"| {r['server']} | {r['prompts']} | {r['clients']} | {r['aggregate_tps']:.1f} | {r['ttft_p50_s']:.3f} | "
              f"{r['ttft_p95_s']:.3f} | {r['requests']} | {r['failed']} | "
              f"{'/'.join(map(str, r['prompt_tokens'])) or '?'} | {cached} |")
    Path(args.out).write_text(json.dumps({"single_stream": single, "servers": served, "quick": args.quick,
                                          "threads": args.threads, "tokens": n, "load_before": load,
                                          "load_after": os.getloadavg()[0]}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
