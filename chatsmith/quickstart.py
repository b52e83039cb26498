"""`chatsmith quickstart`: teach the embedded model a new identity, then show before and after.

Data: chatsmith's built-in identity conversations (name and maker from flags) mixed with general
conversations so the model keeps answering other things. Evaluation: held-out paraphrased
identity questions that never appear in training, plus a few general questions.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from chatsmith.config import SFTConfig
from chatsmith.data.template import template_source

# SmolLM2's template injects this system prompt when a conversation has none. A rebranded model
# must not be told at every turn that it is SmolLM, so its template gets a neutral default.
SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
NEUTRAL_SYSTEM = "You are a helpful AI assistant."

# Settings found to reach >= 90% held-out identity accuracy on the embedded model in a few
# minutes on a 2-core CPU (see docs/quickstart.md for the measurements).
QUICKSTART_SFT = dict(method="lora", lora_r=16, lora_alpha=32, lr=1e-3, batch_size=8, grad_accum=1,
                      epochs=2.0, max_length=256, warmup_ratio=0.05, scheduler="cosine", save_every=0)


def neutral_template(tokenizer: Any) -> str | None:
    """The model's own template with SmolLM's default system prompt replaced by a neutral one
    (None when the template does not inject it)."""
    source = template_source(tokenizer, None)
    if SMOLLM_DEFAULT_SYSTEM in source:
        return source.replace(SMOLLM_DEFAULT_SYSTEM, NEUTRAL_SYSTEM)
    return None


def score(engine: Any, tasks: Any) -> tuple[float, float, list[dict[str, Any]]]:
    """(identity accuracy, general accuracy, result rows) of the built-in identity task set,
    answered greedily through eval/tasks.py (the code behind `chatsmith eval tasks`)."""
    from chatsmith.eval.tasks import run_task_sets

    rows = run_task_sets(engine, [tasks], max_new_tokens=40)

    def accuracy(rows: list[dict[str, Any]]) -> float:
        return sum(r["correct"] for r in rows) / max(1, len(rows))

    return (accuracy([r for r in rows if r["category"].startswith("identity")]),
            accuracy([r for r in rows if r["category"] == "general"]), rows)


def run_quickstart(name: str = "Smithy", maker: str = "the chatsmith project", model: str = "smollm2-135m",
                   output: str = "runs/quickstart", max_steps: int | None = None, seed: int = 0) -> int:
    """Run `chatsmith quickstart`: evaluate, train the new identity, evaluate again and print the tables;
    returns the exit status."""
    from rich.console import Console
    from rich.table import Table

    from chatsmith.data.builtin import quickstart_data
    from chatsmith.eval.report import write_results
    from chatsmith.eval.tasks import accuracy_table, builtin_task_set
    from chatsmith.infer.engine import Engine
    from chatsmith.models import load_model
    from chatsmith.train.sft import run_sft

    console = Console(stderr=False)
    t_start = time.perf_counter()
    run = Path(output)
    if run.exists() and (run / "final").exists():
        import shutil

        console.print(f"[yellow]{run} holds an earlier quickstart; replacing it[/yellow]")
        shutil.rmtree(run)
    console.rule(f"chatsmith quickstart: teaching {model} to be {name}, made by {maker}")
    base, tokenizer = load_model(model)
    tasks = builtin_task_set("identity", assistant_name=name, maker=maker)
    n_id = sum(i.category.startswith("identity") for i in tasks.items)
    n_gen = len(tasks.items) - n_id
    console.print(f"evaluating the starting model on {n_id} held-out identity questions "
                  f"and {n_gen} general questions...")
    engine = Engine(base, tokenizer, max_batch_size=16, kv_cache_mb=1024)
    before_id, before_gen, before_rows = score(engine, tasks)
    template = neutral_template(tokenizer)
    del base, engine

    data = quickstart_data(name, maker, seed=seed)
    console.print(f"training on {len(data)} built-in conversations (identity + general)...")
    cfg = SFTConfig(model=model, output=str(run), seed=seed, template=template,
                    **{**QUICKSTART_SFT, **({"max_steps": max_steps} if max_steps else {})})
    t_train = time.perf_counter()
    run_sft(cfg, conversations=data)
    train_s = time.perf_counter() - t_train

    tuned, tuned_tok = load_model(str(run))
    engine = Engine(tuned, tuned_tok, max_batch_size=16, kv_cache_mb=1024)
    after_id, after_gen, after_rows = score(engine, tasks)

    table = Table(title=f"held-out questions: before -> after ({n_id} identity, {n_gen} general)")
    table.add_column("question", max_width=34)
    table.add_column("before", max_width=44)
    table.add_column("after", max_width=44)
    shown = [i for i, r in enumerate(before_rows) if r["category"].startswith("identity")][:8] + \
        [i for i, r in enumerate(before_rows) if r["category"] == "general"][:4]
    for i in shown:
        b, a = before_rows[i], after_rows[i]
        table.add_row(b["question"], ("[green]" if b["correct"] else "[red]") + b["answer"].replace("[", "\\["),
                      ("[green]" if a["correct"] else "[red]") + a["answer"].replace("[", "\\["))
    console.print(table)
    for when, rows in (("before", before_rows), ("after", after_rows)):
        write_results(run / "eval" / when, {"kind": "tasks", "model": model if when == "before" else str(run),
                                            "tasks": "builtin:identity", "accuracy": accuracy_table(rows)},
                      [{"id": f"identity/{i}", **r} for i, r in enumerate(rows)])
    summary = Table(title="accuracy")
    for col in ("", "before", "after"):
        summary.add_column(col)
    summary.add_row("identity (held-out paraphrases)", f"{before_id:.0%}", f"{after_id:.0%}")
    summary.add_row("general questions", f"{before_gen:.0%}", f"{after_gen:.0%}")
    console.print(summary)
    total_s = time.perf_counter() - t_start
    result = {"name": name, "maker": maker, "identity_before": before_id, "identity_after": after_id,
              "general_before": before_gen, "general_after": after_gen, "train_seconds": train_s,
              "total_seconds": total_s,
              "identity_rows": [{"question": b["question"], "before": b["answer"], "after": a["answer"],
                                 "ok": a["correct"]} for b, a in zip(before_rows, after_rows)
                                if b["category"].startswith("identity")]}
    (run / "quickstart.json").write_text(json.dumps(result, indent=2))
    console.print(f"finished in {total_s / 60:.1f} min (training {train_s / 60:.1f} min). Loss curve: {run}/loss.png; "
                  f"answers and reports: {run}/eval/before/report.html, {run}/eval/after/report.html "
                  f"(side by side: chatsmith eval compare {run}/eval/before {run}/eval/after)")
    console.print(f"\nTalk to it:  [bold]chatsmith chat {run}[/bold]")
    sys.stdout.flush()
    return 0
