"""Preference readers: the shared real files, every pair/ranking/feedback shape, and errors that
name the file, the record and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatsmith.data.builtin import preference_demo_prompts, preference_demo_records
from chatsmith.data.preference import (
    encode_rankings,
    rankings_to_feedback,
    read_feedback,
    read_preferences,
)
from chatsmith.errors import ChatsmithError, DataError


def write(tmp_path: Path, records: list, name: str = "d.jsonl") -> str:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(p)


def test_sharegpt_preference_file(shared_data):
    recs = read_preferences(str(shared_data / "sharegpt_preference_20.json")).records
    assert len(recs) == 20
    r = recs[0]
    assert [m.role for m in r.prompt] == ["user"] and r.prompt[0].content.startswith("Hi! I'd like to create")
    assert r.responses[0][0].content.startswith("That sounds like a fun") and r.scores == [1.0, 0.0]
    assert r.responses[1][0].role == "assistant" and r.pairs() == [(0, 1)]


def test_hh_transcripts_split_at_the_shared_prefix(shared_data):
    recs = read_preferences(str(shared_data / "hh_rlhf_transcripts_10.jsonl")).records
    assert len(recs) == 10
    r = recs[0]
    assert [m.role for m in r.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert r.prompt[-1].content == "okay some of these do not have anything to do with pens"
    chosen, rejected = r.responses
    assert chosen[0].content.startswith("No, sorry!") and rejected[0].content.startswith("There are lots of funny")
    # earlier assistant turns are context only: the conversation trains on the answer alone
    conv = r.conversation(0)
    assert [m.trains() for m in conv.messages] == [False] * 5 + [True]


def test_hh_empty_chosen_answer_is_a_real_preference(shared_data, tokenizer, tmp_path):
    """hh-rlhf's labellers sometimes preferred no answer ("Assistant: " ends the chosen transcript):
    the 1,600-pair file loads whole, and such an answer trains the end-of-turn token alone."""
    recs = read_preferences(str(shared_data / "hh_rlhf_harmless_train_1600.jsonl")).records
    assert len(recs) == 1600
    empty = [r for r in recs if not r.responses[0][-1].content]
    assert [r.source.rsplit(", ", 1)[1] for r in empty] == ["line 77", "line 507", "line 916", "line 1094"]
    ex = encode_rankings(tokenizer, empty[:1], None, 512)[0][0]
    trained = [t for t, m in zip(ex.answers[0].input_ids, ex.answers[0].loss_mask) if m]
    assert tokenizer.convert_ids_to_tokens(trained) == ["<|im_end|>"]
    # Elsewhere an empty answer is still a located error.
    bad = write(tmp_path, [{"prompt": "Hi?", "chosen": " ", "rejected": "Go away."}])
    with pytest.raises(DataError, match=r"line 1, field 'chosen': answer is empty"):
        read_preferences(bad)


def test_kto_feedback_file_and_unpaired_pairs(shared_data):
    fb = read_feedback(str(shared_data / "kto_messages_20.json")).records
    assert len(fb) == 20 and sum(f.desirable for f in fb) == 12
    assert fb[0].response[0].role == "assistant" and fb[0].prompt[-1].role == "user"
    unpaired = read_feedback(str(shared_data / "hh_rlhf_transcripts_10.jsonl")).records
    assert len(unpaired) == 20 and [f.desirable for f in unpaired[:2]] == [True, False]
    assert len(rankings_to_feedback(read_preferences(str(shared_data / "sharegpt_preference_20.json")).records)) == 40


def test_pair_shapes(tmp_path):
    path = write(tmp_path, [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": {"role": "assistant", "content": "No."}},
        {"messages": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5", "margin": 2},
        {"instruction": "Add", "input": "2 and 2", "chosen": "4", "rejected": "22"},
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye"}]},
    ])
    recs = read_preferences(path).records
    assert [len(r.prompt) for r in recs] == [1, 2, 1, 1, 1]
    assert recs[1].responses[1][0].content == "No." and recs[1].prompt[0].role == "system"
    assert recs[2].margin == 2.0 and recs[3].prompt[0].content == "Add\n\n2 and 2"
    assert recs[4].prompt[0].content == "Hi" and recs[4].responses[1][0].content == "Bye"


def test_rankings_letters_indices_and_scores(tmp_path):
    answers = ["alpha", "bravo", "charlie", "delta"]
    path = write(tmp_path, [
        {"prompt": "q", "responses": answers, "ranking": "B>A>D>C"},
        {"prompt": "q", "responses": answers, "ranking": [1, 0, 3, 2]},
        {"prompt": "q", "responses": answers, "scores": [0.5, 0.9, 0.1, 0.5]},
    ])
    a, b, c = read_preferences(path).records
    assert [x[0].content for x in a.responses] == ["bravo", "alpha", "delta", "charlie"]
    assert a.responses == b.responses and a.scores == [3.0, 2.0, 1.0, 0.0]
    assert len(a.pairs()) == 6          # C(4, 2)
    assert c.responses[0][0].content == "bravo" and c.responses[-1][0].content == "charlie"
    assert len(c.pairs()) == 5          # the tie (alpha, delta at 0.5) forms no pair


@pytest.mark.parametrize("record, field, words", [
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "rejected", "same answer"),
    ({"prompt": "q", "chosen": "  ", "rejected": "x"}, "chosen", "empty"),
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing 'rejected'"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": "A>B"}, "ranking", "exactly once"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": "A>B>D"}, "ranking", "names no response"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1]}, "scores", "one per response"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1, 1]}, "scores", "all scores are equal"),
    ({"prompt": "q", "responses": ["a", "a"], "ranking": [0, 1]}, "responses[1]", "same answer"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "rejected", "same answer"),
])
def test_bad_records_name_file_record_and_field(tmp_path, record, field, words):
    path = write(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError) as e:
        read_preferences(path)
    assert e.value.path == path and e.value.record == "line 2" and e.value.field == field
    assert words in str(e.value)


def test_bad_feedback_and_skip_bad(tmp_path):
    path = write(tmp_path, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                             "label": "maybe"}])
    with pytest.raises(DataError, match="field 'label'.*true or false"):
        read_feedback(path)
    path = write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "a"},
                            {"prompt": "q", "chosen": "a", "rejected": "b"}], "mixed.jsonl")
    res = read_preferences(path, skip_bad=True)
    assert len(res.records) == 1 and len(res.skipped) == 1 and res.skipped[0].record == "line 1"
    with pytest.raises(ChatsmithError, match="unknown built-in"):
        read_preferences("builtin:nope")


def test_builtin_demo_set_is_valid_and_held_out(tokenizer):
    recs = read_preferences("builtin:identity-preferences").records
    raw = preference_demo_records()
    assert len(recs) == len(raw) == 240 and raw == preference_demo_records()   # deterministic
    identity = [r for r in raw if "Smithy" in r["chosen"]]
    assert 0.6 < len(identity) / len(raw) < 0.8 and not any("Smithy" in r["rejected"] for r in raw)
    prompts = {r["prompt"].lower().strip("?!. ") for r in raw}
    assert not any(q.lower().strip("?!. ") in prompts for q in preference_demo_prompts())
    examples, truncated = encode_rankings(tokenizer, recs[:8], None, 256)
    assert truncated == 0 and all(len(e.answers) == 2 for e in examples)
    for ex in examples:   # only the answer is trained, and the two sides share the prompt tokens
        a, b = ex.answers
        first = a.loss_mask.index(1)
        assert a.input_ids[:first] == b.input_ids[:first] and sum(a.loss_mask) > 0
