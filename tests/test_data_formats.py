"""Readers and writers: every shared real-world file loads unchanged; malformed records are named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, shared_file

from chatsmith.data.conversation import TEXT_ROLE, Conversation, Message
from chatsmith.data.formats import read_conversations
from chatsmith.data.spec import FORMATS, DataSource, parse_data_spec
from chatsmith.data.writers import convert, write_conversations
from chatsmith.errors import ChatsmithError, DataError

# file -> (detected format, conversations)
EXPECTED = {
    "alpaca_50.json": ("alpaca", 50),
    "sharegpt_20.json": ("sharegpt", 20),
    "sharegpt_single_object.json": ("sharegpt", 1),
    "sharegpt_preference_20.json": ("sharegpt", 20),
    "kto_messages_20.json": ("messages", 20),
    "typed_parts_messages_10.jsonl": ("messages", 10),
    "hh_rlhf_transcripts_10.jsonl": ("hh", 10),
    "self_instruct_seed_tasks.jsonl": ("alpaca", 175),
    "hh_rlhf_harmless_train_1600.jsonl": ("hh", 1600),
}
# Shared files that are not training conversations, and who reads them.
NOT_CONVERSATIONS = {
    "vicuna_bench_questions.jsonl": "FastChat judge questions {question_id, category, turns}: evaluation prompts",
}


def raw(name: str) -> list[dict]:
    text = (shared_file(name)).read_text(encoding="utf-8")
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else [data]


def dumps(conv: Conversation) -> list[dict]:
    return [m.to_dict() for m in conv.messages]


def write(path: Path, records: list, jsonl: bool = True) -> str:
    if jsonl:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return str(path)


# ---- every shared file ---------------------------------------------------------------------

def test_every_shared_file_is_covered() -> None:
    files = {p.name for p in SHARED_DATA.iterdir() if p.suffix in (".json", ".jsonl")}
    assert files == set(EXPECTED) | set(NOT_CONVERSATIONS), "a new shared data file needs an entry (and a test) here"


@pytest.mark.parametrize("name", sorted(NOT_CONVERSATIONS))
def test_non_conversation_files_are_refused_with_their_fields_named(name: str) -> None:
    with pytest.raises(DataError, match=r"line 1: cannot tell the format from this record \(its fields: "
                                        r"category, question_id, turns\)"):
        read_conversations(str(shared_file(name)))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_file_loads_unchanged(name: str) -> None:
    fmt, count = EXPECTED[name]
    result = read_conversations(str(shared_file(name)))
    assert (result.format, len(result.conversations), result.skipped) == (fmt, count, [])
    for conv in result.conversations:
        assert conv.source and conv.source.startswith(str(shared_file(name)) + ", ")
        assert any(m.role == "assistant" for m in conv.messages)
        # hh-rlhf alone has preferred answers that are empty (see test_preference_data.py)
        assert fmt == "hh" or any(m.role == "assistant" and m.content.strip() for m in conv.messages)


def test_alpaca_joins_instruction_and_input() -> None:
    records = raw("alpaca_50.json")
    convs = read_conversations(str(shared_file("alpaca_50.json"))).conversations
    assert convs[0].source.endswith("alpaca_50.json, record 0")
    for rec, conv in zip(records, convs, strict=True):
        user = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")
        assert dumps(conv) == [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    assert sum(1 for r in records if r["input"]) == 20  # the quirk under test: mostly empty input


def test_sharegpt_multi_turn_and_ids() -> None:
    convs = read_conversations(str(shared_file("sharegpt_20.json"))).conversations
    assert [len(c.messages) for c in convs][:3] == [4, 2, 6]
    assert sum(len(c.messages) for c in convs) == 78
    assert convs[0].meta == {"id": "identity_0"}
    assert dumps(convs[0])[:2] == [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Vicuna, a language model trained by researchers from Large Model "
                                         "Systems Organization (LMSYS)."},
    ]


def test_sharegpt_single_object_is_one_conversation() -> None:
    path = str(shared_file("sharegpt_single_object.json"))
    (conv,) = read_conversations(path).conversations
    assert conv.source == f"{path}, record 0"
    assert [m.role for m in conv.messages] == ["user", "assistant"] * 6
    assert conv.messages[0].content.startswith("how could i implement a minesweeper algorithm")
    # The file itself has no system turn; a system prompt is added to conversations without one.
    (conv,) = read_conversations(path, system_prompt="You are terse.").conversations
    assert conv.messages[0] == Message("system", "You are terse.")
    assert len(conv.messages) == 13


def test_sharegpt_preference_keeps_chosen_and_rejected() -> None:
    records = raw("sharegpt_preference_20.json")
    convs = read_conversations(str(shared_file("sharegpt_preference_20.json"))).conversations
    for rec, conv in zip(records, convs, strict=True):
        assert len(conv.messages) == len(rec["conversations"]) + 1
        assert conv.messages[-1] == Message("assistant", rec["chosen"]["value"])
        assert conv.messages[-2].role == "user"
        assert conv.meta["rejected"] == rec["rejected"]["value"]
    with_system = [c for c in convs if c.messages[0].role == "system"]
    assert len(with_system) == 4
    assert with_system[0].messages[0].content.startswith("You are a teacher.")


def test_kto_labels_in_meta() -> None:
    records = raw("kto_messages_20.json")
    convs = read_conversations(str(shared_file("kto_messages_20.json"))).conversations
    assert [c.meta["label"] for c in convs] == [r["label"] for r in records]
    assert sum(c.meta["label"] for c in convs) == 12
    assert [m["content"] for m in records[1]["messages"]] == [m.content for m in convs[1].messages]


def test_typed_parts_and_loss_weight() -> None:
    convs = read_conversations(str(shared_file("typed_parts_messages_10.jsonl"))).conversations
    assert convs[0].source.endswith("typed_parts_messages_10.jsonl, line 1")
    assert dumps(convs[0]) == [
        {"role": "user", "content": "hi", "train": False},
        {"role": "assistant", "content": "Hello! I am {{name}}, an AI assistant developed by {{author}}. "
                                         "How can I assist you today?", "train": True},
    ]
    assert all(not c.messages[0].trains() and c.messages[1].trains() for c in convs)


def test_hh_transcripts_split_into_turns() -> None:
    records = raw("hh_rlhf_transcripts_10.jsonl")
    convs = read_conversations(str(shared_file("hh_rlhf_transcripts_10.jsonl"))).conversations
    assert [len(c.messages) for c in convs] == [6, 6, 4, 10, 2, 6, 8, 6, 6, 2]
    first = convs[0]
    assert [m.role for m in first.messages] == ["user", "assistant"] * 3
    assert first.messages[0].content == "what are some pranks with a pen i can do?"
    assert first.messages[1].content == "Are you looking for practical joke ideas?"
    assert first.messages[-1].content.startswith("No, sorry!  All of these involve a pen")
    assert first.meta["rejected"].startswith("There are lots of funny things you can do with pens")
    for rec, conv in zip(records, convs, strict=True):
        assert rec["rejected"].endswith(conv.meta["rejected"])
        assert not any("Human:" in m.content or "Assistant:" in m.content for m in conv.messages)


def test_self_instruct_seed_tasks_as_alpaca() -> None:
    records = raw("self_instruct_seed_tasks.jsonl")
    convs = read_conversations(str(shared_file("self_instruct_seed_tasks.jsonl"))).conversations
    assert convs[1].meta == {"id": "seed_task_1", "name": "antonym_relation", "is_classification": False}
    assert dumps(convs[1]) == [
        {"role": "user", "content": "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"},
        {"role": "assistant", "content": "The relation between the given pairs is that they are opposites."},
    ]
    assert [c.messages[-1].content for c in convs] == [r["instances"][0]["output"] for r in records]


# ---- other shapes --------------------------------------------------------------------------

def test_alpaca_system_and_history(tmp_path: Path) -> None:
    rec = {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be brief.",
           "history": [["1+1?", "2"], ["2+2?", "4"]]}
    (conv,) = read_conversations(write(tmp_path / "a.json", [rec], jsonl=False)).conversations
    assert [(m.role, m.content) for m in conv.messages] == [
        ("system", "Be brief."), ("user", "1+1?"), ("assistant", "2"), ("user", "2+2?"), ("assistant", "4"),
        ("user", "And 3+3?"), ("assistant", "6")]


def test_sharegpt_tool_roles_and_top_level_system(tmp_path: Path) -> None:
    rec = {"system": "S", "conversations": [
        {"from": "user", "value": "weather?"}, {"from": "function_call", "value": '{"name": "w"}'},
        {"from": "observation", "value": "sunny"}, {"from": "model", "value": "It is sunny."}]}
    (conv,) = read_conversations(write(tmp_path / "t.jsonl", [rec])).conversations
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]


def test_trl_conversational_preference(tmp_path: Path) -> None:
    rec = {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    result = read_conversations(write(tmp_path / "p.jsonl", [rec]))
    assert result.format == "messages"
    assert dumps(result.conversations[0]) == [{"role": "user", "content": "Q"},
                                              {"role": "assistant", "content": "good"}]
    assert result.conversations[0].meta == {"rejected": "bad"}


def test_text_file_split_on_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "corpus.txt"
    p.write_text("First doc\nline two\n\n\nSecond doc\n   \nThird doc\n")
    result = read_conversations(str(p))
    assert result.format == "text"
    assert [c.messages for c in result.conversations] == [
        [Message(TEXT_ROLE, "First doc\nline two")], [Message(TEXT_ROLE, "Second doc")],
        [Message(TEXT_ROLE, "Third doc")]]
    assert [c.source for c in result.conversations] == [f"{p}, line 1", f"{p}, line 5", f"{p}, line 7"]
    assert all(c.is_text for c in result.conversations)


def test_text_and_hh_text_records(tmp_path: Path) -> None:
    result = read_conversations(write(tmp_path / "t.jsonl", [{"text": "hello world", "id": 1}]))
    assert result.format == "text" and result.conversations[0].meta == {"id": 1}
    result = read_conversations(write(tmp_path / "h.jsonl", [{"text": "\n\nHuman: hi\n\nAssistant: hello"}]))
    assert result.format == "hh"
    assert dumps(result.conversations[0]) == [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]


def test_csv_column_mapping(tmp_path: Path) -> None:
    p = tmp_path / "qa.csv"
    p.write_text("question,answer,sys,topic\nWhat is 2+2?,4,Be exact.,math\n\"Say \"\"hi\"\"\",\"hi,\nthere\",,greet\n")
    result = read_conversations(str(p), columns={"prompt": "question", "response": "answer", "system": "sys"})
    assert result.format == "columns"
    a, b = result.conversations
    assert dumps(a) == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 2+2?"},
                        {"role": "assistant", "content": "4"}]
    assert dumps(b) == [{"role": "user", "content": 'Say "hi"'}, {"role": "assistant", "content": "hi,\nthere"}]
    assert a.meta == {"topic": "math"} and a.source == f"{p}, row 2"


def test_csv_default_columns_and_missing_cell(tmp_path: Path) -> None:
    p = tmp_path / "pr.csv"
    p.write_text("prompt,response\nhello,hi\nbye,\n")
    with pytest.raises(DataError) as e:
        read_conversations(str(p))
    assert (e.value.path, e.value.record, e.value.field) == (str(p), "row 3", "response")
    assert "assistant turn is empty" in str(e.value)
    result = read_conversations(str(p), skip_bad=True)
    assert result.format == "columns" and len(result.conversations) == 1 and len(result.skipped) == 1


def test_csv_mapped_column_not_found(tmp_path: Path) -> None:
    p = tmp_path / "qa.csv"
    p.write_text("q,a\nx,y\n")
    with pytest.raises(ChatsmithError, match=r"column 'question' \(mapped to 'prompt'\) not found; the columns are: q, a"):
        read_conversations(str(p), columns={"prompt": "question", "response": "a"})
    with pytest.raises(ChatsmithError, match="unknown key 'answer'. Allowed keys: prompt, response, system, text"):
        read_conversations(str(p), columns={"prompt": "q", "answer": "a"})
    with pytest.raises(ChatsmithError, match="needs both 'prompt' and 'response'"):
        read_conversations(str(p), columns={"prompt": "q"})


def test_parquet_column_mapping_and_nested_messages(tmp_path: Path) -> None:
    import pandas as pd

    p = tmp_path / "qa.parquet"
    pd.DataFrame({"question": ["a?", "b?"], "answer": ["A", "B"], "n": [1, 2]}).to_parquet(p)
    result = read_conversations(str(p), columns={"prompt": "question", "response": "answer"})
    assert [dumps(c) for c in result.conversations][1] == [{"role": "user", "content": "b?"},
                                                           {"role": "assistant", "content": "B"}]
    assert result.conversations[1].meta == {"n": 2} and result.conversations[1].source == f"{p}, row 1"

    p = tmp_path / "m.parquet"
    pd.DataFrame({"messages": [[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]]}).to_parquet(p)
    result = read_conversations(str(p))
    assert result.format == "messages" and dumps(result.conversations[0])[1] == {"role": "assistant", "content": "y"}


def test_text_column_mapping(tmp_path: Path) -> None:
    p = tmp_path / "docs.csv"
    p.write_text("body,lang\nSome text.,en\n")
    result = read_conversations(str(p), columns={"text": "body"})
    assert result.conversations[0].messages == [Message(TEXT_ROLE, "Some text.")]


# ---- malformed records ---------------------------------------------------------------------

def test_missing_output_names_file_record_and_field(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", [{"instruction": "x", "input": "", "output": "y"},
                                       {"instruction": "x", "input": ""}], jsonl=False)
    with pytest.raises(DataError) as e:
        read_conversations(path)
    assert (e.value.path, e.value.record, e.value.field) == (path, "record 1", "output")
    assert str(e.value).startswith(f"{path}, record 1, field 'output': missing 'output'")
    assert "--skip-bad" in str(e.value)


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": "b"}]},
                                        "", '{"messages": [', "not json"])
    with pytest.raises(DataError, match=r"m.jsonl, line 3: invalid JSON") as e:
        read_conversations(path)
    assert e.value.record == "line 3"


def test_invalid_json_file_is_named(tmp_path: Path) -> None:
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"instruction": "x",\n  "output": }\n]')
    with pytest.raises(DataError, match=r"bad.json: invalid JSON .* at line 3"):
        read_conversations(str(p))


def test_unknown_role_lists_allowed(tmp_path: Path) -> None:
    path = write(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "a"},
                                                           {"from": "robot", "value": "b"}]}])
    with pytest.raises(DataError) as e:
        read_conversations(path)
    assert (e.value.record, e.value.field) == ("line 1", "conversations[1].from")
    assert "unknown speaker 'robot'; allowed: system, human, user, gpt" in str(e.value)

    path = write(tmp_path / "m.jsonl", [{"messages": [{"role": "customer", "content": "a"}]}])
    with pytest.raises(DataError, match=r"field 'messages\[0\].role': unknown role 'customer'; allowed: system"):
        read_conversations(path)


def test_empty_assistant_turn(tmp_path: Path) -> None:
    path = write(tmp_path / "m.json", [{"messages": [{"role": "user", "content": "a"},
                                                     {"role": "assistant", "content": "  "}]}], jsonl=False)
    with pytest.raises(DataError) as e:
        read_conversations(path)
    assert (e.value.record, e.value.field) == ("record 0", "messages[1].content")
    assert "assistant turn is empty" in str(e.value)


def test_no_assistant_turn(tmp_path: Path) -> None:
    path = write(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "a"}]}])
    with pytest.raises(DataError, match=r"s.jsonl, line 1, field 'conversations': conversation has no assistant turn"):
        read_conversations(path)


def test_non_text_part_and_bad_loss_weight(tmp_path: Path) -> None:
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x.png"}]},
                          {"role": "assistant", "content": "a cat"}]}
    path = write(tmp_path / "m.jsonl", [image])
    with pytest.raises(DataError, match=r"field 'messages\[0\].content\[0\].type': only text parts"):
        read_conversations(path)
    weight = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_weight": -1}]}
    with pytest.raises(DataError, match=r"messages\[1\].loss_weight': must be a number >= 0"):
        read_conversations(write(tmp_path / "w.jsonl", [weight]))


def test_hh_empty_final_reply_is_kept_but_an_empty_earlier_one_is_an_error(tmp_path: Path) -> None:
    # hh-rlhf's labellers sometimes preferred no answer: the real file has four such records.
    path = write(tmp_path / "h.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:",
                                         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: x"}])
    conv = read_conversations(path).conversations[0]
    assert [(m.role, m.content) for m in conv.messages][-2:] == [("user", "and?"), ("assistant", "")]
    path = write(tmp_path / "e.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: \n\nHuman: and?\n\nAssistant: x"}])
    with pytest.raises(DataError, match=r"line 1, field 'chosen \(turn 2, Assistant\)': assistant turn is empty"):
        read_conversations(path)


def test_skip_bad_counts_and_reports(tmp_path: Path) -> None:
    good = {"instruction": "i", "input": "", "output": "o"}
    path = write(tmp_path / "a.jsonl", [good, "{oops", {"instruction": "i"}, good, {"instruction": "i", "output": ""}])
    with pytest.raises(DataError, match="line 2"):
        read_conversations(path)
    result = read_conversations(path, skip_bad=True)
    assert len(result.conversations) == 2 and result.format == "alpaca"
    assert [(e.record, e.field) for e in result.skipped] == [("line 2", None), ("line 3", "output"),
                                                             ("line 5", "output")]
    assert [c.source for c in result.conversations] == [f"{path}, line 1", f"{path}, line 4"]


def test_all_records_bad_is_an_error_even_with_skip_bad(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", [{"instruction": "i"}, {"instruction": "j"}])
    with pytest.raises(ChatsmithError, match="all 2 records are malformed; the first: .*line 1"):
        read_conversations(path, skip_bad=True)


def test_unrecognised_format_lists_known_formats(tmp_path: Path) -> None:
    path = write(tmp_path / "x.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(DataError, match=r"x.jsonl, line 1: cannot tell the format .*fields: bar, foo.*alpaca.*sharegpt"
                                        r".*messages.*hh.*text.*columns"):
        read_conversations(path)
    with pytest.raises(ChatsmithError, match="unknown data format 'chatml'. Known formats: alpaca, sharegpt"):
        read_conversations(path, format="chatml")


def test_forced_format_mismatch(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"record 0, field 'instruction': missing 'instruction'"):
        read_conversations(str(shared_file("sharegpt_20.json")), format="alpaca")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ChatsmithError, match=r"data file not found: .*nope.jsonl"):
        read_conversations(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ChatsmithError, match="is a directory"):
        read_conversations(str(tmp_path))
    with pytest.raises(ChatsmithError, match="no records found"):
        read_conversations(write(tmp_path / "empty.jsonl", []))


def test_hub_name_offline_fails_fast_with_advice() -> None:
    # A subprocess, because huggingface_hub reads HF_HUB_OFFLINE once, at import time.
    code = ("from chatsmith.data.formats import read_conversations\n"
            "try:\n    read_conversations('tatsu-lab/alpaca')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ChatsmithError could not load 'tatsu-lab/alpaca' from the Hugging Face hub")
    assert "pass its path instead" in out


# ---- --data specs --------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("data/a.json", DataSource("data/a.json")),
    ("data/a.json:0.7", DataSource("data/a.json", 0.7)),
    ("data/a.json@sharegpt", DataSource("data/a.json", None, "sharegpt")),
    ("data/a.json@sharegpt:2", DataSource("data/a.json", 2.0, "sharegpt")),
    ("tatsu-lab/alpaca", DataSource("tatsu-lab/alpaca")),
    ("tatsu-lab/alpaca:1e-1", DataSource("tatsu-lab/alpaca", 0.1)),
    ("C:\\data\\a.json", DataSource("C:\\data\\a.json")),
])
def test_parse_data_spec(spec: str, expected: DataSource) -> None:
    assert parse_data_spec(spec) == expected


def test_parse_data_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(ChatsmithError, match="weight must be a positive number, got '0'"):
        parse_data_spec("a.json:0")
    with pytest.raises(ChatsmithError, match="weight must be a positive number"):
        parse_data_spec("a.json:-1")
    existing = write(tmp_path / "a.json", [])
    with pytest.raises(ChatsmithError, match="weight 'lots' is not a number"):
        parse_data_spec(existing + ":lots")
    with pytest.raises(ChatsmithError, match="unknown format 'chatml'. Known formats: " + ", ".join(FORMATS)):
        parse_data_spec("a.json@chatml:2")


# ---- writing and converting ----------------------------------------------------------------

def test_alpaca_messages_alpaca_round_trip(tmp_path: Path) -> None:
    src = str(shared_file("alpaca_50.json"))
    summary = convert(src, str(tmp_path / "m.jsonl"), to="messages")
    assert summary == f"wrote 50 conversations from {src} (alpaca) to {tmp_path / 'm.jsonl'} (messages)"
    convert(str(tmp_path / "m.jsonl"), str(tmp_path / "back.json"), to="alpaca")
    before = read_conversations(src).conversations
    after = read_conversations(str(tmp_path / "back.json")).conversations
    assert [dumps(c) for c in after] == [dumps(c) for c in before]
    # Records without `input` come back byte-for-byte; the others have instruction and input joined.
    back = json.loads((tmp_path / "back.json").read_text())
    for orig, rec in zip(raw("alpaca_50.json"), back, strict=True):
        if not orig["input"]:
            assert rec == orig


@pytest.mark.parametrize("name, to", [("sharegpt_20.json", "sharegpt"), ("kto_messages_20.json", "messages")])
def test_same_format_round_trip_is_identical(tmp_path: Path, name: str, to: str) -> None:
    convert(str(shared_file(name)), str(tmp_path / "out.json"), to=to)
    assert json.loads((tmp_path / "out.json").read_text()) == raw(name)


@pytest.mark.parametrize("name, via", [
    ("typed_parts_messages_10.jsonl", "sharegpt"),
    ("sharegpt_preference_20.json", "messages"),
    ("hh_rlhf_transcripts_10.jsonl", "alpaca"),
    ("kto_messages_20.json", "alpaca"),
    ("sharegpt_single_object.json", "messages"),
])
def test_conversations_survive_conversion(tmp_path: Path, name: str, via: str) -> None:
    before = read_conversations(str(shared_file(name))).conversations
    out = tmp_path / f"out.{'jsonl' if via == 'sharegpt' else 'json'}"
    convert(str(shared_file(name)), str(out), to=via)
    after = read_conversations(str(out)).conversations
    assert [dumps(c) for c in after] == [dumps(c) for c in before]
    assert [c.meta for c in after] == [c.meta for c in before]


def test_text_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("one\n\ntwo\n")
    convert(str(p), str(tmp_path / "c.jsonl"), to="messages")
    assert (tmp_path / "c.jsonl").read_text() == '{"text": "one"}\n{"text": "two"}\n'
    assert read_conversations(str(tmp_path / "c.jsonl")).format == "text"


def test_alpaca_cannot_express_every_conversation(tmp_path: Path) -> None:
    tool = Conversation([Message("user", "q"), Message("tool", "t"), Message("assistant", "a")], source="x, line 3")
    with pytest.raises(ChatsmithError, match="x, line 3: cannot be written as alpaca .*--to messages"):
        write_conversations([tool], str(tmp_path / "o.json"), to="alpaca")
    flagged = Conversation([Message("user", "q"), Message("assistant", "a", train=False),
                            Message("user", "q2"), Message("assistant", "b")])
    with pytest.raises(ChatsmithError, match="training flags"):
        write_conversations([flagged], str(tmp_path / "o.json"), to="alpaca")
    with pytest.raises(ChatsmithError, match=r"must end in .json .* or .jsonl"):
        write_conversations([tool], str(tmp_path / "o.csv"), to="messages")
    with pytest.raises(ChatsmithError, match="cannot write format 'hh'"):
        convert(str(shared_file("alpaca_50.json")), str(tmp_path / "o.json"), to="hh")
