"""`chatsmith label` in a real headless browser (Debian's chromium, driven by Playwright): answers
sampled through the engine, two items ranked with the keyboard (one with a tie), the server
restarted, one item skipped, one ranked by dragging with its best answer edited; then the files
are read back by the readers `chatsmith rm` and `chatsmith dpo` use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatsmith.data.preference import read_preferences
from chatsmith.datagen.label import (
    LabelServer,
    LabelSettings,
    LabelStore,
    order_text,
    sample_answers,
    scores_from,
)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
PROMPTS = [[{"role": "user", "content": q}] for q in
           ("Name a colour.", "What is two plus two?", "Say hello in French.", "Describe the sea.")]


def test_scores_from_ranking_with_ties():
    # B > A = D > C: three groups, scored 2, 1, 1, 0.
    assert scores_from([1, 0, 3, 2], [False, False, True, False]) == {1: 2.0, 0: 1.0, 3: 1.0, 2: 0.0}
    assert order_text([1, 0, 3, 2], [False, False, True, False], list("ABCD")) == "B>A=D>C"
    assert scores_from([0, 1], [False, True]) == {0: 0.0, 1: 0.0}


class FakeEngineAnswers:
    """Fixed answers for store-level tests that need no model."""

    @staticmethod
    def fill(store: LabelStore) -> None:
        for i in range(len(store.prompts)):
            store.put_answers(i, [f"answer {c} to {i}" for c in "ABCD"])


def test_store_validates_saves_and_resumes(tmp_path):
    out = tmp_path / "r.jsonl"
    store = LabelStore(PROMPTS, str(out), LabelSettings(model="m"))
    FakeEngineAnswers.fill(store)
    for bad in ({"index": 0, "action": "rank", "order": [0, 1, 2]}, {"index": 0, "action": "rank", "order": [0, 0, 1, 2]},
                {"index": 9, "action": "skip"}, {"index": 0, "action": "maybe"}):
        with pytest.raises(ValueError):
            store.decide(bad)
    store.decide({"index": 0, "action": "rank", "order": [3, 2, 1, 0], "tied": [False, True, True, True]})
    store.decide({"index": 1, "action": "skip"})
    with pytest.raises(ValueError, match="decided already"):
        store.decide({"index": 1, "action": "skip"})
    assert out.read_text() == ""      # all four tied: nothing to learn, no ranked list
    # A crash that lost the outputs but kept the decision log: the restart rewrites them.
    again = LabelStore(PROMPTS, str(out), LabelSettings(model="m"))
    assert again.progress() == {"total": 4, "ranked": 1, "skipped": 1, "sampled": 4}
    assert again.next_item()["index"] == 2 and again.missing_answers() == []


@pytest.fixture(scope="module")
def engine():
    from chatsmith.eval.answers import load_engine

    e = load_engine("tiny-random-llama", "module", max_batch_size=16)
    yield e
    e.stop()


def _card(page, letter):
    return page.locator(f"#answers li[data-letter='{letter}']")


def _order(page) -> str:
    return "".join(page.locator("#answers li").evaluate_all("els => els.map(e => e.dataset.letter)"))


def test_label_page_keyboard_drag_restart(tmp_path, engine):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), "install Debian's chromium package (.ci/run does)"
    out = tmp_path / "labels" / "rankings.jsonl"
    settings = LabelSettings(model="tiny-random-llama", k=4, temperature=1.0, max_new_tokens=8, seed=1)
    store = LabelStore(PROMPTS, str(out), settings)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        with LabelServer(store) as url:
            page.goto(url + "/")
            # The page opens before any answer exists and waits for the sampler.
            expect(page.locator("#status")).to_contain_text("Sampling answers for prompt 1")
            sample_answers(store, lambda: engine, progress=lambda _: None)
            assert all(len(store.answers[i]) == 4 for i in range(4)), store.answers
            expect(page.locator("#item-number")).to_have_text("1 of 4")
            expect(page.locator("#prompt")).to_have_text("Name a colour.")

            # Item 1, keyboard: B > A > D > C, then Enter.
            for key in "2143":
                page.keyboard.press(key)
            assert _order(page) == "BADC"
            page.keyboard.press("Enter")
            expect(page.locator("#item-number")).to_have_text("2 of 4")
            expect(page.locator("#progress-text")).to_contain_text("1 / 4 done")

            # Item 2, keyboard with a tie: C = A > B > D.
            for key in ("3", "=", "1", "2", "4"):
                page.keyboard.press(key)
            assert _order(page) == "CABD"
            expect(_card(page, "A")).to_have_class("answer placed tied")
            page.keyboard.press("Enter")
            expect(page.locator("#item-number")).to_have_text("3 of 4")

        # Restart the server (a new process would read the same files): it continues at item 3.
        store2 = LabelStore(PROMPTS, str(out), settings)
        assert store2.missing_answers() == []          # the sampled answers were kept: no sampling again
        with LabelServer(store2) as url2:
            page.goto(url2 + "/")
            expect(page.locator("#item-number")).to_have_text("3 of 4")
            expect(page.locator("#progress-text")).to_contain_text("2 / 4 done · 2 ranked · 0 skipped")

            # Item 3: skipped with the keyboard.
            page.keyboard.press("s")
            expect(page.locator("#item-number")).to_have_text("4 of 4")

            # Item 4: drag D to the top, then edit the best answer.
            page.drag_and_drop("#answers li[data-letter='D']", "#answers li[data-letter='A']")
            assert _order(page) == "DABC"
            page.click("#edit-best")
            page.fill("#edit", "The sea is vast, salty and restless.")
            page.click("#edit-done")
            expect(page.locator("#answers li").first.locator(".text")).to_have_text(
                "The sea is vast, salty and restless.")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "label_page.png"), full_page=True)
            page.click("#save")
            expect(page.locator("#status")).to_have_text("All prompts are done; the rankings are saved.")
            expect(page.locator("#progress-text")).to_contain_text("4 / 4 done · 3 ranked · 1 skipped")
        browser.close()
    assert problems == []

    answers = store2.answers
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["order"] for r in rows] == ["B>A>D>C", "C=A>B>D", "edited>D>A>B>C"]
    assert rows[0]["prompt"] == "Name a colour."
    assert dict(zip(rows[0]["responses"], rows[0]["scores"])) == {
        answers[0][1]: 3.0, answers[0][0]: 2.0, answers[0][3]: 1.0, answers[0][2]: 0.0}
    assert dict(zip(rows[1]["responses"], rows[1]["scores"])) == {
        answers[1][2]: 2.0, answers[1][0]: 2.0, answers[1][1]: 1.0, answers[1][3]: 0.0}
    assert rows[2]["responses"][0] == "The sea is vast, salty and restless." and rows[2]["scores"][0] == 4.0
    log = [json.loads(line) for line in (tmp_path / "labels" / "rankings.labels.jsonl").read_text().splitlines()]
    assert [r["action"] for r in log] == ["rank", "rank", "skip", "rank"]

    # `chatsmith rm` / `dpo --loss rrhf` read the ranked lists as they are: best first, ties kept.
    rankings = read_preferences(str(out)).records
    assert len(rankings) == 3
    assert rankings[0].responses[0][0].content == answers[0][1] and rankings[0].scores == [3.0, 2.0, 1.0, 0.0]
    assert len(rankings[1].pairs()) == 5          # C=A form no pair: 6 - 1
    assert rankings[2].responses[0][0].content == "The sea is vast, salty and restless."
    # `chatsmith dpo` reads the pairs: 6 + 5 + 10 (five answers with the edited one).
    pairs = read_preferences(str(tmp_path / "labels" / "rankings.pairs.jsonl")).records
    assert len(pairs) == 21
