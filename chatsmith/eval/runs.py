"""The `chatsmith eval ppl|tasks|rm` commands: load, measure, print a table, write a results folder
(see eval/report.py). Each returns its summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatsmith.eval.report import write_results


def _console() -> Any:
    from rich.console import Console

    return Console()


def run_ppl(models: Sequence[str], data: str, *, all_tokens: bool = False, template: str | None = None,
            max_length: int = 2048, format: str | None = None, columns: dict[str, str] | None = None,
            skip_bad: bool = False, limit: int | None = None, output: str | None = None) -> dict[str, Any]:
    """Perplexity of each model on a file, one row per model."""
    from rich.table import Table

    from chatsmith.eval.ppl import perplexity
    from chatsmith.models import load_model

    rows = []
    for spec in models:
        model, tok = load_model(spec)
        r = perplexity(model, tok, data, all_tokens=all_tokens, template=template, max_length=max_length,
                       format=format, columns=columns, skip_bad=skip_bad, limit=limit)
        rows.append({"model": spec, **r})
        del model
    scored = "every token" if all_tokens else "assistant tokens"
    table = Table(title=f"perplexity on {data} ({scored})")
    for col in ("model", "perplexity", "NLL / token", "tokens", "examples", "truncated"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["model"], f"{r['ppl']:.3f}", f"{r['nll']:.4f}", str(r["tokens"]), str(r["examples"]),
                      str(r["truncated"]))
    _console().print(table)
    summary = {"kind": "ppl", "models": list(models), "model": ", ".join(models), "data": data,
               "all_tokens": all_tokens, "table": rows}
    if output:
        print(f"report: {write_results(output, summary, [])}")
    return summary


def run_tasks(models: Sequence[str], spec: str, *, shots: int = 0, match: str = "normalised",
              system: str | None = None, template: str | None = None, max_new_tokens: int = 64,
              columns: dict[str, str] | None = None, limit: int | None = None, precision: str = "auto",
              shots_from: str | None = None, output: str | None = None) -> dict[str, Any]:
    """Task accuracy of each model (per set and category, with intervals); one table per run. Few-shot
    examples come from `shots_from` (a task file) when given, else each set's own (see eval/tasks.py)."""
    from rich.table import Table

    from chatsmith.eval.answers import load_engine
    from chatsmith.eval.tasks import accuracy_table, load_task_sets, run_task_sets

    sets = load_task_sets(spec, match=match, columns=columns, limit=limit)
    if shots_from:
        from chatsmith.eval.tasks import read_task_file

        examples = [(i.question, i.references[0]) for i in read_task_file(shots_from, columns=columns).items]
        for s in sets:
            s.shots = examples
    per_model: dict[str, dict[str, Any]] = {}
    results: list[dict[str, Any]] = []
    for m in models:
        engine = load_engine(m, precision)
        rows = run_task_sets(engine, sets, template=template, shots=shots, system=system,
                             max_new_tokens=max_new_tokens)
        per_model[m] = accuracy_table(rows)
        for i, r in enumerate(rows):
            results.append({"id": f"{r['set']}/{i}", "model": m, **r})
        del engine
    groups = list(per_model[models[0]])
    table = Table(title=f"task accuracy ({shots}-shot) [95% interval]")
    table.add_column("set / category")
    for m in models:
        table.add_column(m, justify="right")
    table.add_column("n", justify="right")
    for g in groups:
        cells = [f"{per_model[m][g]['value']:.3f} [{per_model[m][g]['low']:.2f}, {per_model[m][g]['high']:.2f}]"
                 for m in models]
        table.add_row(g, *cells, str(per_model[models[0]][g]["n"]))
    _console().print(table)
    summary = {"kind": "tasks", "models": list(models), "model": models[-1], "tasks": spec, "shots": shots,
               "accuracy": {f"{m} · {g}" if len(models) > 1 else g: v for m in models for g, v in per_model[m].items()},
               "per_model": per_model}
    if output:
        print(f"report: {write_results(output, summary, results)}")
    return summary


def run_rm_eval(reward_model: str, data: str, *, skip_bad: bool = False, limit: int | None = None,
                max_length: int | None = None, output: str | None = None) -> dict[str, Any]:
    """Pairwise accuracy and mean margin of a reward model on a preference file."""
    from chatsmith.eval.rm import evaluate_reward_model

    r = evaluate_reward_model(reward_model, data, skip_bad=skip_bad, limit=limit, max_length=max_length)
    acc, mar = r["accuracy"], r["margin"]
    print(f"{reward_model} on {data}: pairwise accuracy {acc['value']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}] "
          f"({r['correct']}/{r['pairs']} pairs, {r['ties']} ties); mean margin {mar['value']:+.3f} "
          f"[{mar['low']:+.3f}, {mar['high']:+.3f}]")
    summary = {"kind": "rm", "model": reward_model, "data": data, "pairs": r["pairs"], "correct": r["correct"],
               "ties": r["ties"], "records": r["records"], "skipped": r["skipped"], "max_length": r["max_length"],
               "accuracy": {"pairwise accuracy": acc}, "margin": mar}
    results = [{"id": str(i), "category": "all", "question": s["source"], "answer": f"scores {s['scores']}",
                "correct": all(s["scores"][a] > s["scores"][b] for a, b in rec_pairs)}
               for i, (s, rec_pairs) in enumerate(zip(r["scores"], r["pairs_of"]))]
    if output:
        print(f"report: {write_results(output, summary, results)}")
    return summary
