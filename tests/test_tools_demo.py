"""The built-in tool-use set and its scoring (the SFT demo itself is benchmarks/tool_sft_demo.py, numbers
in docs/tools.md): training conversations render with the calls trained and results not, held-out
prompts share no phrasing with training, scores judge what they claim, and the demo's evaluation
runs on a tiny model (forced calls are all valid)."""

from __future__ import annotations

import sys
from pathlib import Path

from chatsmith.data.template import render_conversation
from chatsmith.data.tool_demo import HeldOut, safe_eval, score_answer, tool_heldout_set, tool_train_set

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "%s"}}\n</tool_call>'


def test_train_set_renders_calls_trained_and_results_not(tokenizer):
    train = tool_train_set(60, seed=0)
    assert train == tool_train_set(60, seed=0) and train != tool_train_set(60, seed=1)
    kinds = {m.tool_calls[0]["name"] for c in train for m in c.messages if m.tool_calls}
    assert kinds == {"calculator", "get_weather"} and any(len(c.messages) == 2 for c in train)   # and plain chat
    conv = next(c for c in train if any(m.tool_calls for m in c.messages))
    r = render_conversation(tokenizer, conv)
    trained = tokenizer.decode([t for t, m in zip(r.input_ids, r.loss_mask) if m])
    result = conv.messages[2].content
    assert "<tool_call>" in trained and conv.messages[3].content in trained
    assert result in r.text and result not in trained and "<tool_response>" not in trained


def test_heldout_prompts_are_new_and_scoring_is_exact():
    held = tool_heldout_set(40)
    train_prompts = {c.messages[0].content for c in tool_train_set(240)}
    assert len(held) == 40 and not {h.prompt for h in held} & train_prompts
    assert {h.tool for h in held} == {"calculator", "get_weather"}
    h = HeldOut("17 times 23?", "calculator", {"expression": "17 * 23"})
    assert score_answer(CALL % "17*23", h) == (True, True)           # judged by value, not by spelling
    assert score_answer(CALL % "17 + 23", h) == (True, False)
    assert score_answer("It is 391.", h) == (False, False)
    assert score_answer('<tool_call>\n{"name": "calculator", "arguments": {}}\n</tool_call>', h) == (False, False)
    w = HeldOut("Weather in Vienna?", "get_weather", {"city": "Vienna", "unit": "celsius"})
    assert score_answer('<tool_call>{"name": "get_weather", "arguments": {"city": "vienna", "unit": "celsius"}}'
                        '</tool_call>', w) == (True, True)
    assert score_answer('<tool_call>{"name": "get_weather", "arguments": {"city": "Vienna", "unit": "kelvin"}}'
                        '</tool_call>', w) == (False, False)               # outside the enum: not valid
    assert safe_eval("(2 + 3) * -4 / 2") == -10
    for bad in ("__import__('os')", "2 ** 3", "1 / 0"):
        try:
            safe_eval(bad)
            raise AssertionError(bad)
        except ValueError:
            pass


def test_demo_evaluation_on_a_tiny_model():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from tool_sft_demo import evaluate
    finally:
        sys.path.pop(0)
    held = tool_heldout_set(4)
    forced = evaluate("tiny-random-llama", held, "module", constrained=True, max_tokens=48)
    assert forced["valid"] == 1.0 and forced["n"] == 4
