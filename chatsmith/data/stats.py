"""`chatsmith data stats`: what is in a data file, and how long its examples are once rendered.

Lengths are tokens of the rendered chat template (the same renderer training uses) when a
tokenizer is given, else characters of the message contents.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from chatsmith.data.conversation import Conversation
from chatsmith.data.formats import read_conversations

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of an ascending list (an actual value from the list, never interpolated)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def length_summary(lengths: list[int]) -> dict[str, float | int]:
    """min, mean, p50/p90/p99 and max of a list of lengths."""
    values = sorted(lengths)
    out: dict[str, float | int] = {
        "min": values[0] if values else 0,
        "mean": round(sum(values) / len(values), 1) if values else 0.0,
    }
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(values, p)
    out["max"] = values[-1] if values else 0
    return out


def data_stats(path: str, tokenizer: Any = None, max_length: int = 1024, format: str | None = None,
               columns: dict[str, str] | None = None, skip_bad: bool = False,
               template: str | None = None) -> dict[str, Any]:
    """Machine-readable statistics of one data file.

    Keys: path, format, records, skipped, skipped_errors (first 5 messages), text_records, messages,
    turns (assistant turns), roles ({role: count}), length_unit ("tokens" or "chars"), lengths
    (min/mean/p50/p90/p99/max), max_length, over_max_length (examples longer than max_length; None
    when counting characters), and with a tokenizer: tokens, trained_tokens (loss-mask total) and template.
    `tokenizer` is a tokenizer object or a model argument for `chatsmith.models.load_tokenizer`.
    """
    result = read_conversations(path, format=format, columns=columns, skip_bad=skip_bad)
    convs = result.conversations
    roles: Counter[str] = Counter(m.role for c in convs for m in c.messages)
    stats: dict[str, Any] = {
        "path": str(path),
        "format": result.format,
        "records": len(convs),
        "skipped": len(result.skipped),
        "skipped_errors": [str(e) for e in result.skipped[:5]],
        "text_records": sum(c.is_text for c in convs),
        "messages": sum(len(c.messages) for c in convs),
        "turns": sum(c.turns() for c in convs),
        "roles": dict(roles.most_common()),
        "max_length": max_length,
    }
    if tokenizer is None:
        lengths = [_chars(c) for c in convs]
        # Characters are not comparable with a token budget, so nothing is counted as too long.
        stats.update(length_unit="chars", lengths=length_summary(lengths), over_max_length=None)
        return stats

    if isinstance(tokenizer, str):
        from chatsmith.models import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    from chatsmith.data.template import render_conversation

    lengths, trained = [], 0
    for c in convs:
        # Render untruncated: the point is to see how much max_length would cut.
        rendered = render_conversation(tokenizer, c, template=template, max_length=None)
        lengths.append(len(rendered.input_ids))
        trained += sum(rendered.loss_mask)
    stats.update(
        length_unit="tokens",
        lengths=length_summary(lengths),
        over_max_length=sum(n > max_length for n in lengths),
        tokens=sum(lengths),
        trained_tokens=trained,
        template=template or "model",
    )
    return stats


def _chars(conv: Conversation) -> int:
    return sum(len(m.content) for m in conv.messages)


def print_stats(stats: dict[str, Any]) -> None:
    """Print `data_stats` output as a rich table."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    unit = stats.get("length_unit", "tokens")
    table = Table(title=escape(f"{stats['path']} ({stats['format']})"), show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("records", f"{stats['records']:,}")
    if stats.get("skipped"):
        table.add_row("skipped (malformed)", f"{stats['skipped']:,}")
    if stats.get("text_records"):
        table.add_row("plain-text documents", f"{stats['text_records']:,}")
    table.add_row("messages", f"{stats['messages']:,}")
    table.add_row("assistant turns", f"{stats['turns']:,}")
    table.add_row("roles", ", ".join(f"{r} {n:,}" for r, n in stats["roles"].items()))
    lengths = stats["lengths"]
    table.add_row(f"length ({unit})", "  ".join(f"{k} {v:,}" for k, v in lengths.items()))
    if stats.get("over_max_length") is not None:
        n, total = stats["over_max_length"], max(stats["records"], 1)
        table.add_row(f"longer than {stats['max_length']:,}",
                      f"{n:,} ({100 * n / total:.1f}%, truncated in training)")
    if "trained_tokens" in stats:
        share = 100 * stats["trained_tokens"] / max(stats["tokens"], 1)
        table.add_row("tokens (trained)",
                      f"{stats['tokens']:,} ({stats['trained_tokens']:,} = {share:.1f}% trained)")
    console = Console()
    console.print(table)
    for err in stats.get("skipped_errors", []):
        console.print(f"[yellow]skipped:[/yellow] {escape(err)}", highlight=False)
