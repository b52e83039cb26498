"""`chatsmith eval`: metrics against hand-computed values, the judge against a fake judge that is a
real HTTP server (parsing, retries, both orders, ties, caching), the report in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from chatsmith.eval.stats import WinTieLoss, mean_interval, wilson_interval, win_tie_loss
from chatsmith.eval.tasks import accuracy_table, last_number, matches, normalise

# ---- metrics against hand values -----------------------------------------------------------------


def test_wilson_interval_matches_the_textbook_value():
    # 8 of 10: the Wilson 95% interval is [0.4902, 0.9433] (e.g. Newcombe 1998, table I's method 3).
    e = wilson_interval(8, 10)
    assert e.value == 0.8
    assert e.low == pytest.approx(0.4902, abs=1e-4) and e.high == pytest.approx(0.9433, abs=1e-4)
    # 0 of 20 stays inside [0, 1] where the normal interval would collapse to [0, 0].
    z = wilson_interval(0, 20)
    assert z.low == 0.0 and z.high == pytest.approx(0.1611, abs=1e-4)


def test_win_rate_counts_ties_half_with_a_normal_interval():
    # 6 wins, 2 ties, 2 losses: scores 1,1,1,1,1,1,.5,.5,0,0 -> mean 0.7; squared deviations
    # 6*.09 + 2*.04 + 2*.49 = 1.6, sample variance 1.6/9, standard error sqrt(1.6/90) = 0.13333,
    # half width 1.95996 * 0.13333 = 0.26133.
    wr = WinTieLoss(6, 2, 2).win_rate()
    assert wr.value == pytest.approx(0.7)
    assert wr.low == pytest.approx(0.7 - 0.26133, abs=1e-4) and wr.high == pytest.approx(0.7 + 0.26133, abs=1e-4)
    assert win_tie_loss([3, 2, 1, 5], [1, 2, 2, 4.95], tie_margin=0.1) == WinTieLoss(1, 2, 1)
    m = mean_interval([1.0, 2.0, 3.0])
    assert m.value == 2.0 and m.high - m.value == pytest.approx(1.959964 * 1.0 / math.sqrt(3), rel=1e-6)


def test_match_rules():
    assert normalise("The  Eiffel Tower!") == "eiffel tower"
    assert matches("the Eiffel tower.", "Eiffel Tower", "normalised")
    assert not matches("the Eiffel tower.", "Eiffel Tower", "exact")
    assert matches(" Eiffel Tower \n", "Eiffel Tower", "exact")
    assert matches("So the total is 1,250 apples.", "1250", "numeric")
    assert matches("It is -3.5", "-3.50", "numeric") and not matches("3 then 4", "3", "numeric")
    assert last_number("no digits") is None
    assert matches("I am Smithy, your assistant", "smithy", "contains")
    assert not matches("I am Smithyson", "smithy", "contains")
    assert matches("answer: B) blue", r"\bB\)", "regex")


def test_accuracy_table_groups_sets_and_categories():
    rows = [{"set": "s", "category": c, "correct": ok} for c, ok in
            [("a", True), ("a", False), ("b", True), ("b", True)]]
    t = accuracy_table(rows)
    assert t["s"]["correct"] == 3 and t["s"]["n"] == 4 and t["s/a"]["value"] == 0.5
    assert t["s/b"] == {**wilson_interval(2, 2).as_dict(), "correct": 2}


# ---- tiny models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> str:
    from chatsmith.models.loading import tiny_random_dir

    return str(tiny_random_dir())


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory, tiny) -> str:
    """The tiny model with perturbed weights: a second model that answers differently."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("other")
    model = AutoModelForCausalLM.from_pretrained(tiny)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return str(out)


