"""Rewards: built-in verifiable checks, user functions (module:function and file paths), weighted
combination, and clear errors."""

from __future__ import annotations

import sys

import pytest

from chatsmith.errors import ConfigError
from chatsmith.eval.rewards import exact_answer, last_number, load_reward, load_rewards


def test_exact_answer_is_strict():
    comps = ["7", " 7. ", "7 apples", "The answer is 7", "-3", "8"]
    assert exact_answer([""] * 6, comps, answer=["7", "7", "7", "7", "-3", "7"]) == [1, 1, 0, 0, 1, 0]


def test_last_number_is_lenient():
    comps = ["3 + 4 = 7", "It is 7.", "7 or 8", "none", "1,000 coins"]
    assert last_number([""] * 5, comps, answer=["7", "7", "7", "7", "1000"]) == [1, 1, 0, 0, 1]


def test_format_from_field_and_from_spec():
    fmt = load_reward("format").fn
    assert fmt(["", ""], ["apple", "Apple"], pattern=[r"^[a-z]+$", r"^[a-z]+$"]) == [1.0, 0.0]
    fixed = load_reward(r"format:^\d+$").fn
    assert fixed(["", ""], ["42", "4 2"]) == [1.0, 0.0]


def test_length_reward_uses_token_counts():
    r = load_reward("length:10").fn
    assert r(["", "", ""], ["a", "b", "c"], completion_tokens=[10, 5, 30]) == [1.0, 0.5, 0.0]


def test_weighted_combination_and_components():
    rs = load_rewards(["last_number", "exact_answer=0.5"])
    total, parts = rs.score(["q", "q"], ["2 + 2 = 4", "4"], {"answer": ["4", "4"]})
    assert total == [1.0, 1.5]
    assert parts == {"last_number": [1.0, 1.0], "exact_answer": [0.0, 1.0]}


def test_user_function_from_file_and_module(tmp_path, monkeypatch):
    f = tmp_path / "scorers.py"
    f.write_text("def reward(prompts, completions, **fields):\n    return [len(c) for c in completions]\n"
                 "def shout(prompts, completions, topic):\n    return [float(c.isupper()) for c in completions]\n")
    by_path = load_reward(f"{f}=2")
    assert by_path.weight == 2.0 and by_path.fn(["p"], ["abc"]) == [3]
    named = load_reward(f"{f}:shout")
    # only the fields a function names are passed to it
    rs = load_rewards([f"{f}:shout"])
    assert rs.score(["p", "p"], ["HI", "hi"], {"topic": ["a", "b"], "answer": ["1", "2"]})[0] == [1.0, 0.0]
    assert named.name == "scorers:shout"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert load_reward("scorers:shout").fn([""], ["OK"], topic=["x"]) == [1.0]


def test_bad_specs_and_bad_returns_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not a built-in reward"):
        load_reward("no_such_reward")
    with pytest.raises(ConfigError, match="does not exist"):
        load_reward(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="cannot import module 'nope_mod_xyz'"):
        load_reward("nope_mod_xyz:fn")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        load_reward("format:([")
    with pytest.raises(ConfigError, match="needs a 'answer' field"):
        load_rewards(["exact_answer"]).score(["p"], ["1"], {"pattern": ["x"]})
    f = tmp_path / "bad.py"
    f.write_text("def reward(prompts, completions, **k):\n    return [1.0]\n"
                 "def nan(prompts, completions, **k):\n    return [float('nan')] * len(completions)\n")
    with pytest.raises(ConfigError, match="returned 1 values for 2 completions"):
        load_rewards([str(f)]).score(["a", "b"], ["x", "y"], {})
    with pytest.raises(ConfigError, match="non-finite"):
        load_rewards([f"{f}:nan"]).score(["a"], ["x"], {})
    with pytest.raises(ConfigError, match="no reward"):
        load_rewards([])


def test_reward_model_directory_is_scored(tmp_path):
    """A reward model directory from `chatsmith rm` becomes a reward function that returns exactly the
    model's scores (conversation prompts from a "messages" field), and the model trained here ranks a
    chosen-style answer above a rejected-style one on prompts it never saw."""
    import json

    import torch

    from chatsmith.config import RMConfig
    from chatsmith.models.reward import load_reward_model
    from chatsmith.train.rm import run_rm

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"I will not say {i}."} for i in range(8)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = run_rm(RMConfig(model="tiny-random-llama", data=[str(pairs)], output=str(tmp_path / "rm"), method="full",
                          lr=2e-3, max_steps=5, batch_size=8, eval_split=0, warmup_ratio=0.0,
                          scheduler="constant"))
    r = load_reward(str(run))
    assert r.name == "reward_model"

    prompts = ["Say 1", "Say 2", "Say 12", "Say 12"]
    completions = ["1", "no", "12", "I will not say 12."]
    scores = r.fn(prompts, completions)
    rm = load_reward_model(str(run))
    assert scores == pytest.approx(rm.score(prompts, completions), abs=1e-5)
    assert all(isinstance(s, float) for s in scores)

    # The score by hand: the saved *ForSequenceClassification model, one plain forward of the
    # tokenizer's own chat template, the head read at the answer's end-of-turn token.
    model, tok = rm.model, rm.tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")

    def by_hand(messages: list[dict[str, str]], answer: str) -> float:
        ids = tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True,
                                      return_dict=True)["input_ids"]
        last = max(i for i, t in enumerate(ids) if t == eot)
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, last]
            return float(model.score(hidden))

    for p, c, s in zip(prompts, completions, scores, strict=True):
        assert s == pytest.approx(by_hand([{"role": "user", "content": p}], c), abs=1e-4)

    # A "messages" field (the conversation) replaces the prompt text, so a system turn changes the score.
    system = [{"role": "system", "content": "Answer with the number only."}, {"role": "user", "content": "Say 12"}]
    with_messages = r.fn(["Say 12"], ["12"], messages=[system])
    assert with_messages == pytest.approx(rm.score([system], ["12"]), abs=1e-5)
    assert with_messages[0] == pytest.approx(by_hand(system, "12"), abs=1e-4)
    assert abs(with_messages[0] - scores[2]) > 1e-3

    # Trained on "Say 0".."Say 7": it prefers the bare number on held-out prompts too. Measured score
    # gaps (chosen - rejected) on these four: untrained (lr 0) 0.02-0.03, already positive, so the
    # bar is a gap the training made: 5 steps give 1.56-1.75 (one LoRA step at lr 1e-4, as this test
    # once ran, gives 0.03-0.05).
    held_out = [f"Say {i}" for i in (12, 30, 55, 99)]
    chosen = r.fn(held_out, [p.split()[1] for p in held_out])
    rejected = r.fn(held_out, [f"I will not say {p.split()[1]}." for p in held_out])
    assert all(c - w > 0.5 for c, w in zip(chosen, rejected, strict=True)), (chosen, rejected)
