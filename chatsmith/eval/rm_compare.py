"""`chatsmith eval rm-compare` (and `chatsmith rm compare`): several models answer the same prompts
through the one engine, a reward model scores every answer, and each model is compared with the
first: mean reward with its interval, and win/tie/loss per prompt with the win rate's interval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError
from chatsmith.eval.stats import mean_interval, win_tie_loss

Prompt = list[dict[str, str]]   # a conversation ending with the user's turn


def read_compare_prompts(spec: str, limit: int | None = None) -> list[Prompt]:
    """Prompts from 'builtin' (held-out demo questions), a .txt file (one prompt a line) or any
    prompt file chatsmith reads (records with a 'prompt': a string or a list of {role, content})."""
    from chatsmith.data.prompts import prompt_messages, read_prompt_file
    from chatsmith.data.sources import RecordContext

    if spec == "builtin":
        from chatsmith.data.builtin import preference_demo_prompts

        out = [[{"role": "user", "content": p}] for p in preference_demo_prompts()]
    else:
        p = Path(spec)
        if not p.is_file():
            raise ChatsmithError(f"--prompts {spec}: not a file (a .txt with one prompt a line, or JSON/JSONL/CSV/"
                                 "Parquet records with a 'prompt'), and not 'builtin'")
        if p.suffix.lower() == ".txt":
            out = [[{"role": "user", "content": ln.strip()}] for ln in p.read_text().splitlines() if ln.strip()]
        else:
            out = [prompt_messages(r, RecordContext(spec, str(r.get("_source", "")))) for r in read_prompt_file(spec)]
    if not out:
        raise ChatsmithError(f"--prompts {spec}: no prompts in it")
    return out[:limit] if limit else out


def sample_answers(model_spec: str, prompts: list[Prompt], *, temperature: float = 0.0, max_new_tokens: int = 48,
                   seed: int = 0, template: str | None = None) -> list[str]:
    """One answer per prompt from a model, generated together by the engine (stopping at the end of
    the turn); with a temperature, prompt i samples with seed + i."""
    from chatsmith.data.conversation import Message
    from chatsmith.eval.answers import answer_conversations, load_engine

    engine = load_engine(model_spec, max_batch_size=min(16, len(prompts)))
    comps = answer_conversations(engine, [[Message(m["role"], m["content"]) for m in p] for p in prompts],
                                 template=template, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return [c.text.strip() for c in comps]


def compare_models(reward_model: str, models: list[str], *, prompts: str = "builtin", temperature: float = 0.0,
                   max_new_tokens: int = 48, seed: int = 0, limit: int | None = None, tie_margin: float = 0.0,
                   output: str | None = None, json_path: str | None = None) -> dict[str, Any]:
    """Sample each model's answers to the same prompts, score them with a reward model and print a
    table: mean reward (interval), and win/tie/loss against the first model (a tie: rewards within
    `tie_margin`). Writes a results folder (results.jsonl, summary.json, report.html) to `output`."""
    from rich.console import Console
    from rich.table import Table

    from chatsmith.models.reward import load_reward_model

    if len(models) < 1:
        raise ChatsmithError("--models needs at least one model")
    convs = read_compare_prompts(prompts, limit)
    rm = load_reward_model(reward_model)
    per: dict[str, dict[str, Any]] = {}
    for spec in models:
        answers = sample_answers(spec, convs, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        scores = [float(s) for s in rm.score(convs, answers)]
        per[spec] = {"answers": answers, "scores": scores, "reward": mean_interval(scores).as_dict()}
    first = per[models[0]]["scores"]
    table = Table(title=f"reward of answers to {len(convs)} prompts (reward model: {reward_model})")
    for col in ("model", "mean reward [95%]", f"win/tie/loss vs {models[0]}", "win rate [95%]"):
        table.add_column(col)
    outcomes: dict[str, Any] = {}
    for spec in models:
        r = per[spec]["reward"]
        cells = [spec, f"{r['value']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"]
        if spec != models[0]:
            wtl = win_tie_loss(per[spec]["scores"], first, tie_margin)
            per[spec]["vs_first"] = wtl.as_dict()
            outcomes[f"{spec} vs {models[0]}"] = wtl.as_dict()
            wr = wtl.win_rate()
            cells += [f"{wtl.wins}/{wtl.ties}/{wtl.losses}", str(wr)]
        else:
            cells += ["-", "-"]
        table.add_row(*cells)
    Console().print(table)
    summary = {"kind": "rm-compare", "models": models, "model": models[-1], "reward_model": reward_model,
               "prompts": prompts, "n_prompts": len(convs), "temperature": temperature,
               "max_new_tokens": max_new_tokens, "seed": seed,
               "table": [{"model": m, "mean_reward": per[m]["reward"]["value"], "low": per[m]["reward"]["low"],
                          "high": per[m]["reward"]["high"]} for m in models],
               "outcomes": outcomes, "rewards": {m: per[m]["reward"] for m in models}}
    results = [{"id": str(i), "category": "all", "question": c[-1]["content"],
                "answers": {m: {"answer": per[m]["answers"][i], "score": per[m]["scores"][i]} for m in models}}
               for i, c in enumerate(convs)]
    if output:
        from chatsmith.eval.report import write_results

        report = write_results(output, summary, results)
        print(f"report: {report}")
    if json_path:
        Path(json_path).write_text(json.dumps({**summary, "results": results}, indent=2))
    return {**summary, "per_model": per}
