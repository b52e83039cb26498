"""The results folder of every `chatsmith eval` command, and its self-contained HTML report.

    OUT/results.jsonl   one row per item (id, category, question, answer(s), score/outcome/correct)
    OUT/summary.json    the numbers, each with its interval
    OUT/report.html     tables, bar charts with intervals, win/tie/loss bars, answers side by side;
                        inline CSS and SVG only, so it opens without a network

`print_compare(A, B)` prints two results folders side by side in the terminal.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#555;font-size:.9em}.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}
.answer{white-space:pre-wrap;background:#fafafa;border:1px solid #eee;padding:.5em;font-size:.9em}
details{margin:.4em 0}summary{cursor:pointer}.win{color:#1a7f37}.loss{color:#c62828}.tie{color:#666}
.judgment{white-space:pre-wrap;color:#555;font-size:.85em}
"""
_COLOURS = {"win": "#2e7d32", "tie": "#9e9e9e", "loss": "#c62828"}


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{digits}f}"
    return str(v)


def estimate_table(groups: dict[str, dict[str, Any]], label: str) -> str:
    """An HTML table of {group: {value, low, high, n}} estimates."""
    rows = "".join(f"<tr><td>{_e(g)}</td><td class=num>{_fmt(v['value'])}</td>"
                   f"<td class=num>[{_fmt(v['low'])}, {_fmt(v['high'])}]</td><td class=num>{v['n']}</td></tr>"
                   for g, v in groups.items())
    return f"<table><tr><th>group</th><th>{_e(label)}</th><th>95% interval</th><th>n</th></tr>{rows}</table>"


def bar_chart(groups: dict[str, dict[str, Any]], lo: float, hi: float, title: str) -> str:
    """An inline SVG bar chart of estimates with their intervals as whiskers, on the axis [lo, hi]."""
    names = list(groups)
    width, row, left = 640, 26, 200
    height = row * len(names) + 30
    scale = (width - left - 20) / (hi - lo if hi > lo else 1)

    def x(v: float) -> float:
        v = min(max(v, lo), hi) if v == v else lo
        return left + (v - lo) * scale

    parts = [f'<svg role="img" aria-label="{_e(title)}" width="{width}" height="{height}" '
             f'xmlns="http://www.w3.org/2000/svg" font-size="12">']
    for i, name in enumerate(names):
        g = groups[name]
        y = 10 + i * row
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{_e(name[:30])}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{max(0.0, x(g["value"]) - left):.1f}" height="16" '
                     f'fill="#5c7cfa"><title>{_e(name)}: {_fmt(g["value"])} [{_fmt(g["low"])}, {_fmt(g["high"])}]'
                     f'</title></rect>')
        parts.append(f'<line x1="{x(g["low"]):.1f}" x2="{x(g["high"]):.1f}" y1="{y + 11}" y2="{y + 11}" '
                     'stroke="#222" stroke-width="1.5"/>')
        parts.append(f'<text x="{x(g["high"]) + 4:.1f}" y="{y + 15}" fill="#333">{_fmt(g["value"], 2)}</text>')
    axis_y = 10 + len(names) * row
    parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{axis_y}" y2="{axis_y}" stroke="#999"/>')
    parts.append(f'<text x="{left}" y="{axis_y + 14}">{_fmt(lo, 1)}</text>'
                 f'<text x="{width - 20}" y="{axis_y + 14}" text-anchor="end">{_fmt(hi, 1)}</text></svg>')
    return "".join(parts)