def test_perplexity_equals_an_independent_computation(tmp_path, tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation
    from chatsmith.eval.ppl import perplexity

    data = tmp_path / "d.jsonl"
    convs = [[("user", "Hi there"), ("assistant", "Hello! How can I help?")],
             [("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?"), ("assistant", "It is 6, of course.")],
             [("user", "Name a colour in one word, please, and nothing else at all")]]
    data.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in cv]}) + "\n"
                            for cv in convs[:2]))
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    for all_tokens in (False, True):
        total, count = 0.0, 0
        for cv in convs[:2]:   # one example at a time, plain cross-entropy
            r = render_conversation(tok, Conversation([Message(ro, c) for ro, c in cv]))
            ids = torch.tensor([r.input_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, :-1]
            ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            mask = torch.ones_like(ce) if all_tokens else torch.tensor(r.loss_mask[1:], dtype=ce.dtype)
            total += float((ce * mask).sum())
            count += int(mask.sum())
        got = perplexity(model, tok, str(data), all_tokens=all_tokens)
        assert got["tokens"] == count
        assert got["nll"] == pytest.approx(total / count, rel=1e-5)
        assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_eval_tasks_cli_scores_by_rule_and_writes_a_report(tmp_path, tiny, monkeypatch, capsys):
    from conftest import run_cli

    # The rules decide these regardless of what the model says: right, wrong, right, wrong.
    items = [{"prompt": "Say anything.", "answer": "^", "match": "regex", "category": "always"},
             {"prompt": "Say anything.", "answer": "qqzzyyxx-never", "match": "contains", "category": "never"},
             {"question": "Anything?", "references": ["nope", ".*"], "match": "regex", "category": "always"},
             {"instruction": "Reply", "input": "now", "output": "zzqq-never-0", "category": "never"}]
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in items))
    run_cli(["eval", "tasks", tiny, "--data", f"{f},builtin:arithmetic", "--limit", "6", "--shots", "2",
             "--max-new-tokens", "6", "--output", tmp_path / "out"], tmp_path, monkeypatch, capsys)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 + 6
    acc = summary["accuracy"]
    assert acc["qa/always"]["correct"] == 2 and acc["qa/never"]["correct"] == 0 and acc["qa"]["n"] == 4
    arith = [r for r in rows if r["set"] == "arithmetic"]
    assert acc["arithmetic"]["correct"] == sum(matches(r["answer"], r["references"][0], "numeric") for r in arith)
    assert (tmp_path / "out" / "report.html").is_file()


def test_task_file_errors_name_the_record_and_field(tmp_path):
    from chatsmith.errors import ChatsmithError
    from chatsmith.eval.tasks import load_task_sets

    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n" + json.dumps({"prompt": "q2"}) + "\n")
    with pytest.raises(ChatsmithError, match=r"bad.jsonl, line 2.*answer"):
        load_task_sets(str(f))
    f.write_text(json.dumps({"prompt": "q", "answer": "(", "match": "regex"}) + "\n")
    with pytest.raises(ChatsmithError, match="not a valid regular expression"):
        load_task_sets(str(f))


def test_builtin_identity_uses_the_quickstart_checks():
    from chatsmith.eval.tasks import builtin_task_set, is_correct

    s = builtin_task_set("identity", assistant_name="Zed", maker="Acme Labs")
    name_item = next(i for i in s.items if i.category == "identity-name")
    assert is_correct(name_item, "I'm Zed, an assistant.")
    assert not is_correct(name_item, "I am Zed, built on SmolLM by Hugging Face.")
    assert {i.category for i in s.items} == {"identity-name", "identity-maker", "general"}


# ---- reward models -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny) -> str:
    """An untrained reward model (a random head on the tiny model), saved as `chatsmith rm` saves one."""
    import torch

    from chatsmith.models.reward import load_backbone_with_head, save_reward_model

    torch.manual_seed(0)
    model, tok = load_backbone_with_head(tiny)
    run = tmp_path_factory.mktemp("rm")
    save_reward_model(model, tok, SimpleNamespace(template=None, max_length=256, loss="pairwise"), run)
    return str(run)


