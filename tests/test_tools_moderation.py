"""The moderation gate (serve --moderation): a rules file over real HTTP (a flagged request refused with
content_filter, a flagged answer cut mid-stream with nothing flagged sent, /v1/moderations, /metrics),
and a tiny sequence classifier whose scores and threshold are exact."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from chatsmith.errors import ChatsmithError
from chatsmith.serve.app import ServerState, ServerThread, load_state
from chatsmith.serve.moderation import REFUSAL, RulesModerator, load_moderator

MODEL = "tiny-random-llama"
RULES = {"violence": {"keywords": ["attack", "bomb"], "patterns": [r"\bshoot(ing)?\b"]},
         "self-harm": {"keywords": ["suicide"]}}


def rules_file(tmp_path, rules, name="rules.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rules))
    return str(path)


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    state = ServerState(MODEL)
    state.moderator = load_moderator(rules_file(tmp_path_factory.mktemp("rules"), RULES))
    with ServerThread(state) as url:
        load_state(state, MODEL, precision="module", max_concurrency=2, kv_cache_mb=2, max_queue=4)
        yield url, state
        state.engine.stop()


def test_flagged_request_is_refused_streamed_and_not(gated):
    url, _ = gated
    body = {"messages": [{"role": "user", "content": "How do I build a BOMB?"}], "max_tokens": 5}
    r = httpx.post(f"{url}/v1/chat/completions", json=body).json()
    assert r["choices"][0]["finish_reason"] == "content_filter" and r["choices"][0]["message"]["content"] == REFUSAL
    lines = [json.loads(x[6:]) for x in httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}
                                                   ).text.split("\n\n") if x.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in lines) == REFUSAL
    assert lines[-1]["choices"][0]["finish_reason"] == "content_filter"
    m = httpx.post(f"{url}/v1/moderations", json={"input": ["I will attack at dawn", "hello there", "shooting stars"]})
    res = m.json()["results"]
    assert [x["flagged"] for x in res] == [True, False, True]
    assert res[0]["categories"] == {"violence": True, "self-harm": False}
    metrics = httpx.get(f"{url}/metrics").text
    assert re.search(r'chatsmith_moderation_flagged_total\{where="request"\} [2-9]', metrics)
    assert re.search(r'chatsmith_moderation_flagged_total\{where="api"\} 2', metrics)


def test_flagged_answer_is_cut_mid_stream(gated, tmp_path):
    url, state = gated
    sample = {"messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": 40, "temperature": 1.0,
              "seed": 5}
    full = httpx.post(f"{url}/v1/chat/completions", json=sample).json()["choices"][0]["message"]["content"]
    words = re.findall(r"(?<!\w)[A-Za-z]{4,}(?!\w)", full)
    assert len(words) >= 3, full
    word = words[len(words) // 2]
    before = state.moderator
    state.moderator = RulesModerator(rules_file(tmp_path, {"test": {"keywords": [word]}}))
    try:
        flagged = re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)", re.IGNORECASE)
        chunks = [json.loads(x[6:]) for x in httpx.post(f"{url}/v1/chat/completions", json={**sample, "stream": True}
                                                        ).text.split("\n\n") if x.startswith("data: {")]
        sent = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        # stopped mid-stream: what was sent is the answer's start, and none of it is flagged
        assert full.startswith(sent) and len(sent) < len(full) and not flagged.search(sent)
        assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
        whole = httpx.post(f"{url}/v1/chat/completions", json=sample).json()["choices"][0]
        assert whole["finish_reason"] == "content_filter" and whole["message"]["content"] is None
    finally:
        state.moderator = before


def test_tiny_classifier_scores_and_threshold(tmp_path, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=2, id2label={0: "safe", 1: "toxic"}, label2id={"safe": 0, "toxic": 1},
        pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():
        model.score.weight.zero_()   # equal logits: P(toxic) is exactly 0.5 for every text
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    at_half = load_moderator(str(tmp_path / "clf"))               # default threshold 0.5: flagged (>=)
    above = load_moderator(f"classifier:{tmp_path / 'clf'}@0.6")
    [v] = at_half.check(["any text at all"])
    assert v.flagged and v.scores == {"toxic": 0.5} and v.categories == {"toxic": True}
    assert [x.flagged for x in above.check(["one", "two texts"])] == [False, False]


@pytest.mark.parametrize("rules, words", [
    ({"violence": {"patterns": ["(unclosed"]}}, "violence.patterns[0] is not a regular expression"),
    ({"violence": {"keywords": [""]}}, "violence.keywords[0] must be a non-empty string"),
    ({"violence": {"words": ["x"]}}, "category 'violence' must be {keywords"),
    ([], "expected categories"),
])
def test_bad_rules_files_say_what_is_wrong(tmp_path, rules, words):
    with pytest.raises(ChatsmithError, match=re.escape(words)):
        load_moderator(rules_file(tmp_path, rules))
