"""Mixing: sizes follow the weights, upsampling repeats evenly, and the seed fixes everything."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import shared_file

from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.formats import read_conversations
from chatsmith.data.mixing import mix, mixture_sizes
from chatsmith.errors import ChatsmithError


def source(name: str, n: int) -> list[Conversation]:
    return [Conversation([Message("user", f"{name}{i}"), Message("assistant", "ok")], source=f"{name}, line {i + 1}")
            for i in range(n)]


def names(convs: list[Conversation]) -> list[str]:
    return [c.messages[0].content for c in convs]


def test_sizes_follow_weights() -> None:
    # total = 20; round(3/4 * 20) = 15 and round(1/4 * 20) = 5
    assert mixture_sizes([10, 10], [3.0, 1.0]) == [15, 5]
    assert mixture_sizes([100, 50], [0.5, 0.5]) == [75, 75]
    assert mixture_sizes([7, 3], [None, None]) == [7, 3]
    # A missing weight beside given ones counts as 1.0.
    assert mixture_sizes([10, 10], [None, 3.0]) == [5, 15]


def test_downsampling_is_without_replacement_and_upsampling_covers_every_record() -> None:
    a, b = source("a", 100), source("b", 50)
    mixed = mix([a, b], [1.0, 1.0], seed=0)
    assert len(mixed) == 150
    counts = Counter(names(mixed))
    a_counts = {k: v for k, v in counts.items() if k.startswith("a")}
    b_counts = {k: v for k, v in counts.items() if k.startswith("b")}
    assert sum(a_counts.values()) == 75 and set(a_counts.values()) == {1}       # 75 distinct of 100
    assert sum(b_counts.values()) == 75 and len(b_counts) == 50                 # all 50, then 25 repeats
    assert sorted(Counter(b_counts.values()).items()) == [(1, 25), (2, 25)]


def test_heavy_upsampling_is_even() -> None:
    # total 12: round(0.9 * 12) = 11 from a 2-record source -> 5 full passes + 1 extra.
    mixed = mix([source("a", 2), source("b", 10)], [0.9, 0.1], seed=3)
    counts = Counter(names(mixed))
    assert sorted((counts["a0"], counts["a1"])) == [5, 6]
    assert sum(v for k, v in counts.items() if k.startswith("b")) == 1


def test_deterministic_given_seed_and_shuffled() -> None:
    srcs = [source("a", 30), source("b", 10)]
    first, again = mix(srcs, [1, 2], seed=7), mix(srcs, [1, 2], seed=7)
    assert names(first) == names(again)
    assert names(mix(srcs, [1, 2], seed=8)) != names(first)
    assert names(first)[:10] != sorted(names(first))[:10]  # interleaved, not source by source


def test_no_weights_is_plain_concatenation() -> None:
    a, b = source("a", 3), source("b", 2)
    assert mix([a, b], [None, None], seed=1) == a + b


def test_real_files_mixed_half_and_half() -> None:
    alpaca = read_conversations(str(shared_file("alpaca_50.json"))).conversations
    sharegpt = read_conversations(str(shared_file("sharegpt_20.json"))).conversations
    mixed = mix([alpaca, sharegpt], [0.5, 0.5], seed=42)
    by_file = Counter(c.source.split(",")[0].rsplit("/", 1)[-1] for c in mixed)
    assert by_file == {"alpaca_50.json": 35, "sharegpt_20.json": 35}
    assert len({id(c) for c in mixed if "sharegpt" in c.source}) == 20   # every ShareGPT record used


def test_bad_weights() -> None:
    with pytest.raises(ChatsmithError, match="2 data sources but 1 weights"):
        mix([source("a", 1), source("b", 1)], [1.0], seed=0)
    with pytest.raises(ChatsmithError, match="data source 2: weight must be a positive number"):
        mix([source("a", 1), source("b", 1)], [1.0, 0.0], seed=0)
    with pytest.raises(ChatsmithError, match="data source 2 has no records"):
        mix([source("a", 4), []], [1.0, 1.0], seed=0)
