"""Data generation with a teacher: ROUGE-L against hand-computed values and rouge-score, the teacher
client (429 retry, usage, fail fast), self-instruct and self-chat end to end against a deterministic
fake teacher over real HTTP (parsing, filtering, concurrency, garbage answers counted, resume after
a kill without asking any request twice), and one short real run with `chatsmith serve`."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, shared_file
from fake_teacher import FakeTeacher

from chatsmith.cli import main
from chatsmith.datagen.parsing import Unusable, json_object, numbered_items
from chatsmith.datagen.rouge import RougePool, lcs_length, rouge_l, rouge_tokens
from chatsmith.datagen.seeds import read_seeds
from chatsmith.datagen.teacher import Journal, Teacher, TeacherSettings
from chatsmith.errors import ChatsmithError, DataError

# ---- ROUGE-L ---------------------------------------------------------------------------------------


def test_rouge_l_hand_computed():
    # "the cat sat on the mat" vs "the cat is on a mat": LCS = the cat on mat = 4; F1 = 2*4/(6+6).
    assert lcs_length("the cat sat on the mat".split(), "the cat is on a mat".split()) == 4
    assert rouge_l("The cat sat on the mat.", "the cat is on a mat") == pytest.approx(8 / 12)
    # Identical texts 1, disjoint 0, an empty text 0.
    assert rouge_l("Write a poem.", "write a POEM") == 1.0
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    assert rouge_l("", "anything") == 0.0
    # Non-ASCII counts: Russian words, and CJK one character per token.
    assert rouge_tokens("Привет, мир!") == ["привет", "мир"]
    assert rouge_tokens("写一首诗") == ["写", "一", "首", "诗"]
    # 写一首诗 vs 写一首歌: LCS 3 of 4 and 4: F1 = 6/8.
    assert rouge_l("写一首诗", "写一首歌") == pytest.approx(0.75)


def test_rouge_l_equals_rouge_score_on_english():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score (installed with lm-eval) "
                                       "is the reference implementation")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = [json.loads(line)["instruction"] for line in
             shared_file("self_instruct_seed_tasks.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.sample(texts, 2)
        assert rouge_l(a, b) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure, abs=1e-12)


def test_rouge_pool_decides_like_all_pairs():
    texts = [json.loads(line)["instruction"] for line in
             shared_file("self_instruct_seed_tasks.jsonl").read_text().splitlines()]
    rng = random.Random(1)
    # Near copies (a few words changed) and unrelated sentences as queries.
    queries = []
    for t in rng.sample(texts, 40):
        words = t.split()
        for _ in range(rng.randint(0, 4)):
            words[rng.randrange(len(words))] = rng.choice(["very", "quick", "blue", "seven"])
        queries.append(" ".join(words))
    queries += ["Completely unrelated words here now.", "写一首关于秋天的诗"]
    for threshold in (0.3, 0.5, 0.7):
        pool = RougePool(threshold, texts)
        for q in queries:
            exact = max(rouge_l(t, q) for t in texts)
            best, top = pool.most_similar(q, top=1)
            if exact >= threshold:
                assert best == pytest.approx(exact), q
                assert rouge_l(top[0][1], q) == pytest.approx(exact)
            else:
                assert best < threshold
            assert pool.too_similar(q) == (exact > threshold)


# ---- parsing ---------------------------------------------------------------------------------------


def test_numbered_items_continuation_multiline_and_truncation():
    text = " Describe a sunset.\n5. Explain tides\n   to a child.\n###\n6. Cut of"
    assert numbered_items(text, 4) == ["Describe a sunset.", "Explain tides to a child.", "Cut of"]
    assert numbered_items(text, 4, truncated=True) == ["Describe a sunset.", "Explain tides to a child."]
    assert numbered_items("1. Instruction: Name a fruit.\n2) Name a tree", 1) == ["Name a fruit.", "Name a tree"]
    for bad, reason in (("I'm sorry, I cannot do that.", "refusal"), ("", "empty_list"), ("   \n", "empty_list")):
        with pytest.raises(Unusable) as e:
            numbered_items(bad, 3)
        assert e.value.reason == reason


def test_json_object_finds_the_object():
    assert json_object('Sure:\n```json\n{"input": "", "output": "4"}\n```') == {"input": "", "output": "4"}
    assert json_object('{bad} then {"output": "x"}') == {"output": "x"}
    with pytest.raises(Unusable) as e:
        json_object("input: a, output: b")
    assert e.value.reason == "invalid_json"


# ---- seeds -----------------------------------------------------------------------------------------


def test_seed_files_as_published(tmp_path):
    seeds = read_seeds(str(shared_file("self_instruct_seed_tasks.jsonl")))
    assert len(seeds) == 175
    assert seeds[0].id == "seed_task_0" and seeds[0].instances[0]["output"].startswith("Yes, you can have")
    alpaca = read_seeds(str(shared_file("alpaca_50.json")))
    assert len(alpaca) == 50 and alpaca[0].instances
    (tmp_path / "list.txt").write_text("Name three rivers.\n\nWrite a limerick about tea.\n")
    assert [s.instruction for s in read_seeds(str(tmp_path / "list.txt"))] == ["Name three rivers.",
                                                                             "Write a limerick about tea."]
    (tmp_path / "list.json").write_text('["Name three rivers.", "Write a limerick."]')
    assert len(read_seeds(str(tmp_path / "list.json"))) == 2
    chats = read_seeds(str(shared_file("sharegpt_20.json")))
    assert len(chats) == 20 and chats[0].instruction


def test_bad_seed_file_names_file_and_line(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "Fine one."}\n{"instruction": 3}\n')
    with pytest.raises(DataError, match=r"seeds.jsonl, line 2, field 'instruction': must be a string"):
        read_seeds(str(bad))
    bad.write_text('{"instruction": "Fine one."}\n{"instruction": "x", \n')
    with pytest.raises(DataError, match=r"seeds.jsonl, line 2: invalid JSON"):
        read_seeds(str(bad))
    with pytest.raises(ChatsmithError, match="seed file not found"):
        read_seeds(str(tmp_path / "missing.jsonl"))


# ---- the teacher client ----------------------------------------------------------------------------


def test_teacher_retries_429_counts_usage_and_journals(tmp_path):
    with FakeTeacher(rate_limit_first=2) as url:
        s = TeacherSettings(url=url, model="fake", backoff=0.01, price_in=1.0, price_out=2.0)
        t = Teacher(s, Journal(tmp_path / "j.jsonl"))
        a = t.complete("Task: Name a colour.\nJSON object", max_tokens=20)
        assert json.loads(a.text)["output"] and not a.replayed
        assert t.usage.retries == 2 and t.usage.by_status == {"429": 2} and t.usage.requests == 1
        assert t.usage.prompt_tokens == a.prompt_tokens > 0
        assert t.usage.cost(s) == pytest.approx((a.prompt_tokens * 1 + a.completion_tokens * 2) / 1e6)
        # The same request again comes from the journal, even through a new client.
        t2 = Teacher(s, Journal(tmp_path / "j.jsonl"))
        b = t2.complete("Task: Name a colour.\nJSON object", max_tokens=20)
        assert b.replayed and b.text == a.text and t2.usage.requests == 0 and t2.usage.replayed == 1
        # A torn last line (a kill mid-write) is ignored.
        with open(tmp_path / "j.jsonl", "a") as f:
            f.write('{"key": "abc", "te')
        assert len(Journal(tmp_path / "j.jsonl")) == 1


def test_teacher_gives_up_after_retries_with_the_url():
    with FakeTeacher(rate_limit_first=100) as url:
        t = Teacher(TeacherSettings(url=url, model="fake", max_retries=2, backoff=0.01))
        with pytest.raises(ChatsmithError, match=rf"teacher at {url} answered 429 .* after 3 tries"):
            t.complete("hello")
        assert t.usage.retries == 2 and t.usage.failed == 1


def test_a_refused_request_is_an_unusable_answer(tmp_path):
    with FakeTeacher(rate_limit_first=0) as url:
        t = Teacher(TeacherSettings(url=url, model="fake", backoff=0.01), Journal(tmp_path / "j.jsonl"))
        a = t.complete("TOO LONG " * 3)
        assert (a.text, a.finish_reason) == ("", "refused")
        assert t.usage.by_status == {"400 (not retried)": 1} and t.usage.retries == 0 and len(t.journal) == 0


def test_unreachable_teacher_fails_fast_with_the_url(tmp_path, capsys):
    rc = main(["data", "self-instruct", "--seeds", str(shared_file("self_instruct_seed_tasks.jsonl")), "--n", "5",
               "--output", str(tmp_path / "si.jsonl"), "--teacher-url", "http://127.0.0.1:9/v1",
               "--teacher-model", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "http://127.0.0.1:9/v1 cannot be reached" in err and "chatsmith serve" in err
    assert not (tmp_path / "si.jsonl").exists()


# ---- self-instruct end to end ----------------------------------------------------------------------

SI_ARGS = ["--n", "24", "--teacher-model", "fake-teacher", "--concurrency", "4", "--tasks-per-request", "5",
           "--seed", "3"]


def _si(url: str, out: Path, *extra: str) -> list[str]:
    return ["data", "self-instruct", "--seeds", str(shared_file("self_instruct_seed_tasks.jsonl")),
            "--output", str(out), "--teacher-url", url, *SI_ARGS, *extra]


def test_self_instruct_end_to_end(tmp_path):
    out = tmp_path / "si.jsonl"
    teacher = FakeTeacher(rate_limit_first=1, delay=0.05)
    with teacher as url:
        assert main(_si(url, out)) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads((tmp_path / "si.summary.json").read_text())
    assert len(records) == 24 == summary["written"]
    seeds = [json.loads(line)["instruction"] for line in
             shared_file("self_instruct_seed_tasks.jsonl").read_text().splitlines()]
    pool = seeds + [r["instruction"] for r in records]
    for i, r in enumerate(records):
        assert set(r) == {"instruction", "input", "output", "provenance"}
        assert r["output"] == f"An answer to '{r['instruction']}'."
        assert r["provenance"]["teacher"] == "fake-teacher" and r["provenance"]["method"] == "self-instruct"
        # Every filter held: no blacklisted word, no short or punctuation-led instruction, and no
        # instruction within ROUGE-L 0.7 of any earlier one (seeds included), by an all-pairs check.
        assert "image" not in r["instruction"] and len(r["instruction"].split()) > 3
        assert r["instruction"][0].isalpha()
        assert max(rouge_l(p, r["instruction"]) for p in pool[:len(seeds) + i]) <= 0.7
    # Each kind of bad answer was seen and counted; the garbage answers cost a retry, not a record.
    rej = summary["rejected"]
    for reason in ("blacklisted_word", "too_short", "starts_with_punctuation", "rouge_l", "answer_refusal",
                   "instance_invalid_json"):
        assert rej.get(reason, 0) > 0, reason
    assert summary["usage"]["by_status"] == {"429": 1} and summary["usage"]["retries"] == 1
    assert summary["usage"]["prompt_tokens"] > 0 and summary["usage"]["completion_tokens"] > 0
    # The provenance names journal entries: the prompt that proposed each instruction.
    journal = {json.loads(line)["key"]: json.loads(line) for line in (tmp_path / "si.journal.jsonl").read_text().splitlines()}
    for r in records:
        assert "List of 5 tasks" in journal[r["provenance"]["prompt_id"]]["request"]["messages"][0]["content"]
        assert r["instruction"] in journal[r["provenance"]["instance_prompt_id"]]["request"]["messages"][0]["content"]
    # Concurrency: several requests in flight, never more than the limit.
    assert 2 <= teacher.max_in_flight <= 4


def test_self_instruct_resumes_after_a_kill_without_asking_twice(tmp_path):
    # A run that is never interrupted, against its own fake teacher.
    a = FakeTeacher(rate_limit_first=0)
    with a as url_a:
        assert main(_si(url_a, tmp_path / "a" / "si.jsonl")) == 0
    whole = a.answered
    # The same run, killed (SIGKILL) part-way through, then run again.
    out = tmp_path / "b" / "si.jsonl"
    journal = tmp_path / "b" / "si.journal.jsonl"
    b = FakeTeacher(rate_limit_first=0, delay=0.1)
    with b as url_b:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-m", "chatsmith", *_si(url_b, out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < 12):
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        before = sum(b.answered.values())
        assert 12 <= before < sum(whole.values()), "the kill must land part-way through"
        b.delay = 0
        assert main(_si(url_b, out)) == 0
        resumed = b.answered
    # Every request body was answered exactly as often as in the uninterrupted run: nothing paid twice
    # (answers torn by the kill excepted: at most the requests in flight at that moment).
    extra = sum((resumed - whole).values())
    assert sum((whole - resumed).values()) == 0
    assert extra <= 4
    summary = json.loads((tmp_path / "b" / "si.summary.json").read_text())
    assert summary["usage"]["replayed"] >= before - 4
    strip = [{k: v for k, v in json.loads(line).items() if k != "provenance"} for line in out.read_text().splitlines()]
    whole_records = [{k: v for k, v in json.loads(line).items() if k != "provenance"}
                     for line in (tmp_path / "a" / "si.jsonl").read_text().splitlines()]
    assert strip == whole_records


def test_self_instruct_completions_endpoint_and_garbage_teacher(tmp_path, monkeypatch):
    with FakeTeacher(rate_limit_first=0) as url:
        assert main(_si(url, tmp_path / "c.jsonl", "--teacher-api", "completions")) == 0
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 24
    # A teacher that only ever answers garbage: counted rejections and a clear stop, never a crash.
    monkeypatch.setattr(FakeTeacher, "instructions", lambda self, prompt, occurrence: "lorem ipsum !!!")
    with FakeTeacher(rate_limit_first=0) as url:
        rc = main(_si(url, tmp_path / "g.jsonl"))
    summary = json.loads((tmp_path / "g.summary.json").read_text())
    assert rc == 1 and summary["written"] == 0 and "rounds in a row kept no instruction" in summary["stopped"]
    assert summary["rejected"]["too_short"] > 0
    # A teacher whose inputs/outputs are never JSON: counted, and a stop that says so.
    monkeypatch.undo()
    monkeypatch.setattr(FakeTeacher, "instance", lambda self, prompt, occurrence: "no JSON here")
    with FakeTeacher(rate_limit_first=0) as url:
        rc = main(_si(url, tmp_path / "j.jsonl", "--parse-retries", "0"))
    summary = json.loads((tmp_path / "j.summary.json").read_text())
    assert rc == 1 and summary["written"] == 0 and "got no usable input/output" in summary["stopped"]
    assert summary["rejected"]["instance_invalid_json"] == summary["rejected"]["instance_unusable"] > 0


# ---- self-chat end to end --------------------------------------------------------------------------


def _sc(url: str, out: Path, seeds: Path, *extra: str) -> list[str]:
    return ["data", "self-chat", "--seeds", str(seeds), "--output", str(out), "--teacher-url", url,
            "--teacher-model", "fake-teacher", "--concurrency", "3", *extra]


def test_self_chat_end_to_end_and_resume(tmp_path):
    seeds = tmp_path / "questions.txt"
    seeds.write_text("\n".join(f"How do {t} work?" for t in ("volcanoes", "tides", "vaccines", "glaciers",
                                                              "bees", "markets", "engines")) + "\n")
    whole = FakeTeacher(rate_limit_first=1, delay=0.02)
    with whole as url:
        assert main(_sc(url, tmp_path / "a.jsonl", seeds)) == 0
        assert main(_sc(url, tmp_path / "short.jsonl", seeds, "--turns", "2", "--n", "9")) == 0
        _check_self_chat(tmp_path)
        # Resume: drop the second half of the journal and the output, run again: only the dropped
        # answers are asked again (of the same teacher), and the dialogues come out the same.
        records = (tmp_path / "a.jsonl").read_text()
        journal = tmp_path / "a.journal.jsonl"
        lines = journal.read_text().splitlines()
        journal.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
        (tmp_path / "a.jsonl").unlink()
        before = whole.answered.copy()
        assert main(_sc(url, tmp_path / "a.jsonl", seeds)) == 0
        asked = whole.answered - before
        dropped = Counter(json.dumps(json.loads(line)["request"], sort_keys=True) for line in lines[len(lines) // 2:])
        assert sum(asked.values()) > 0 and not asked - dropped   # only requests whose answers were dropped
        # The same dialogues (prompt ids may differ: a re-asked garbage answer may now come good
        # at an earlier attempt, since this fake's garbage depends on what it answered before).
        def dialogues(text: str) -> list:
            return [json.loads(line)["conversations"] for line in text.splitlines()]

        assert dialogues((tmp_path / "a.jsonl").read_text()) == dialogues(records)


def _check_self_chat(tmp_path: Path) -> None:
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "a.summary.json").read_text())
    assert len(records) == 7 and summary["stops"] == {"end": 7}
    for r in records:
        roles = [t["from"] for t in r["conversations"]]
        # The fake human says [END] after three questions: three full exchanges, alternating, ShareGPT.
        assert roles == ["human", "gpt"] * 3
        assert r["conversations"][2]["value"].startswith("Follow-up 1:")
        assert all(t["value"].strip() for t in r["conversations"])
        assert r["provenance"]["method"] == "self-chat" and len(r["provenance"]["prompt_ids"]) == 6
    # Empty assistant turns were asked again and counted, never written.
    assert summary["rejected"].get("assistant_empty", 0) > 0
    assert summary["usage"]["by_status"] == {"429": 1}
    short = [json.loads(line) for line in (tmp_path / "short.jsonl").read_text().splitlines()]
    assert len(short) == 9 and all(len(r["conversations"]) == 4 for r in short)
    assert json.loads((tmp_path / "short.summary.json").read_text())["stops"] == {"turn_limit": 9}
    # The SharGPT output is read by chatsmith's own loader as it is.
    from chatsmith.data.formats import read_conversations

    assert len(read_conversations(str(tmp_path / "a.jsonl")).conversations) == 7


# ---- one short real run: `chatsmith serve` of the embedded model as the teacher ----------------------


@pytest.mark.slow
def test_real_teacher_chatsmith_serve(tmp_path):
    """The embedded 135M model served by chatsmith answers self-chat and self-instruct requests
    through the official client. A model this small rarely writes a usable numbered list, so
    self-instruct must end either with records or with counted rejections, never a crash."""
    from chatsmith.serve.app import ServerState, ServerThread, load_state

    state = ServerState("smollm2-135m")
    with ServerThread(state) as base:
        load_state(state, "smollm2-135m", max_concurrency=2, kv_cache_mb=512)
        assert state.load_error is None, state.load_error
        url = base + "/v1"
        seeds = tmp_path / "q.txt"
        seeds.write_text("What is the capital of France?\nHow do I boil an egg?\n")
        try:
            rc = main(["data", "self-chat", "--seeds", str(seeds), "--output", str(tmp_path / "chat.jsonl"),
                       "--teacher-url", url, "--teacher-model", "smollm2-135m", "--turns", "2", "--max-tokens", "24",
                       "--concurrency", "2"])
            assert rc == 0
            chats = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
            assert chats and all(c["conversations"][1]["from"] == "gpt" and c["conversations"][1]["value"]
                                 for c in chats)
            summary = json.loads((tmp_path / "chat.summary.json").read_text())
            assert summary["usage"]["requests"] >= 2 and summary["usage"]["completion_tokens"] > 0
            rc = main(["data", "self-instruct", "--seeds", str(shared_file("self_instruct_seed_tasks.jsonl")),
                       "--n", "1", "--output", str(tmp_path / "si.jsonl"), "--teacher-url", url,
                       "--teacher-model", "smollm2-135m", "--tasks-per-request", "5", "--max-tokens", "64",
                       "--instance-max-tokens", "32", "--concurrency", "2", "--parse-retries", "0"])
            summary = json.loads((tmp_path / "si.summary.json").read_text())
            assert (rc == 0 and summary["written"] == 1) or (rc == 1 and summary["stopped"] and summary["rejected"])
            assert summary["usage"]["requests"] > 0 and summary["usage"]["failed"] == 0
            print(json.dumps({k: summary[k] for k in ("written", "proposed", "kept", "rejected", "stopped", "usage")}))
        finally:
            state.engine.stop()
