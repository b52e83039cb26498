"""`chatsmith data stats`: counts, lengths and how many examples max_length would cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import shared_file

from chatsmith.data.formats import read_conversations
from chatsmith.data.stats import data_stats, length_summary, percentile, print_stats


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from chatsmith.models import load_tokenizer

    return load_tokenizer("tiny-random-llama")


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 11))  # 1..10
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [5, 9, 10, 10]
    assert percentile([], 50) == 0
    assert length_summary([4, 1, 3, 2]) == {"min": 1, "mean": 2.5, "p50": 2, "p90": 4, "p99": 4, "max": 4}


def test_character_stats_without_tokenizer() -> None:
    stats = data_stats(str(shared_file("sharegpt_20.json")))
    convs = read_conversations(str(shared_file("sharegpt_20.json"))).conversations
    chars = sorted(sum(len(m.content) for m in c.messages) for c in convs)
    assert {k: stats[k] for k in ("format", "records", "messages", "turns", "roles", "length_unit")} == {
        "format": "sharegpt", "records": 20, "messages": 78, "turns": 39,
        "roles": {"user": 39, "assistant": 39}, "length_unit": "chars"}
    assert stats["lengths"]["max"] == chars[-1] and stats["lengths"]["p50"] == chars[9]
    assert stats["over_max_length"] is None


def test_stats_count_skipped_and_text(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "abc"}\n{"text": ""}\n{"text": "defgh"}\n')
    stats = data_stats(str(p), skip_bad=True)
    assert (stats["records"], stats["skipped"], stats["text_records"], stats["roles"]) == (2, 1, 2, {"text": 2})
    assert "line 2" in stats["skipped_errors"][0]
    assert stats["lengths"]["max"] == 5


def test_token_stats_match_the_renderer(tokenizer: Any) -> None:
    from chatsmith.data.template import render_conversation

    path = str(shared_file("hh_rlhf_transcripts_10.jsonl"))
    rendered = [render_conversation(tokenizer, c) for c in read_conversations(path).conversations]
    lengths = sorted(len(r.input_ids) for r in rendered)
    cut = lengths[4]
    stats = data_stats(path, tokenizer=tokenizer, max_length=cut)
    assert stats["length_unit"] == "tokens"
    assert stats["lengths"]["max"] == lengths[-1] and stats["lengths"]["p50"] == lengths[4]
    assert stats["over_max_length"] == sum(n > cut for n in lengths) == 5
    assert stats["tokens"] == sum(lengths)
    assert stats["trained_tokens"] == sum(sum(r.loss_mask) for r in rendered)
    assert 0 < stats["trained_tokens"] < stats["tokens"]


def test_print_stats(tokenizer: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # so a long checkout path is not wrapped
    print_stats(data_stats(str(shared_file("kto_messages_20.json")), tokenizer=tokenizer, max_length=64))
    out = capsys.readouterr().out
    assert "kto_messages_20.json (messages)" in out
    assert "records" in out and "assistant turns" in out and "longer than 64" in out and "% trained" in out