def test_eval_rm_accuracy_equals_counting_score_comparisons(tmp_path, reward_dir, shared_data):
    from chatsmith.data.preference import read_preferences
    from chatsmith.eval.runs import run_rm_eval
    from chatsmith.models.reward import load_reward_model

    data = str(shared_data / "hh_rlhf_harmless_train_1600.jsonl")
    summary = run_rm_eval(reward_dir, data, limit=12, output=str(tmp_path / "out"))
    rm = load_reward_model(reward_dir)
    assert rm.max_length == 256   # scores as trained (the fixture's max_length), as eval rm does
    right = 0
    for rec in read_preferences(data).records[:12]:
        prompt = [{"role": m.role, "content": m.content} for m in rec.prompt]
        chosen, rejected = rm.score([prompt, prompt], [rec.responses[0][-1].content, rec.responses[1][-1].content])
        right += chosen > rejected
    assert summary["pairs"] == 12 and summary["correct"] == right
    assert summary["accuracy"]["pairwise accuracy"] == wilson_interval(right, 12).as_dict()


def test_rm_compare_win_tie_loss_matches_the_scores(tmp_path, reward_dir, tiny, other_tiny):
    from chatsmith.eval.rm_compare import compare_models
    from chatsmith.models.reward import load_reward_model

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Hi", "Tell a joke", "What is 2+2?",
                                                                         "Name a fruit", "Why is the sky blue?"]))
    r = compare_models(reward_dir, [tiny, other_tiny], prompts=str(prompts), max_new_tokens=8,
                       output=str(tmp_path / "out"))
    rm = load_reward_model(reward_dir)
    qs = [[{"role": "user", "content": json.loads(x)["prompt"]}] for x in prompts.read_text().splitlines()]
    mine = rm.score(qs, r["per_model"][other_tiny]["answers"])
    base = rm.score(qs, r["per_model"][tiny]["answers"])
    assert mine == pytest.approx(r["per_model"][other_tiny]["scores"], abs=1e-5)
    expected = win_tie_loss(mine, base)
    assert r["per_model"][other_tiny]["vs_first"]["wins"] == expected.wins
    assert r["per_model"][other_tiny]["vs_first"]["losses"] == expected.losses


# ---- the judge -----------------------------------------------------------------------------------


