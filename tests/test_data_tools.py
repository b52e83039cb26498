"""The streaming dataset tools (`chatsmith data mix|dedupe|split|filter|sample|translate|clean`):
counts and contents against what they must be, MinHash against hand-computed Jaccard values, the
token-length filter against lengths rendered independently, translation and the quality filter
through the fake teacher over HTTP."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file
from fake_teacher import FakeTeacher, _digest

from chatsmith.cli import main
from chatsmith.data.ops import stream
from chatsmith.data.ops.clean import clean, html_to_markdown
from chatsmith.data.ops.dedupe import SeenKeys, dedupe
from chatsmith.data.ops.language import detect_language
from chatsmith.data.ops.minhash import (
    MinHasher,
    candidate_probability,
    estimated_jaccard,
    jaccard,
    optimal_bands,
    shingles,
)
from chatsmith.data.ops.select import filter_records, language_predicate, mix, regex_predicate, sample, split
from chatsmith.errors import DataError


def _write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _read(path: str | Path) -> list:
    return [r for _, r in stream.iter_records(str(path))]


# ---- streaming reading and writing -----------------------------------------------------------------


def test_json_list_streams_in_small_chunks(monkeypatch, tmp_path):
    monkeypatch.setattr(stream, "_CHUNK", 7)    # every record straddles chunk boundaries
    data = json.loads(shared_file("alpaca_50.json").read_text())
    assert _read(shared_file("alpaca_50.json")) == data
    (tmp_path / "nums.json").write_text("[1, 22, 333,\n 4444 , {\"a\": [1, 2]}, \"x,]\"]")
    assert _read(tmp_path / "nums.json") == [1, 22, 333, 4444, {"a": [1, 2]}, "x,]"]
    (tmp_path / "bad.json").write_text('[{"a": 1}, {"a": ]')
    with pytest.raises(DataError, match="record 1"):
        _read(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n\n{"a": \n')
    where = [w for w, r in stream.iter_records(str(tmp_path / "bad.jsonl")) if isinstance(r, DataError)]
    assert where == ["line 3"]
    # Writing a .json list streams too and reads back as a list.
    with stream.RecordWriter(str(tmp_path / "out.json")) as w:
        for r in data[:3]:
            w.write(r)
    assert json.loads((tmp_path / "out.json").read_text()) == data[:3]


def test_text_fields_of_every_format():
    alpaca = {"instruction": "I", "input": "X", "output": "O", "provenance": {"teacher": "t"}}
    assert [t for _, t in stream.text_fields(alpaca)] == ["I", "X", "O"]
    share = {"id": "1", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert stream.text_fields(share) == [(("conversations", 0, "value"), "Q"), (("conversations", 1, "value"), "A")]
    msgs = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert [t for _, t in stream.text_fields(msgs)] == ["hi"]
    assert stream.set_field(share, ("conversations", 1, "value"), "B")["conversations"][1]["value"] == "B"


# ---- mix, sample, split ------------------------------------------------------------------------------


def test_mix_by_ratio_and_count_upsamples_and_shuffles(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(100)])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(50)])
    out = tmp_path / "mix.jsonl"
    r = mix([(a, 0.7), (b, 0.3)], str(out), total=200, seed=1, bucket_bytes=600)    # several buckets on disk
    got = [x["text"] for x in _read(out)]
    assert r["written"] == len(got) == 200
    from_a, from_b = Counter(t for t in got if t[0] == "a"), Counter(t for t in got if t[0] == "b")
    assert sum(from_a.values()) == 140 and sum(from_b.values()) == 60
    # a: 140 of 100 -> every record once, 40 twice; b: 60 of 50 -> every record once, 10 twice.
    assert sorted(Counter(from_a.values()).items()) == [(1, 60), (2, 40)]
    assert sorted(Counter(from_b.values()).items()) == [(1, 40), (2, 10)]
    assert got != sorted(got, key=lambda t: (t[0], int(t[1:])))          # shuffled
    again = tmp_path / "again.jsonl"
    mix([(a, 0.7), (b, 0.3)], str(again), total=200, seed=1, bucket_bytes=600)
    assert [x["text"] for x in _read(again)] == got                       # seeded
    r = mix([(a, 5), (b, 3)], str(out), counts=True, seed=2, shuffle=False, tag_source=True)
    got = _read(out)
    assert [x["source"] for x in got] == [a] * 5 + [b] * 3
    assert len({x["text"] for x in got}) == 8                              # without replacement
    # The same ratio rule as training's --data mixing: no numbers means all of every source.
    assert main(["data", "mix", a, b, "--output", str(out), "--no-shuffle"]) == 0
    assert len(_read(out)) == 150


def test_sample_and_split_exact_sizes(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"r{i}"} for i in range(1000)])
    assert sample(src, str(tmp_path / "s.jsonl"), n=0.1, seed=3)["written"] == 100
    s = [int(x["text"][1:]) for x in _read(tmp_path / "s.jsonl")]
    assert len(set(s)) == 100 and s == sorted(s)                           # distinct, in file order
    r = split(src, str(tmp_path / "splits"), test=0.05, valid=20, seed=3)
    assert {k: v["records"] for k, v in r.items()} == {"train": 930, "valid": 20, "test": 50}
    parts = {k: [x["text"] for x in _read(v["path"])] for k, v in r.items()}
    assert sorted(sum(parts.values(), [])) == sorted(f"r{i}" for i in range(1000))
    split(src, str(tmp_path / "again"), test=0.05, valid=20, seed=3)
    assert [x["text"] for x in _read(tmp_path / "again" / "test.jsonl")] == parts["test"]
    # An unreadable line stops the run, naming it; with skip_bad the choices by index still land
    # on the readable records (no record lost or doubled).
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"r{i}"}) + "\n" if i != 4 else "{oops\n" for i in range(10)))
    with pytest.raises(DataError, match="line 5"):
        split(str(bad), str(tmp_path / "b"), test=3)
    r = split(str(bad), str(tmp_path / "b"), test=3, skip_bad=True)
    texts = [x["text"] for k in r for x in _read(r[k]["path"])]
    assert sorted(texts) == sorted(f"r{i}" for i in range(10) if i != 4)


# ---- dedupe and MinHash ------------------------------------------------------------------------------


def test_minhash_against_hand_computed_jaccard():
    # Word 3-grams: {a b c, b c d, c d e} and {a b c, b c d, c d f}: 2 shared of 4 -> J = 0.5.
    assert len(shingles("a b c d e")) == 3
    assert jaccard("a b c d e", "A b, c d f") == 0.5
    # {a b c, b c d} vs {a b c, b c d, c d e}: 2 of 3.
    assert jaccard("a b c d", "a b c d e") == pytest.approx(2 / 3)
    mh = MinHasher(num_perm=512, seed=7)
    for x, y, j in (("a b c d e", "a b c d f", 0.5), ("a b c d", "a b c d e", 2 / 3), ("one two", "three four", 0.0)):
        # The estimate's standard error is sqrt(J(1-J)/512) <= 0.023: 4 standard errors.
        assert estimated_jaccard(mh.signature(x), mh.signature(y)) == pytest.approx(j, abs=0.09)
    assert np.array_equal(MinHasher(64, seed=1).signature("same text"), MinHasher(64, seed=1).signature("same text"))
    # The LSH curve: 1 - (1 - j^r)^b, by hand for b=2, r=2 at j=0.5: 1 - (0.75)^2.
    assert candidate_probability(0.5, 2, 2) == pytest.approx(1 - 0.75**2)
    bands, rows = optimal_bands(0.8, 128)
    assert bands * rows <= 128
    assert candidate_probability(0.95, bands, rows) > 0.95 and candidate_probability(0.5, bands, rows) < 0.05


def test_seen_keys_merges():
    seen = SeenKeys(merge_every=10)
    for k in range(0, 200, 2):
        seen.add(k)
    assert len(seen) == 100 and all(k in seen for k in range(0, 200, 2)) and not any(k in seen for k in range(1, 200, 2))


def test_dedupe_exact_and_near(tmp_path):
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(3000)]
    base = [" ".join(rng.choice(vocab, 200)) for _ in range(40)]
    records = [{"instruction": t, "output": "ok"} for t in base]
    records += [{"instruction": base[i].upper().replace(" ", "  "), "output": "ok"} for i in range(5)]  # exact
    near = []
    for i in range(5, 15):                     # one word changed of 200: J = 198/204, caught with P > 0.9999
        words = base[i].split()
        words[100] = "changed"
        near.append({"instruction": " ".join(words), "output": "ok"})
    records += near
    src = _write_jsonl(tmp_path / "d.jsonl", records)
    r = dedupe(src, str(tmp_path / "exact.jsonl"))
    assert (r["read"], r["written"], r["exact_duplicates"], r["near_duplicates"]) == (55, 50, 5, 0)
    r = dedupe(src, str(tmp_path / "near.jsonl"), near=True, threshold=0.8, removed_path=str(tmp_path / "rm.jsonl"))
    assert (r["written"], r["exact_duplicates"], r["near_duplicates"]) == (40, 5, 10)
    assert [x["instruction"] for x in _read(tmp_path / "near.jsonl")] == base        # the first occurrences
    assert _read(tmp_path / "rm.jsonl")[5:] == near


# ---- filter ------------------------------------------------------------------------------------------


def test_language_guesser():
    cases = {"en": "What is the capital of France and how big is it?",
             "fr": "Quelle est la capitale de la France et pour qui est-elle si belle ?",
             "de": "Was ist die Hauptstadt von Deutschland und wie groß ist sie auch?",
             "es": "¿Cuál es la capital de España y por qué es tan grande para los turistas?",
             "ru": "Какая столица России и почему она такая большая?",
             "uk": "Яка столиця України і чому вона така гарна?",
             "zh": "法国的首都是哪里？", "ja": "日本の首都はどこですか？", "ko": "한국의 수도는 어디입니까?"}
    for lang, text in cases.items():
        assert detect_language(text) == lang, text
    assert detect_language("12345 !!!") == "unknown"


def test_filter_regex_language_and_token_length(tmp_path, tokenizer):
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.ops.select import token_length_predicate
    from chatsmith.data.template import render_conversation

    records = [{"instruction": "Translate the word 'cat' into French.", "output": "Chat."},
               {"instruction": "Qui est le président de la France ?", "output": "C'est une question pour vous."},
               {"instruction": "Write a long essay about the sea. " * 20, "output": "The sea is big. " * 40},
               {"instruction": "As an AI language model, refuse.", "output": "As an AI language model I cannot."}]
    src = _write_jsonl(tmp_path / "d.jsonl", records)
    lengths = [len(render_conversation(tokenizer, Conversation([Message("user", r["instruction"]),
                                                                Message("assistant", r["output"])])).input_ids)
               for r in records]
    limit = sorted(lengths)[2]      # keeps the two shortest... and the third, at the limit
    out = tmp_path / "f.jsonl"
    r = filter_records(src, str(out), [
        ("tokens", token_length_predicate(tokenizer, min_tokens=None, max_tokens=limit)),
        ("lang", language_predicate(["en"])),
        ("regex", regex_predicate(r"(?i)as an ai language model", keep_matching=False)),
    ], rejected_path=str(tmp_path / "rej.jsonl"))
    kept = [i for i, n in enumerate(lengths) if n <= limit]
    expected = [records[i] for i in kept if i not in (1, 3)]
    assert _read(out) == expected
    assert r["dropped"] == {f"tokens: longer than {limit} tokens": 4 - len(kept),
                            **({"lang: language fr": 1} if 1 in kept else {}),
                            **({"regex: matches": 1} if 3 in kept else {})}
    assert len(_read(tmp_path / "rej.jsonl")) == 4 - len(expected)


# ---- clean -------------------------------------------------------------------------------------------


def test_clean_sharegpt_fastchat_style(tmp_path, tokenizer):
    assert html_to_markdown("<p>Use <code>ls</code>:</p><ul><li>one</li><li>two</li></ul>") == \
        "Use `ls`:\n\n* one\n* two"
    assert html_to_markdown("plain 2 < 3 text") == "plain 2 < 3 text"
    recs = [
        {"id": "html", "conversations": [{"from": "human", "value": "How?"},
                                          {"from": "gpt", "value": "<div><p>Like <b>this</b>.</p></div>"}]},
        {"id": "lead", "conversations": [{"from": "gpt", "value": "Hi!"}, {"from": "human", "value": "Q"},
                                          {"from": "gpt", "value": "  "}, {"from": "gpt", "value": "A"},
                                          {"from": "human", "value": "unanswered"}]},
        {"id": "broken", "conversations": [{"from": "human", "value": "Q1"}, {"from": "human", "value": "Q2"},
                                            {"from": "gpt", "value": "A"}]},
        {"id": "empty", "conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": ""}]},
        {"id": "blocked", "conversations": [{"from": "human", "value": "Who made you?"},
                                             {"from": "gpt", "value": "I was trained by OpenAI."}]},
        {"id": "msgs", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A"}]},
        {"id": "long", "conversations": [t for i in range(6) for t in (
            {"from": "human", "value": f"Question {i}: " + "tell me more " * 20},
            {"from": "gpt", "value": f"Answer {i}: " + "here is more " * 20})]},
    ]
    src = _write_jsonl(tmp_path / "s.jsonl", recs)
    out = tmp_path / "c.jsonl"
    r = clean(src, str(out), tokenizer=tokenizer, max_length=200, blocked_words=["openai"])
    got = {x["id"]: x for x in _read(out)}
    assert got["html"]["conversations"][1]["value"] == "Like **this**."
    assert got["lead"]["conversations"] == [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    assert got["msgs"] == {"id": "msgs", "system": "Be brief.",
                           "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert r["dropped"] == {"roles do not alternate": 1, "no complete exchange": 1, "blocked word": 1}
    pieces = [x for k, x in got.items() if str(k).startswith("long_")]
    assert len(pieces) >= 2 and r["split"] == 1
    assert [t for p in pieces for t in p["conversations"]] == [
        {**t, "value": t["value"].strip()} for t in recs[-1]["conversations"]]
    from chatsmith.data.formats import read_conversations
    from chatsmith.data.template import render_conversation

    for conv in read_conversations(str(out)).conversations:
        if str(conv.meta.get("id", "")).startswith("long_"):
            assert len(render_conversation(tokenizer, conv).input_ids) <= 200 + 2   # + BOS/EOS slack


# ---- teacher tools: translate and the quality filter ------------------------------------------------


def test_translate_keeps_format_and_code_and_resumes(tmp_path):
    records = [{"instruction": "Write code.", "input": "", "output": "Here:\n```python\nprint('hi')\n```\ndone"},
               {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"}]}]
    src = _write_jsonl(tmp_path / "d.jsonl", records)
    teacher = FakeTeacher(rate_limit_first=1)
    args = ["data", "translate", src, "--to", "Upper Case", "--output", str(tmp_path / "t.jsonl"),
            "--teacher-model", "fake", "--concurrency", "2"]
    with teacher as url:
        assert main([*args, "--teacher-url", url]) == 0
        paid = sum(teacher.answered.values())
        assert main([*args, "--teacher-url", url]) == 0      # a rerun replays the journal: nothing paid
        assert sum(teacher.answered.values()) == paid == 4     # four texts; the empty input is not sent
    got = _read(tmp_path / "t.jsonl")
    assert got[0] == {"instruction": "WRITE CODE.", "input": "", "output": "HERE:\n```python\nprint('hi')\n```\nDONE"}
    assert got[1]["conversations"] == [{"from": "human", "value": "HELLO"}, {"from": "gpt", "value": "HI THERE"}]


def test_quality_filter_through_the_teacher(tmp_path):
    from chatsmith.data.ops.stream import record_text
    from chatsmith.datagen.teacher_ops import QUALITY_PROMPT

    records = [{"instruction": f"Task number {i}", "output": f"Answer {i}"} for i in range(12)]
    src = _write_jsonl(tmp_path / "d.jsonl", records)
    with FakeTeacher(rate_limit_first=0) as url:
        assert main(["data", "filter", src, "--quality-threshold", "6", "--output", str(tmp_path / "q.jsonl"),
                     "--teacher-url", url, "--teacher-model", "fake"]) == 0
    # The fake scores 1 + digest(prompt) % 10: recompute which records reach 6.
    scores = [1 + _digest(QUALITY_PROMPT.format(example=record_text(r))) % 10 for r in records]
    assert _read(tmp_path / "q.jsonl") == [r for r, s in zip(records, scores) if s >= 6]
