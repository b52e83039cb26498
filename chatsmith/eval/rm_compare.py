"""`chatsmith rm compare`: several models answer the same prompts and a reward model scores them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError
from chatsmith.models.reward import load_reward_model


def sample_answers(model_spec: str, prompts: list[str], *, temperature: float = 0.0, max_new_tokens: int = 48,
                   seed: int = 0) -> list[str]:
    """One answer per prompt from a model, generated together by the engine (stopping at the end of
    the turn); with a temperature, prompt i samples with seed + i."""
    from chatsmith.eval.answers import answer_questions
    from chatsmith.infer.engine import Engine
    from chatsmith.models import load_model

    model, tok = load_model(model_spec)
    engine = Engine(model, tok, max_batch_size=min(16, len(prompts)), kv_cache_mb=1024)
    return answer_questions(engine, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)


def compare_models(reward_model: str, models: list[str], *, prompts: str | list[str] = "builtin",
                   temperature: float = 0.0, max_new_tokens: int = 48, seed: int = 0,
                   json_path: str | None = None) -> dict[str, Any]:
    """Sample each model's answers to the same prompts and score them with a reward model; prints
    a table (mean reward, and how often each model's answer beats the first model's)."""
    from rich.console import Console
    from rich.table import Table

    if isinstance(prompts, str):
        if prompts == "builtin":
            from chatsmith.data.builtin import preference_demo_prompts

            prompts = preference_demo_prompts()
        else:
            p = Path(prompts)
            if not p.is_file():
                raise ChatsmithError(f"--prompts {prompts}: not a file (one prompt a line), and not 'builtin'")
            prompts = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    rm = load_reward_model(reward_model)
    results: dict[str, Any] = {"prompts": prompts, "models": {}}
    for spec in models:
        answers = sample_answers(spec, prompts, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        scores = rm.score(prompts, answers)
        results["models"][spec] = {"answers": answers, "scores": scores, "mean": sum(scores) / len(scores)}
    first = results["models"][models[0]]["scores"]
    table = Table(title=f"reward of sampled answers on {len(prompts)} prompts (reward model: {reward_model})")
    for col in ("model", "mean reward", f"wins vs {models[0]}"):
        table.add_column(col)
    for spec in models:
        sc = results["models"][spec]["scores"]
        wins = sum(a > b for a, b in zip(sc, first, strict=True))
        results["models"][spec]["wins_vs_first"] = wins
        table.add_row(spec, f"{results['models'][spec]['mean']:+.3f}", f"{wins}/{len(sc)}" if spec != models[0] else "-")
    Console().print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results