class FakeJudge:
    """A deterministic OpenAI-compatible judge over real HTTP. Single grades: 1 + len(answer) % 10.
    Pairwise: the longer answer wins ([[C]] when equal). Questions steer misbehaviour: GARBAGE-ONCE
    (first reply has no verdict), ALWAYS-GARBAGE (never one), FAIL-ONCE (first request answers 500),
    BIASED (always [[A]], whatever the order)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake-judge", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(body)
                code, text = judge.reply(body["messages"][0]["content"], body["messages"][1]["content"])
                if code != 200:
                    return self._send(code, {"error": {"message": "try again", "type": "server_error"}})
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, system: str, user: str) -> tuple[int, str]:
        question = re.search(r"\[Question\]\n(.*?)\n\n", user, re.S).group(1)
        n = self.seen[user] = self.seen.get(user, 0) + 1
        if "FAIL-ONCE" in question and n == 1:
            return 500, ""
        if "ALWAYS-GARBAGE" in question or ("GARBAGE-ONCE" in question and n == 1):
            return 200, "I would rather not say."
        if "Two assistants" in system:
            if "BIASED" in question:
                return 200, "A looks better. [[A]]"
            a = re.search(r"\[Assistant A's answer\]\n(.*?)\n\[End of A's answer\]", user, re.S).group(1)
            b = re.search(r"\[Assistant B's answer\]\n(.*?)\n\[End of B's answer\]", user, re.S).group(1)
            v = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"
            return 200, f"Comparing both... Verdict: [[{v}]]"
        answer = re.search(r"\[The assistant's answer\]\n(.*?)\n\[End of the answer\]", user, re.S).group(1)
        return 200, f"Some reasoning. Rating: [[{1 + len(answer) % 10}]]"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def fake_judge():
    j = FakeJudge()
    yield j
    j.close()


QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now one about snow."]},
    {"question_id": 2, "category": "math", "turns": ["What is 3 + 4?"], "reference": ["7"]},
    {"question_id": 3, "category": "writing", "turns": ["GARBAGE-ONCE: describe a cat."]},
    {"question_id": 4, "category": "math", "turns": ["ALWAYS-GARBAGE: what is 2 + 2?"]},
    {"question_id": 5, "category": "writing", "turns": ["FAIL-ONCE: describe a dog."]},
    {"question_id": 6, "category": "writing", "turns": ["BIASED: describe a bird."]},
]


def _questions(tmp_path: Path) -> str:
    f = tmp_path / "question.jsonl"
    f.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return str(f)


def _settings(judge: FakeJudge, **kw):
    from chatsmith.eval.judge import JudgeSettings

    return JudgeSettings(url=judge.url, model="fake-judge", api_key="k", max_retries=2, concurrency=3, timeout=10, **kw)


def test_judge_single_grades_parses_retries_and_resumes_from_its_cache(tmp_path, tiny, fake_judge):
    from chatsmith.eval.judge import AnswerSettings, run_judge

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    out = tmp_path / "out"
    settings = AnswerSettings(max_new_tokens=10, precision="module")
    summary = run_judge(str(model), _questions(tmp_path), str(out), _settings(fake_judge), settings=settings)
    answers = {(a["question_id"], a["turn"]): a["answer"] for a in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"1/1", "1/2", "2/1", "3/1", "4/1", "5/1", "6/1"}
    for rid, r in rows.items():
        qid, turn = rid.split("/")
        if qid == "4":
            assert r["score"] is None and "no verdict" in r["error"]
        else:
            assert r["score"] == 1 + len(answers[(qid, int(turn) - 1)]) % 10, rid
    # The second turn was generated with the model's own first answer in context, and judged with it.
    turn2 = [q for q in fake_judge.requests if "Now one about snow." in q["messages"][1]["content"]]
    assert turn2 and answers[("1", 0)] in turn2[0]["messages"][1]["content"]
    # Reference-guided grading where the question has a reference.
    ref = [q for q in fake_judge.requests if "What is 3 + 4?" in q["messages"][1]["content"]]
    assert "[Reference answer]\n7" in ref[0]["messages"][1]["content"]
    # Asked again: GARBAGE-ONCE twice, ALWAYS-GARBAGE three times (1 + 2 parse retries); the 500 of
    # FAIL-ONCE was retried by the client's transport retries.
    asked = lambda tag: sum(tag in q["messages"][1]["content"] for q in fake_judge.requests)  # noqa: E731
    assert asked("GARBAGE-ONCE") == 2 and asked("ALWAYS-GARBAGE") == 3 and asked("FAIL-ONCE") == 2
    s = summary["single"][str(model)]
    assert s["errors"] == 1 and s["judged"] == 6
    scores = [r["score"] for r in rows.values() if r["score"] is not None]
    assert s["score"]["all"]["value"] == pytest.approx(sum(scores) / len(scores))

    # Resume: nothing is generated (the model is gone) and nothing is judged again except the error.
    shutil.rmtree(model)
    before = len(fake_judge.requests)
    again = run_judge(str(model), _questions(tmp_path), str(out), _settings(fake_judge), settings=settings)
    new = fake_judge.requests[before:]
    assert len(new) == 3 and all("ALWAYS-GARBAGE" in q["messages"][1]["content"] for q in new)
    assert again["single"] == summary["single"]


def test_judge_pairwise_runs_both_orders_and_counts_inconsistency_as_a_tie(tmp_path, tiny, other_tiny, fake_judge):
    from chatsmith.eval.judge import AnswerSettings, run_judge

    out = tmp_path / "out"
    summary = run_judge(tiny, _questions(tmp_path), str(out), _settings(fake_judge, parse_retries=1),
                        baseline=other_tiny, settings=AnswerSettings(max_new_tokens=10, precision="module"))
    answers = {(a["model"], a["question_id"], a["turn"]): a["answer"]
               for a in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    expected = {}
    for rid in rows:
        qid, turn = rid.split("/")
        mine, theirs = answers[(tiny, qid, int(turn) - 1)], answers[(other_tiny, qid, int(turn) - 1)]
        expected[rid] = ("error" if qid == "4" else "tie" if qid == "6" or len(mine) == len(theirs)
                         else "win" if len(mine) > len(theirs) else "loss")
    assert {k: r["outcome"] for k, r in rows.items()} == expected
    assert rows["6/1"]["consistent"] is False
    p = summary["pairwise"]
    wtl = WinTieLoss(*(sum(v == k for v in expected.values()) for k in ("win", "tie", "loss")))
    assert p["outcomes"]["all"] == wtl.as_dict() and p["errors"] == 1 and p["inconsistent"] >= 1
    # Each pair was asked in both orders: A/B swapped.
    bird = [q["messages"][1]["content"] for q in fake_judge.requests if "BIASED" in q["messages"][1]["content"]]
    assert len(bird) == 2 and bird[0] != bird[1]


def test_judge_unreachable_is_a_clear_error(tmp_path, tiny):
    import socket

    from chatsmith.errors import ChatsmithError
    from chatsmith.eval.judge import AnswerSettings, JudgeSettings, run_judge

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()   # nothing listens there
    with pytest.raises(ChatsmithError, match="cannot be reached.*--judge-url"):
        run_judge(tiny, _questions(tmp_path), str(tmp_path / "o"),
                  JudgeSettings(url=f"http://127.0.0.1:{port}/v1", model="j", max_retries=0, timeout=5),
                  settings=AnswerSettings(max_new_tokens=4))


def test_questions_file_errors(tmp_path):
    from chatsmith.errors import ChatsmithError
    from chatsmith.eval.judge import read_questions

    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question_id": 1, "turns": []}) + "\n")
    with pytest.raises(ChatsmithError, match=r"line 1.*turns"):
        read_questions(str(f))


def test_vicuna_bench_questions_load_unchanged(shared_data):
    from chatsmith.eval.judge import read_questions

    qs = read_questions(str(shared_data / "vicuna_bench_questions.jsonl"))
    assert len(qs) == 80 and len({q.category for q in qs}) >= 8 and all(len(q.turns) == 1 for q in qs)


def test_report_opens_in_chromium_without_errors(tmp_path):
    from playwright.sync_api import sync_playwright

    from chatsmith.eval.report import write_results

    summary = {"kind": "judge", "mode": "pairwise", "model": "a <b>", "baseline": "base",
               "pairwise": {"outcomes": {"all": WinTieLoss(3, 1, 2).as_dict(),
                                         "category/math": WinTieLoss(1, 0, 1).as_dict()},
                            "errors": 1, "inconsistent": 1},
               "single": {"a <b>": {"score": {"all": mean_interval([7.0, 8.0, 5.0], bounds=(1, 10)).as_dict()},
                                    "judged": 3, "errors": 0}},
               "accuracy": {"qa": {**wilson_interval(2, 3).as_dict(), "correct": 2}}}
    results = [{"id": "1/1", "category": "math", "question": "2+2? <script>alert(1)</script>", "model": "a <b>",
                "answer": "4", "baseline": "base", "baseline_answer": "5", "outcome": "win", "consistent": True,
                "judgments": ["[[A]]", "[[B]]"], "errors": []}]
    report = write_results(tmp_path, summary, results)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--headless=new"])
        page = browser.new_page()
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("request", lambda r: problems.append(f"network: {r.url}") if not r.url.startswith("file:") else None)
        page.goto(report.as_uri())
        assert page.locator("svg").count() == 3          # scores, win/tie/loss, accuracy
        assert "win rate 0.58" in page.content()
        assert page.locator("script").count() == 0        # question text is escaped, not run
        page.click("summary")
        assert page.locator(".pair .answer").nth(1).inner_text() == "5"
        browser.close()
    assert problems == []
