"""Built-in RL tasks: deterministic, correct answers, disjoint held-out splits, readable by the
rollout code."""

from __future__ import annotations

import re

import pytest

from chatsmith.data.tasks import parse_task_spec, task_records, task_splits
from chatsmith.errors import ConfigError
from chatsmith.eval.rewards import exact_answer, format_match


@pytest.mark.parametrize("task", ["arithmetic", "arithmetic_mixed"])
def test_arithmetic_answers_are_right_and_splits_disjoint(task):
    train, test = task_splits(task)
    assert len(test) >= 80 and len(test) == (len(train) + len(test)) // 5
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    subtractions = [r for r in train + test if re.search(r"minus| - |gives away|took", r["prompt"])]
    assert (len(subtractions) > 100) == (task == "arithmetic_mixed") and (task == "arithmetic_mixed" or not subtractions)
    for r in train + test:
        nums = [int(x) for x in re.findall(r"\d+", r["prompt"])]
        a, b = nums[0], nums[1]
        op = "-" if re.search(r"minus| - |gives away|took", r["prompt"]) else "+"
        assert int(r["answer"]) == (a + b if op == "+" else a - b), r
        assert int(r["answer"]) >= 0
    # the reward agrees with the generated answers
    assert exact_answer([r["prompt"] for r in test], [r["answer"] for r in test],
                        answer=[r["answer"] for r in test]) == [1.0] * len(test)


def test_splits_ignore_the_training_seed_and_records_are_seeded():
    assert task_records("arithmetic", "test", seed=0) != task_records("arithmetic", "test", seed=1)   # order only
    assert sorted(r["prompt"] for r in task_records("arithmetic", "test", seed=0)) == \
        sorted(r["prompt"] for r in task_records("arithmetic", "test", seed=1))
    assert task_records("arithmetic", "train", n=5, seed=3) == task_records("arithmetic", "train", n=5, seed=3)


def test_format_task_patterns_accept_a_good_reply():
    train, test = task_splits("format")
    good = {r"^[a-z]+\.?$": "apple", r"^[A-Z]+\.?$": "APPLE", r"^<answer>[^<>]+</answer>$": "<answer>oak</answer>",
            r"^[A-Za-z ]+(, ?[A-Za-z ]+){2}\.?$": "red, green, blue", r"^(?i:yes|no)\.?$": "Yes"}
    recs = train + test
    scores = format_match()([r["prompt"] for r in recs], [good[r["pattern"]] for r in recs],
                            pattern=[r["pattern"] for r in recs])
    assert scores == [1.0] * len(recs)
    assert format_match()(["p"], ["I think apple"], pattern=[r"^[a-z]+\.?$"]) == [0.0]


def test_task_specs():
    assert parse_task_spec("builtin:arithmetic") == "arithmetic"
    assert parse_task_spec("prompts.jsonl") is None
    with pytest.raises(ConfigError, match="builtin:arithmetic or builtin:arithmetic_mixed"):
        parse_task_spec("builtin:chess")
