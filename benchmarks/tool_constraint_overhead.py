"""Per-token cost of constrained decoding in chatsmith's engine, against unconstrained decoding.

One request at a time on the embedded smollm2-135m (the serving precision, int8, unless --precision),
greedy, the same prompts for every mode:

- plain: no constraint
- json_object: the character automaton (chatsmith/infer/constraints.py, walks candidate token texts)
- json_schema: llguidance's grammar for a strict schema (a vocabulary mask per token)
- tool_call: llguidance's grammar for a forced call (`tool_choice` named) in the fallback format

Decode time per token is measured from the first generated token to the last (the prefill is left
out), over every prompt; the overhead is the difference to plain. The mask alone (llguidance's
compute_bitmask and its unpacking) is timed too. Hold the benchmark lock on a shared machine:

    flock /tmp/bench.lock python benchmarks/tool_constraint_overhead.py [--tokens 64] [--repeats 5]

Prints a table and writes JSON (bench-out/tool_constraint_overhead.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

PROMPTS = ["Describe a pet as JSON.", "Give me the weather in Paris.", "A book you like, as JSON.",
           "Tell me about yourself.", "What should I cook tonight?"]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "kind": {"type": "string", "enum": ["cat", "dog", "bird", "fish"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 40},
    "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "verified": {"type": "boolean"}},
              "required": ["city", "verified"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4}},
    "required": ["name", "kind", "age", "owner", "tags"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens at most per answer")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the prompts per mode")
    ap.add_argument("--out", default="bench-out/tool_constraint_overhead.json")
    args = ap.parse_args()

    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation
    from chatsmith.data.tools import normalize_tools
    from chatsmith.infer.constraints import (
        GrammarConstraint,
        JsonObjectConstraint,
        json_schema_grammar,
        strict_schema,
        tool_call_grammar,
    )
    from chatsmith.infer.engine import Engine, resolve_precision
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.models import load_model

    model, tok = load_model(args.model)
    precision = resolve_precision(model, args.precision)
    engine = Engine(model, tok, max_batch_size=1, precision=precision, kv_cache_mb=64)
    stops = engine.stop_default
    tools = normalize_tools([WEATHER])
    schema_grammar = json_schema_grammar(strict_schema(SCHEMA))
    call_grammar = tool_call_grammar(tools, "get_weather", False)
    modes = {
        "plain": lambda: None,
        "json_object": lambda: JsonObjectConstraint(tok),
        "json_schema": lambda: GrammarConstraint(tok, schema_grammar, stops),
        "tool_call": lambda: GrammarConstraint(tok, call_grammar, stops),
    }
    prompts = {name: [render_conversation(tok, Conversation([Message("user", p)], tools=tools if name == "tool_call"
                                                            else None), add_generation_prompt=True).input_ids
                      for p in PROMPTS] for name in modes}

    def run(name: str) -> tuple[int, float, list[str]]:
        tokens, seconds, texts = 0, 0.0, []
        for ids in prompts[name]:
            req = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=args.tokens), constraint=modes[name]())
            while not req.finished:
                engine.step_once()
            end = time.monotonic()
            if len(req.output) > 1:
                tokens += len(req.output) - 1
                seconds += end - req.first_token_at
            texts.append(tok.decode(req.output, skip_special_tokens=True))
        return tokens, seconds, texts

    for name in modes:   # warm-up: tokenizer views, grammar caches, the first forward passes
        run(name)
    # Modes take turns within each repeat, so a change in the machine's load hits them all alike.
    per: dict[str, list[float]] = {name: [] for name in modes}
    last: dict[str, tuple[int, list[str]]] = {}
    for _ in range(args.repeats):
        for name in modes:
            n, s, texts = run(name)
            per[name].append(1000 * s / max(n, 1))
            last[name] = (last.get(name, (0, []))[0] + n, texts)
    results = {}
    for name in modes:
        total_tokens, texts = last[name]
        valid = sum(_parses(t, name) for t in texts)
        results[name] = {"ms_per_token": statistics.median(per[name]), "runs_ms": per[name], "tokens": total_tokens,
                         "valid_outputs": f"{valid}/{len(texts)}", "example": texts[0][:120]}

    # the mask alone: compute_bitmask + unpacking + the tensor the engine masks with, along one answer
    c = GrammarConstraint(tok, schema_grammar, stops)
    ids = tok(json.dumps({"name": "Rex", "kind": "dog", "age": 3, "owner": {"city": "Oslo", "verified": True},
                          "tags": ["a"]}), add_special_tokens=False)["input_ids"]
    mask_times = []
    for t in ids:
        t0 = time.perf_counter()
        c.allowed(len(tok))
        mask_times.append(time.perf_counter() - t0)
        c.advance(t)

    plain = results["plain"]["ms_per_token"]
    load = os.getloadavg()[0]
    print(f"\nconstrained decoding on {args.model} ({precision}), greedy, up to {args.tokens} tokens, "
          f"{len(PROMPTS)} prompts x {args.repeats}; load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'mode':<12} {'ms/token':>9} {'overhead':>9} {'valid':>6}  example")
    for name, r in results.items():
        over = r["ms_per_token"] - plain
        print(f"{name:<12} {r['ms_per_token']:>9.2f} {over:>+9.2f} {r['valid_outputs']:>6}  {r['example'][:60]!r}")
    print(f"llguidance mask alone (bitmask -> bool tensor): median {1e6 * statistics.median(mask_times):.0f} us "
          f"per token over {len(mask_times)} tokens")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "precision": precision, "tokens": args.tokens,
                               "repeats": args.repeats, "load_average": load, "cpus": os.cpu_count(),
                               "results": results, "mask_us_median": 1e6 * statistics.median(mask_times)}, indent=1))
    print(f"wrote {out}")
    return 0


def _parses(text: str, mode: str) -> bool:
    if mode == "plain":
        return True
    if mode == "tool_call":
        from chatsmith.data.tools import parse_tool_calls

        return bool(parse_tool_calls(text, ["get_weather"]).calls)
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
