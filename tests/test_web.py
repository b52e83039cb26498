"""The web chat page in a real headless browser (Debian's chromium, driven by Playwright):
type a message, watch the answer stream in, stop one, export, and no console errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatsmith.serve.app import ServerState, ServerThread, load_state

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def url():
    state = ServerState("tiny-random-llama")
    with ServerThread(state) as base:
        load_state(state, "tiny-random-llama", max_concurrency=4, kv_cache_mb=8)
        yield base
        state.engine.stop()


def test_web_chat_streams_stops_and_exports(url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), "install Debian's chromium package (.ci/run does)"
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(accept_downloads=True)
        page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}")
                if "/v1/chat/completions" not in r.url else None)  # the stopped stream is aborted on purpose
        page.goto(url + "/")
        expect(page.locator("#model")).to_have_text("tiny-random-llama")

        # Settings: a system prompt and sampling values, through the keyboard shortcut.
        page.keyboard.press("Control+,")
        page.fill("#system", "You are terse.")
        page.fill("#temperature", "1.0")
        page.fill("#seed", "3")
        page.fill("#max_tokens", "1900")  # long enough to stop it while it is still streaming

        # 1. A long answer: see it stream (text while still busy), then stop it.
        page.fill("#input", "Tell me a very long story.")
        page.keyboard.press("Enter")
        answer = page.locator(".msg.assistant").nth(0)
        expect(answer).to_have_attribute("aria-busy", "true")
        page.wait_for_function(
            "() => { const m = document.querySelector('.msg.assistant');"
            " return m.getAttribute('aria-busy') === 'true' && m.querySelector('.content').textContent.trim().length > 20 }",
            timeout=20000)
        expect(page.locator("#stop")).to_be_visible()
        page.click("#stop")
        expect(answer).to_have_attribute("data-done", "true")
        expect(answer.locator(".note")).to_have_text("(stopped)")
        stopped_text = answer.locator(".content").inner_text()
        assert len(stopped_text.strip()) > 20

        # 2. A short second turn, sent with Enter, finishes by itself and reports its token count.
        page.fill("#max_tokens", "12")
        page.dispatch_event("#max_tokens", "change")
        page.fill("#input", "And a short one?")
        page.keyboard.press("Enter")
        second = page.locator(".msg.assistant").nth(1)
        expect(second).to_have_attribute("data-done", "true", timeout=20000)
        expect(second.locator(".note")).to_contain_text("12 tokens")
        assert page.locator(".msg.user").count() == 2

        # 3. Markdown and code render safely (escaped, with a copy button on code).
        html = page.evaluate("window.renderMarkdown('# Title\\n**bold** `x<y`\\n```python\\nif a < b:\\n    pass\\n```')")
        assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html
        assert '<pre><code class="language-python">if a &lt; b:' in html

        # 4. Export the conversation: system prompt plus both turns, with the stopped partial answer.
        with page.expect_download() as dl:
            page.click("#export-json")
        exported = json.loads(Path(dl.value.path()).read_text())
        roles = [m["role"] for m in exported["messages"]]
        assert roles == ["system", "user", "assistant", "user", "assistant"]
        assert exported["messages"][0]["content"] == "You are terse."
        assert exported["messages"][2]["content"].strip()[:10] == stopped_text.strip()[:10]

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "web_chat.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        browser.close()
    assert problems == []
