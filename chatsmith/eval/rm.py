"""`chatsmith eval rm`: how often a reward model ranks the better answer of a held-out pair higher.

Every pair of every record counts once (a ranking of K answers gives its C(K,2) ordered pairs);
a pair is right when the better answer's score is strictly higher, as in training's eval_accuracy.
Accuracy carries a Wilson interval, the mean margin (better - worse) a normal interval.
"""

from __future__ import annotations

from typing import Any

from chatsmith.eval.stats import mean_interval, wilson_interval


def score_rankings(rm: Any, records: list[Any], batch_size: int = 16) -> list[list[float]]:
    """The reward model's score of every answer of every record (records: data.preference.Ranking)."""
    import torch

    from chatsmith.data.packing import collate_preferences
    from chatsmith.data.preference import encode_rankings
    from chatsmith.models.reward import sequence_scores

    examples, _ = encode_rankings(rm.tokenizer, records, None, rm.max_length)
    device = next(rm.model.parameters()).device
    flat: list[float] = []
    answers = [ans for ex in examples for ans in ex.answers]
    from chatsmith.data.preference import PreferenceExample

    with torch.no_grad():
        for i in range(0, len(answers), batch_size):
            batch = collate_preferences([PreferenceExample([a], [0.0]) for a in answers[i:i + batch_size]],
                                        unit="answers")
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            flat.extend(sequence_scores(rm.model, batch).tolist())
    out, k = [], 0
    for ex in examples:
        out.append(flat[k:k + len(ex.answers)])
        k += len(ex.answers)
    return out


def pairwise_accuracy(records: list[Any], scores: list[list[float]]) -> dict[str, Any]:
    """Accuracy (Wilson interval), mean margin (normal interval) and ties over every ordered pair."""
    right, margins, ties = 0, [], 0
    for rec, sc in zip(records, scores, strict=True):
        for i, j in rec.pairs():
            gap = sc[i] - sc[j]
            margins.append(gap)
            right += gap > 0
            ties += gap == 0
    return {"accuracy": wilson_interval(right, len(margins)).as_dict(),
            "margin": mean_interval(margins).as_dict(), "pairs": len(margins), "correct": right, "ties": ties,
            "records": len(records)}


def evaluate_reward_model(reward_model: str, data: str, *, skip_bad: bool = False, limit: int | None = None,
                          batch_size: int = 16, max_length: int | None = None) -> dict[str, Any]:
    """Pairwise accuracy of a `chatsmith rm` run on a preference file (pairs or rankings in any
    format `chatsmith rm` reads), with each record's scores. Answers are cut as in training, to
    `max_length` tokens (default: the length the reward model was trained with)."""
    from chatsmith.data.preference import read_preferences
    from chatsmith.models.reward import load_reward_model, trained_max_length

    rm = load_reward_model(reward_model)
    rm.max_length = max_length or trained_max_length(reward_model) or rm.max_length
    data_read = read_preferences(data, skip_bad=skip_bad)
    records = data_read.records[:limit] if limit else data_read.records
    scores = score_rankings(rm, records, batch_size)
    out = pairwise_accuracy(records, scores)
    out.update({"reward_model": reward_model, "data": data, "skipped": len(data_read.skipped), "max_length": rm.max_length,
                "scores": [{"source": r.source, "scores": s} for r, s in zip(records, scores)],
                "pairs_of": [r.pairs() for r in records]})
    return out
