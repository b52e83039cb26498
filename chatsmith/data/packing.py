"""Rendered examples -> model inputs: packed rows (several examples back to back in one row) or
padded batches. Training, scoring and evaluation all batch through here.

- packed rows (the default): a micro-batch's examples are concatenated into one row with position
  ids restarting at 0 for each example; `segment_bounds` marks each example's span so attention
  runs causally within it (models/attention.py; without it transformers builds a block-diagonal
  mask from the restarts). Attention never crosses examples and no pad token is computed.
- padded rows: for methods that prepend virtual tokens to every sequence (prompt/prefix tuning,
  LLaMA-Adapter), examples are right-padded into a [B, T] batch with an attention mask.
- preference rows: every answer of every record in one packed row, the answers of a record
  optionally continuing one shared copy of their prompt.
"""

from __future__ import annotations

from typing import Any

import torch

from chatsmith.data.preference import PreferenceExample
from chatsmith.data.template import Rendered


def segment_bounds(lengths: list[int]) -> list[tuple[int, int]]:
    """[(start, end)] of consecutive spans with these lengths."""
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return out


def collate_packed(examples: list[Rendered]) -> dict[str, Any]:
    """One row of concatenated examples: input_ids/position_ids [1, L]; the positions whose next
    token is a target, and those targets [N]; each example's (start, end) span in the row, for
    segment attention (models/attention.py)."""
    ids: list[int] = []
    pos: list[int] = []
    tpos: list[int] = []
    tgt: list[int] = []
    for ex in examples:
        start = len(ids)
        ids.extend(ex.input_ids)
        pos.extend(range(len(ex.input_ids)))
        for t in range(1, len(ex.input_ids)):
            if ex.loss_mask[t]:
                tpos.append(start + t - 1)
                tgt.append(ex.input_ids[t])
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "target_positions": torch.tensor(tpos, dtype=torch.long),
        "targets": torch.tensor(tgt, dtype=torch.long),
        "segment_bounds": segment_bounds([len(ex.input_ids) for ex in examples]),
        "n_tokens": len(ids),
        "n_targets": len(tgt),
    }


def collate_padded(examples: list[Rendered], pad_id: int) -> dict[str, Any]:
    """Right-padded [B, T] batch with attention_mask and next-token labels (-100 = ignored)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex)
        ids[b, :n] = torch.tensor(ex.input_ids)
        att[b, :n] = 1
        m = torch.tensor(ex.loss_mask, dtype=torch.bool)
        labels[b, :n] = torch.where(m, ids[b, :n], torch.tensor(-100))
    return {
        "input_ids": ids,
        "attention_mask": att,
        "labels": labels,
        "n_tokens": int(att.sum()),
        "n_targets": sum(e.n_targets for e in examples),
    }


def collate_preferences(examples: list[PreferenceExample], unit: str = "pairs",
                        share_prefix: bool = False) -> dict[str, Any]:
    """Pack every answer of every example into one row.

    share_prefix (needs segment attention on the model, models/attention.py): the tokens that all K
    answers of an example start with (the prompt) go in the row once, and each answer continues
    that copy; the prompt then costs one forward instead of K. Same numbers either way (tested).

    Returns input_ids/position_ids [1, L]; target_positions/targets [N] (answer tokens, as in
    `collate_packed`) with target_seq [N] naming their sequence; last_positions [S] (each sequence's
    last answer token); n_answer_tokens [S]; scores [S]; pairs [P, 2] (better, worse) sequence
    indices; groups (first sequence, K) per example; margins [P] (nan: none); desirable [E]; ref_logps
    [S] when cached; for KTO a second packed row `kl` of mismatched sequences. n_targets counts
    `unit`: pairs, examples or answers.
    """
    ids: list[int] = []
    pos: list[int] = []
    tpos: list[int] = []
    tgt: list[int] = []
    tseq: list[int] = []
    last: list[int] = []
    n_ans: list[int] = []
    scores: list[float] = []
    pairs: list[tuple[int, int]] = []
    pair_group: list[int] = []
    margins: list[float] = []
    groups: list[tuple[int, int]] = []
    ref: list[float] = []
    spans: list[tuple[int, int]] = []
    s = 0
    for ex in examples:
        groups.append((s, len(ex.answers)))
        lcp = _common_prefix(ex.answers) if share_prefix and len(ex.answers) > 1 else 0
        pstart = len(ids)
        if lcp:
            ids.extend(ex.answers[0].input_ids[:lcp])
            pos.extend(range(lcp))
            spans.append((pstart, pstart + lcp))
        for a in ex.answers:
            start = len(ids)
            ids.extend(a.input_ids[lcp:])
            pos.extend(range(lcp, len(a.input_ids)))
            spans.append((start, len(ids), pstart, pstart + lcp) if lcp else (start, len(ids)))
            own = start - lcp   # row index of this answer's token t >= lcp is own + t
            count = 0
            for t in range(1, len(a.input_ids)):
                if a.loss_mask[t]:
                    tpos.append(pstart + t - 1 if t - 1 < lcp else own + t - 1)
                    tgt.append(a.input_ids[t])
                    tseq.append(s)
                    count += 1
            t_last = max(t for t in range(len(a.loss_mask)) if a.loss_mask[t])
            last.append(pstart + t_last if t_last < lcp else own + t_last)
            n_ans.append(count)
            s += 1
        g0 = groups[-1][0]
        k = len(ex.answers)
        for i in range(k):
            for j in range(i + 1, k):
                if ex.scores[i] > ex.scores[j]:
                    pairs.append((g0 + i, g0 + j))
                    pair_group.append(len(groups) - 1)
                    margins.append(float("nan") if ex.margin is None else ex.margin)
        scores.extend(ex.scores)
        if ex.ref_logps is not None:
            ref.extend(ex.ref_logps)
    batch: dict[str, Any] = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "target_positions": torch.tensor(tpos, dtype=torch.long),
        "targets": torch.tensor(tgt, dtype=torch.long),
        "target_seq": torch.tensor(tseq, dtype=torch.long),
        "last_positions": torch.tensor(last, dtype=torch.long),
        "n_answer_tokens": torch.tensor(n_ans, dtype=torch.float32),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
        "margins": torch.tensor(margins, dtype=torch.float32),
        "pair_group": torch.tensor(pair_group, dtype=torch.long),
        "groups": groups,
        "segment_bounds": spans,
        "n_seqs": s,
        "n_tokens": len(ids),
    }
    if examples and examples[0].desirable is not None:
        batch["desirable"] = torch.tensor([bool(ex.desirable) for ex in examples])
    if examples and all(ex.ref_logps is not None for ex in examples):
        batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
    if examples and all(ex.kl_answer is not None for ex in examples):
        kl = collate_preferences([PreferenceExample([ex.kl_answer], [0.0]) for ex in examples], unit="answers")
        if all(ex.ref_kl_logp is not None for ex in examples):
            kl["ref_logps"] = torch.tensor([ex.ref_kl_logp for ex in examples], dtype=torch.float32)
        batch["kl"] = kl
        batch["n_tokens"] += kl["n_tokens"]
    batch["n_targets"] = {"pairs": len(pairs), "examples": len(examples), "answers": s}[unit]
    return batch


def _common_prefix(answers: list[Any]) -> int:
    """Length of the token prefix all answers share, leaving each at least one token of its own."""
    first = answers[0].input_ids
    n = min(len(a.input_ids) for a in answers) - 1
    for i in range(max(n, 0)):
        if any(a.input_ids[i] != first[i] for a in answers[1:]):
            return i
    return max(n, 0)