def wtl_chart(table: dict[str, dict[str, Any]], title: str) -> str:
    """Stacked win/tie/loss bars per group (shares of n), with the win rate and its interval."""
    width, row, left, bar = 760, 26, 200, 360
    names = list(table)
    parts = [f'<svg role="img" aria-label="{_e(title)}" width="{width}" height="{row * len(names) + 34}" '
             'xmlns="http://www.w3.org/2000/svg" font-size="12">']
    for i, name in enumerate(names):
        t = table[name]
        y, x0 = 10 + i * row, float(left)
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{_e(name[:30])}</text>')
        for k in ("win", "tie", "loss"):
            w = bar * t[k]
            if w > 0:
                parts.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{w:.1f}" height="16" fill="{_COLOURS[k]}">'
                             f'<title>{k}: {t[k + "s" if k != "loss" else "losses"]} of {t["n"]}</title></rect>')
            x0 += w
        wr = t["win_rate"]
        parts.append(f'<text x="{left + bar + 8}" y="{y + 15}">win rate {_fmt(wr["value"], 2)} '
                     f'[{_fmt(wr["low"], 2)}, {_fmt(wr["high"], 2)}] · {t["wins"]}/{t["ties"]}/{t["losses"]}</text>')
    y = 14 + len(names) * row
    parts.append("".join(f'<rect x="{left + j * 70}" y="{y}" width="10" height="10" fill="{_COLOURS[k]}"/>'
                         f'<text x="{left + j * 70 + 14}" y="{y + 9}">{k}</text>'
                         for j, k in enumerate(("win", "tie", "loss"))))
    parts.append("</svg>")
    return "".join(parts)


def _answers_section(results: Sequence[dict[str, Any]]) -> str:
    items = []
    for r in results:
        head = f"{_e(r.get('id', ''))} · {_e(r.get('category', ''))}"
        verdict = ""
        if "outcome" in r:
            verdict = f' <b class="{_e(r["outcome"])}">{_e(r["outcome"])}</b>'
        elif "score" in r:
            verdict = f" <b>{_e(_fmt(r['score'], 1) if r['score'] is not None else 'error')}</b>"
        elif "correct" in r:
            verdict = f' <b class="{"win" if r["correct"] else "loss"}">{"right" if r["correct"] else "wrong"}</b>'
        q = _e(r.get("question", ""))[:90]
        body = f"<p><b>Question.</b> {_e(r.get('question', ''))}</p>"
        if r.get("reference") or r.get("references"):
            ref = r.get("reference") or " | ".join(map(str, r.get("references", [])))
            body += f"<p><b>Reference.</b> {_e(ref)}</p>"
        if "baseline_answer" in r:
            body += (f'<div class="pair"><div><b>{_e(r["model"])}</b><div class="answer">{_e(r["answer"])}</div></div>'
                     f'<div><b>{_e(r["baseline"])}</b><div class="answer">{_e(r["baseline_answer"])}</div></div></div>')
        elif "answers" in r:
            cols = "".join(f'<div><b>{_e(m)}</b> ({_e(_fmt(a.get("score", ""), 3))})<div class="answer">'
                           f'{_e(a["answer"])}</div></div>' for m, a in r["answers"].items())
            body += f'<div class="pair">{cols}</div>'
        else:
            body += f'<div class="answer">{_e(r.get("answer", ""))}</div>'
        for j in r.get("judgments", []) or ([r["judgment"]] if r.get("judgment") else []):
            body += f'<details><summary>judgment</summary><div class="judgment">{_e(j)}</div></details>'
        for err in r.get("errors", []) or ([r["error"]] if r.get("error") else []):
            body += f'<p class="loss">{_e(err)}</p>'
        items.append(f"<details><summary>{head}{verdict} — {q}</summary>{body}</details>")
    return "<h2>Answers</h2>" + "".join(items)


