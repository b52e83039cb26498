"""Tool calling, trained: the valid-call and correct-call rates of the embedded model on held-out
prompts, before and after LoRA SFT on the built-in tool-use set (chatsmith/data/tool_demo.py).

Each held-out prompt is rendered with the two tools offered (the fallback format: SmolLM2's own
template ignores `tools=`), answered greedily, and scored: a valid call parses, names an offered
tool and fits its parameter schema; a correct call is valid with the expected tool and arguments.
The row "constrained" decodes under tool_choice=required (every call valid by construction), so
it shows how often the model picks the right tool and arguments when it is forced to call.

    flock /tmp/bench.lock python benchmarks/tool_sft_demo.py [--train 240] [--heldout 40] [--epochs 2]

Prints a table and writes JSON (bench-out/tool_sft_demo.json); the numbers are in docs/tools.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def evaluate(model_spec: str, held: list[Any], precision: str, constrained: bool = False,
             max_tokens: int = 64) -> dict[str, Any]:
    """Valid-call and correct-call rates of `model_spec` on the held-out prompts (greedy)."""
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation
    from chatsmith.data.tool_demo import TOOLS, score_answer
    from chatsmith.infer.constraints import GrammarConstraint, tool_call_grammar
    from chatsmith.infer.engine import Engine, resolve_precision
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.models import load_model

    model, tok = load_model(model_spec)
    engine = Engine(model, tok, max_batch_size=16, precision=resolve_precision(model, precision), kv_cache_mb=256)
    grammar = tool_call_grammar(TOOLS, None, False) if constrained else None
    reqs = []
    for h in held:
        ids = render_conversation(tok, Conversation([Message("user", h.prompt)], tools=TOOLS),
                                  add_generation_prompt=True).input_ids
        c = GrammarConstraint(tok, grammar, engine.stop_default) if grammar else None
        reqs.append(engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=max_tokens), constraint=c,
                                  check_queue=False))
    while not all(r.finished for r in reqs):
        engine.step_once()
    texts = [tok.decode(r.output, skip_special_tokens=True) for r in reqs]
    scores = [score_answer(t, h) for t, h in zip(texts, held)]
    return {"valid": sum(v for v, _ in scores) / len(held), "correct": sum(c for _, c in scores) / len(held),
            "n": len(held), "examples": [{"prompt": h.prompt, "answer": t} for h, t in zip(held[:4], texts[:4])]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns the results (also printed and written as JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train", type=int, default=240, help="training conversations")
    ap.add_argument("--heldout", type=int, default=40, help="held-out prompts")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--precision", default="auto", help="serving precision of the evaluations")
    ap.add_argument("--run", default=None, help="SFT run directory (default: a temporary one)")
    ap.add_argument("--out", default="bench-out/tool_sft_demo.json")
    args = ap.parse_args(argv)

    from chatsmith.config import SFTConfig
    from chatsmith.data.tool_demo import tool_heldout_set, tool_train_set
    from chatsmith.train.sft import run_sft

    train, held = tool_train_set(args.train), tool_heldout_set(args.heldout)
    t0 = time.perf_counter()
    rows = {"before": evaluate(args.model, held, args.precision),
            "before, constrained": evaluate(args.model, held, args.precision, constrained=True)}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or str(Path(tmp) / "tool-sft")
        cfg = SFTConfig(model=args.model, output=run_dir, method="lora", epochs=args.epochs, max_steps=args.max_steps,
                        batch_size=8, lr=args.lr, max_length=768, eval_at_start=False, log_every=10)
        t1 = time.perf_counter()
        run = run_sft(cfg, conversations=train)
        train_s = time.perf_counter() - t1
        rows["after SFT"] = evaluate(str(run), held, args.precision)
        rows["after SFT, constrained"] = evaluate(str(run), held, args.precision, constrained=True)
    load = os.getloadavg()[0]
    print(f"\ntool calling on {len(held)} held-out prompts ({args.model}, greedy; LoRA SFT on {len(train)} "
          f"conversations, {args.epochs:g} epochs, {train_s:.0f} s; load average {load:.1f} on {os.cpu_count()} CPUs)")
    print(f"{'model':<24} {'valid-call rate':>16} {'correct-call rate':>18}")
    for name, r in rows.items():
        print(f"{name:<24} {r['valid']:>16.2f} {r['correct']:>18.2f}")
    result = {"model": args.model, "train": len(train), "heldout": len(held), "epochs": args.epochs,
              "train_seconds": train_s, "total_seconds": time.perf_counter() - t0, "load_average": load,
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
