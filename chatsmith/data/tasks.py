"""Built-in RL task data: arithmetic word problems and format tasks, generated from a seed with a
fixed held-out split. No network, no files.

A task record is a dict: {"prompt": str, ...fields}. The fields (e.g. "answer", "pattern") are
passed to reward functions by name, like the columns of a user's prompt file.

The held-out split is drawn from the problem universe with a FIXED seed, independent of the
training seed, so every run evaluates on the same problems and never trains on them.
"""

from __future__ import annotations

import random
from typing import Any

from chatsmith.errors import ConfigError

TASKS = ("arithmetic", "arithmetic_mixed", "format")
HELDOUT_SEED = 1234
ANSWER_SUFFIX = "Answer with just the number."

_NAMES = ["Tom", "Ana", "Li", "Sam", "Mia", "Omar", "Eva", "Raj", "Zoe", "Ben"]
_THINGS = ["apples", "books", "coins", "pens", "stickers", "marbles", "cards", "shells"]
# (template, operation): {n} name, {x} thing, {a} {b} numbers.
_WORD_PROBLEMS = [
    ("{n} has {a} {x} and gets {b} more. How many {x} does {n} have now?", "+"),
    ("{n} had {a} {x}. A friend gave {n} {b} {x}. How many {x} does {n} have?", "+"),
    ("There are {a} {x} in a box and {b} {x} on the table. How many {x} are there in total?", "+"),
    ("What is {a} plus {b}?", "+"),
    ("What is {a} + {b}?", "+"),
    ("{n} has {a} {x} and gives away {b}. How many {x} are left?", "-"),
    ("There were {a} {x}. {n} took {b} of them. How many {x} remain?", "-"),
    ("What is {a} minus {b}?", "-"),
    ("What is {a} - {b}?", "-"),
]


def _arithmetic_universe(ops: str = "+-") -> list[tuple[int, int, int, int, int]]:
    """(template, a, b, name, thing) keys: single-digit sums, subtractions with a result >= 0."""
    keys = []
    for t, (_text, op) in enumerate(_WORD_PROBLEMS):
        if op not in ops:
            continue
        for a in range(1, 10) if op == "+" else range(2, 19):
            for b in range(1, 10):
                if op == "-" and b > a:
                    continue
                keys.append((t, a, b, (a * 7 + b * 3 + t) % len(_NAMES), (a + b * 5 + t) % len(_THINGS)))
    return keys


def _arithmetic_record(key: tuple[int, int, int, int, int]) -> dict[str, Any]:
    t, a, b, ni, xi = key
    text, op = _WORD_PROBLEMS[t]
    question = text.format(n=_NAMES[ni], x=_THINGS[xi], a=a, b=b)
    answer = a + b if op == "+" else a - b
    return {"prompt": f"{question} {ANSWER_SUFFIX}", "answer": str(answer), "task": "arithmetic"}


# (instruction, regex the whole reply must match)
_FORMATS = [
    ("Name a {topic}. Reply with one word in lowercase letters only.", r"^[a-z]+\.?$"),
    ("Name a {topic}. Reply with one word in UPPERCASE letters only.", r"^[A-Z]+\.?$"),
    ("Name three {topic}s as a comma-separated list, nothing else.", r"^[A-Za-z ]+(, ?[A-Za-z ]+){2}\.?$"),
    ("Name a {topic} and wrap it in <answer></answer> tags, nothing else.", r"^<answer>[^<>]+</answer>$"),
    ("Say yes or no: is a {topic} a living thing? Reply with yes or no only.", r"^(?i:yes|no)\.?$"),
]
_TOPICS = ["fruit", "colour", "animal", "country", "city", "vegetable", "flower", "tree", "tool", "sport",
           "instrument", "bird", "fish", "planet", "metal", "drink", "dessert", "vehicle", "insect", "river"]


def _format_universe() -> list[tuple[int, int]]:
    return [(f, t) for f in range(len(_FORMATS)) for t in range(len(_TOPICS))]


def _format_record(key: tuple[int, int]) -> dict[str, Any]:
    f, t = key
    text, pattern = _FORMATS[f]
    return {"prompt": text.format(topic=_TOPICS[t]), "pattern": pattern, "task": "format"}


# "arithmetic" is single-digit addition (word problems and bare sums): a 135M model answers it
# right some of the time, so RL has a signal to grow; "arithmetic_mixed" adds subtraction.
_BUILDERS = {"arithmetic": (lambda: _arithmetic_universe("+"), _arithmetic_record),
             "arithmetic_mixed": (_arithmetic_universe, _arithmetic_record),
             "format": (_format_universe, _format_record)}


def task_splits(task: str, n_heldout: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, held-out records) of a built-in task. The split is the same for every seed."""
    if task not in _BUILDERS:
        raise ConfigError(f"unknown built-in task '{task}'; choose one of {', '.join(TASKS)}")
    universe, build = _BUILDERS[task]
    keys = universe()
    random.Random(HELDOUT_SEED).shuffle(keys)
    n = n_heldout if n_heldout is not None else max(1, len(keys) // 5)
    if not 0 < n < len(keys):
        raise ConfigError(f"task '{task}' has {len(keys)} problems; a held-out split of {n} leaves none to train on")
    return [build(k) for k in keys[n:]], [build(k) for k in keys[:n]]


def task_records(task: str, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """`n` records of a split ("train" or "test"), shuffled with `seed` (all of them when n is None)."""
    train, test = task_splits(task)
    if split not in ("train", "test"):
        raise ConfigError(f"split must be train or test, got '{split}'")
    pool = list(train if split == "train" else test)
    random.Random(seed).shuffle(pool)
    return pool if n is None else pool[:n]


def parse_task_spec(spec: str) -> str | None:
    """'builtin:arithmetic' -> 'arithmetic'; None when `spec` is not a built-in task."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in TASKS:
            raise ConfigError(f"--data {spec}: unknown built-in task; choose builtin:{' or builtin:'.join(TASKS)}")
        return name
    return None