def render_report(summary: dict[str, Any], results: Sequence[dict[str, Any]]) -> str:
    """The HTML report of one results folder."""
    kind = summary.get("kind", "eval")
    title = f"chatsmith eval {kind}: {summary.get('model') or ', '.join(summary.get('models', []))}"
    body = [f"<h1>{_e(title)}</h1>"]
    meta = {k: v for k, v in summary.items() if k not in ("single", "pairwise", "accuracy", "models_table", "table",
                                                          "scores", "outcomes")}
    body.append('<p class="meta">' + " · ".join(f"{_e(k)}: {_e(json.dumps(v) if isinstance(v, dict | list) else v)}"
                                                for k, v in meta.items()) + "</p>")
    for model, s in (summary.get("single") or {}).items():
        body.append(f"<h2>Scores of {_e(model)} (1-10)</h2>")
        body.append(bar_chart(s["score"], 1.0, 10.0, f"scores of {model}"))
        body.append(estimate_table(s["score"], "mean score"))
        body.append(f'<p class="meta">{s["judged"]} judged, {s["errors"]} errors (not counted)</p>')
    if summary.get("pairwise"):
        p = summary["pairwise"]
        body.append(f"<h2>{_e(summary.get('model'))} against {_e(summary.get('baseline'))}</h2>")
        body.append(wtl_chart(p["outcomes"], "win/tie/loss"))
        body.append('<p class="meta">ties include verdicts that changed when the order was swapped '
                    f'({p["inconsistent"]}); {p["errors"]} errors (not counted)</p>')
    if summary.get("accuracy"):
        body.append("<h2>Accuracy</h2>")
        body.append(bar_chart(summary["accuracy"], 0.0, 1.0, "accuracy"))
        body.append(estimate_table(summary["accuracy"], "accuracy"))
    if summary.get("outcomes"):
        body.append("<h2>Win/tie/loss</h2>")
        body.append(wtl_chart(summary["outcomes"], "win/tie/loss"))
    if summary.get("table"):
        body.append("<h2>Results</h2>" + _plain_table(summary["table"]))
    if results:
        body.append(_answers_section(results))
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def _plain_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = list(rows[0]) if rows else []
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td class=num>{_e(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_results(out: Path | str, summary: dict[str, Any], results: Sequence[dict[str, Any]]) -> Path:
    """Write results.jsonl, summary.json and report.html into `out`; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.jsonl").open("w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    report = out / "report.html"
    report.write_text(render_report(summary, results), encoding="utf-8")
    return report


def _read_results(folder: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from chatsmith.errors import ChatsmithError

    p = Path(folder)
    if not (p / "results.jsonl").is_file():
        raise ChatsmithError(f"{folder}: not a results folder of `chatsmith eval` (no results.jsonl in it)")
    summary = json.loads((p / "summary.json").read_text()) if (p / "summary.json").is_file() else {}
    rows = [json.loads(line) for line in (p / "results.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return summary, rows


def _verdict(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if "score" in r:
        return "error" if r["score"] is None else _fmt(float(r["score"]), 1)
    if "correct" in r:
        return "right" if r["correct"] else "wrong"
    if "outcome" in r:
        return str(r["outcome"])
    return ""


def print_compare(a: str, b: str, width: int = 50) -> list[dict[str, Any]]:
    """Print two results folders side by side (joined by item id) and return the joined rows."""
    from rich.console import Console
    from rich.table import Table

    sa, ra = _read_results(a)
    sb, rb = _read_results(b)

    def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {f"{r.get('id')}|{r.get('model', '')}": r for r in rows} if len({r.get("id") for r in rows}) < len(rows) \
            else {str(r.get("id")): r for r in rows}

    da, db = by_id(ra), by_id(rb)
    keys = list(da) + [k for k in db if k not in da]
    table = Table(title=f"{a}  vs  {b}", show_lines=True)
    for col in ("id", "question", f"A: {sa.get('model', a)}", "A", f"B: {sb.get('model', b)}", "B"):
        table.add_column(col, overflow="fold")
    joined = []
    for k in keys:
        x, y = da.get(k), db.get(k)
        q = (x or y or {}).get("question", "")
        table.add_row(k, q[:width], (x or {}).get("answer", "-")[:width * 2], _verdict(x),
                      (y or {}).get("answer", "-")[:width * 2], _verdict(y))
        joined.append({"id": k, "a": x, "b": y})
    Console().print(table)
    return joined
