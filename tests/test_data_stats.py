"""`chatsmith data stats`: counts, lengths and how many examples max_length would cut."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import shared_file

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
    path = shared_file("sharegpt_20.json")
    stats = data_stats(str(path))
    # Expected values straight from the file's own fields, not through chatsmith's reader:
    # [{id, conversations: [{from: human/gpt, value}]}]
    records = json.loads(path.read_text())
    turns = [m for r in records for m in r["conversations"]]
    role = {"human": "user", "gpt": "assistant"}
    roles = Counter(role[m["from"]] for m in turns)
    chars = sorted(sum(len(m["value"]) for m in r["conversations"]) for r in records)
    assert {k: stats[k] for k in ("format", "records", "messages", "turns", "roles", "length_unit")} == {
        "format": "sharegpt", "records": len(records), "messages": len(turns), "turns": roles["assistant"],
        "roles": dict(roles), "length_unit": "chars"}
    assert (len(records), len(turns), roles["user"], roles["assistant"]) == (20, 78, 39, 39)
    # nearest rank of 20 values: p50 is the 10th, p90 the 18th, p99 the 20th
    assert stats["lengths"] == {"min": chars[0], "mean": round(sum(chars) / 20, 1), "p50": chars[9],
                                "p90": chars[17], "p99": chars[19], "max": chars[19]}
    assert stats["over_max_length"] is None


def test_stats_count_skipped_and_text(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "abc"}\n{"text": ""}\n{"text": "defgh"}\n')
    stats = data_stats(str(p), skip_bad=True)
    assert (stats["records"], stats["skipped"], stats["text_records"], stats["roles"]) == (2, 1, 2, {"text": 2})
    assert "line 2" in stats["skipped_errors"][0]
    assert stats["lengths"]["max"] == 5


def hh_messages(transcript: str) -> list[dict[str, str]]:
    """An hh-rlhf transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as OpenAI messages, split here."""
    parts = re.split(r"\n\n(Human|Assistant):", transcript)
    assert parts[0] == ""
    return [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
            for who, text in zip(parts[1::2], parts[2::2], strict=True)]


def test_token_stats_match_the_renderer(tokenizer: Any) -> None:
    path = shared_file("hh_rlhf_transcripts_10.jsonl")
    # Expected values from the raw file and the tokenizer's own chat template, not chatsmith's
    # reader or renderer: the chosen transcript is the conversation.
    convs = [hh_messages(json.loads(line)["chosen"]) for line in path.read_text().splitlines() if line.strip()]
    ids = [list(tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in convs]
    lengths = sorted(len(x) for x in ids)
    # Trained: each assistant turn's content and the end-of-turn token that closes it.
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(x.count(eot) == len(m) + 1 for x, m in zip(ids, convs, strict=True))   # + the default system turn
    trained = sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) + 1
                  for c in convs for m in c if m["role"] == "assistant")
    cut = lengths[4]
    stats = data_stats(str(path), tokenizer=tokenizer, max_length=cut)
    assert stats["length_unit"] == "tokens" and stats["records"] == len(convs) == 10
    assert stats["messages"] == sum(len(c) for c in convs)
    assert stats["turns"] == stats["roles"]["assistant"] == sum(m["role"] == "assistant" for c in convs for m in c)
    # nearest rank of 10 values: p50 is the 5th, p90 the 9th
    assert stats["lengths"] == {"min": lengths[0], "mean": round(sum(lengths) / 10, 1), "p50": lengths[4],
                                "p90": lengths[8], "p99": lengths[9], "max": lengths[9]}
    assert stats["over_max_length"] == sum(n > cut for n in lengths) == 5
    assert stats["tokens"] == sum(lengths)
    assert stats["trained_tokens"] == trained
    assert 0 < stats["trained_tokens"] < stats["tokens"]


def test_print_stats(tokenizer: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # so a long checkout path is not wrapped
    print_stats(data_stats(str(shared_file("kto_messages_20.json")), tokenizer=tokenizer, max_length=64))
    out = capsys.readouterr().out
    assert "kto_messages_20.json (messages)" in out
    assert "records" in out and "assistant turns" in out and "longer than 64" in out and "% trained" in out
