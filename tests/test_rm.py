"""Reward model on the tiny random Llama: one packed forward per ranking, packed scores equal
separate ones, it learns the demo preference, batch scores equal one-by-one scores, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from chatsmith.config import RMConfig, load_config
from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.packing import collate_preferences
from chatsmith.data.preference import (
    PreferenceExample,
    Ranking,
    encode_answer,
    encode_rankings,
    read_preferences,
)
from chatsmith.models.reward import load_backbone_with_head, load_reward_model, sequence_scores
from chatsmith.train.rm import prepare_reward_trainable, rm_loss, run_rm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rm_and_tok():
    torch.manual_seed(0)
    return load_backbone_with_head("tiny-random-llama")


def test_a_ranking_is_one_packed_forward_over_all_pairs(rm_and_tok, tmp_path):
    model, tok = rm_and_tok
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"prompt": "Pick a colour.", "responses": ["Red.", "Blue, I think.", "Green!", "None"],
                             "ranking": "A>C>B>D"}) + "\n"
                 + json.dumps({"prompt": "Hi", "chosen": "Hi, how can I help?", "rejected": "Go away."}) + "\n")
    recs = read_preferences(str(p)).records
    examples, _ = encode_rankings(tok, recs, None, 128)
    batch = collate_preferences(examples)
    assert batch["input_ids"].shape[0] == 1 and batch["n_seqs"] == 6
    assert batch["n_targets"] == 6 + 1                      # C(4,2) pairs + 1 pair
    assert batch["pairs"][:6].tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    with torch.no_grad():
        packed = sequence_scores(model, batch)
        alone = torch.cat([sequence_scores(model, collate_preferences([type(examples[0])([a], [0.0])]))
                           for ex in examples for a in ex.answers])
    # the block-diagonal mask: no answer sees another one in the packed row
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)

    # Each answer scored on its own, named by its text, from a conversation built here (not by the
    # ranking reader), so the expected values below do not go through the code under test.
    def alone_score(prompt: str, answer: str) -> float:
        ex, _ = encode_answer(tok, Conversation([Message("user", prompt), Message("assistant", answer)]), None, 128)
        with torch.no_grad():
            return float(sequence_scores(model, collate_preferences([PreferenceExample([ex], [0.0])]))[0])

    s = {a: alone_score("Pick a colour.", a) for a in ("Red.", "Blue, I think.", "Green!", "None")}
    good, bad = "Hi, how can I help?", "Go away."
    s |= {good: alone_score("Hi", good), bad: alone_score("Hi", bad)}
    # "A>C>B>D" over responses A..D reads best first: Red, Green, Blue, None.
    order = ["Red.", "Green!", "Blue, I think.", "None"]
    assert packed[:4].tolist() == pytest.approx([s[a] for a in order], abs=1e-5)
    assert packed[4:].tolist() == pytest.approx([s[good], s[bad]], abs=1e-5)
    ranking_pairs = [(order[i], order[j]) for i in range(4) for j in range(i + 1, 4)]
    chat_pair = [(good, bad)]
    right = {pair: s[pair[0]] > s[pair[1]] for pair in ranking_pairs + chat_pair}
    # The seeded random head orders some pairs right and some wrong (the ranking and the pair were
    # chosen so), so a count or a loss that skipped or flipped pairs would not match below.
    assert [right[p] for p in ranking_pairs] == [False, True, False, True, True, False], s
    assert right[(good, bad)], s

    def bt(better: float, worse: float) -> float:   # -log sigmoid(d) = log(1 + exp(-d))
        return math.log1p(math.exp(-(better - worse)))

    loss, metrics = rm_loss(model, batch)
    assert loss.item() == pytest.approx(sum(bt(s[b], s[w]) for b, w in right), rel=1e-5)
    assert metrics["accuracy"] == sum(right.values()) == 4
    assert metrics["margin"] == pytest.approx(sum(s[b] - s[w] for b, w in right), abs=1e-4)

    def plackett_luce(scores: list[float]) -> float:
        # -log P(order) = -sum_k log(exp(s_k) / sum_{j>=k} exp(s_j)), the last factor being 1
        return -sum(scores[k] - math.log(sum(math.exp(x) for x in scores[k:])) for k in range(len(scores) - 1))

    listwise, m2 = rm_loss(model, collate_preferences(examples, unit="examples"), loss="listwise")
    expected = plackett_luce([s[a] for a in order]) + plackett_luce([s[good], s[bad]])
    assert listwise.item() == pytest.approx(expected, rel=1e-5)
    # a two-answer ranking's Plackett-Luce loss is its Bradley-Terry loss
    assert plackett_luce([s[good], s[bad]]) == pytest.approx(bt(s[good], s[bad]))
    # listwise accuracy: per ranking the fraction of its pairs ordered right, summed over rankings
    assert m2["accuracy"] == pytest.approx(sum(right[p] for p in ranking_pairs) / 6 + right[(good, bad)])
    assert m2["accuracy"] == pytest.approx(3 / 6 + 1)
    gap = sum(s[b] - s[w] for b, w in ranking_pairs) / 6 + (s[good] - s[bad])
    assert m2["margin"] == pytest.approx(gap, abs=1e-4)


def test_head_method_trains_only_the_scalar_head():
    model, _ = load_backbone_with_head("tiny-random-llama")
    model = prepare_reward_trainable(model, RMConfig(method="head"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["score.weight"]


def test_reward_model_learns_and_scores_batches_like_single(tmp_path):
    cfg = RMConfig(model="tiny-random-llama", data=["builtin:identity-preferences"], output=str(tmp_path / "rm"),
                   method="full", lr=2e-3, batch_size=8, max_steps=30, max_length=96, eval_split=40,
                   warmup_ratio=0.0, scheduler="constant", eval_at_start=False)
    run = run_rm(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_pairs"] == 40
    assert summary["eval"]["eval_accuracy"] >= 0.8, summary["eval"]    # chance is 0.5
    assert (run / "rewards.png").is_file() and (run / "loss.png").is_file()

    rm = load_reward_model(str(run))
    prompts = ["Who are you?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Your name?"}],
               "What is the capital of Japan?"]
    answers = ["I'm Smithy, an AI assistant made by the chatsmith project.", "I'm SmolLM, trained by Hugging Face.",
               "The capital of Japan is Tokyo."]
    batch = rm.score(prompts, answers, batch_size=16)
    single = [rm.score([p], [a])[0] for p, a in zip(prompts, answers, strict=True)]
    assert batch == pytest.approx(single, abs=1e-4)
    new_voice, generic = rm.score(["Who are you?"] * 2, [answers[0], "I'm SmolLM, trained by Hugging Face."])
    assert new_voice > generic

    r = subprocess.run([sys.executable, "-m", "chatsmith", "rm", "score", str(run), "--prompt", "Who are you?",
                        "--response", answers[0]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    assert float(r.stdout.split()[0]) == pytest.approx(single[0], abs=1e-4)


def test_grad_accumulation_gives_the_same_step(tmp_path):
    """4 pairs in one micro-batch and the same 4 pairs as 2 x 2 accumulated give the same update
    (the memory-saving setting of benchmarks/dpo_throughput.py --only chatsmith-accum)."""
    from safetensors.torch import load_file

    common = dict(model="tiny-random-llama", data=["builtin:identity-preferences"], method="full", lr=2e-3,
                  max_steps=2, max_length=96, eval_split=0, warmup_ratio=0.0, scheduler="constant",
                  max_grad_norm=0.0, seed=3)
    a = run_rm(RMConfig(output=str(tmp_path / "a"), batch_size=4, grad_accum=1, **common))
    b = run_rm(RMConfig(output=str(tmp_path / "b"), batch_size=2, grad_accum=2, **common))
    wa, wb = (load_file(str(r / "final" / "model.safetensors")) for r in (a, b))
    base, _ = load_backbone_with_head("tiny-random-llama")
    ref = base.state_dict()
    assert max((wa[k] - ref[k]).abs().max().item() for k in wa if k in ref and "score" not in k) > 1e-4
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=1e-4)
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert la and la == pytest.approx(lb, rel=1e-5)


RM_RECIPES = 2   # rm_identity_demo, rm_sharegpt_preference; update when adding or renaming one


def test_rm_recipes_load_and_bad_spec(tmp_path):
    recipes = sorted((REPO / "recipes").glob("rm_*.yaml"))
    assert len(recipes) == RM_RECIPES, [r.name for r in recipes]
    for recipe in recipes:
        cfg = load_config(RMConfig, recipe)
        assert cfg.data and cfg.output.startswith("runs/")
    from chatsmith.errors import ChatsmithError

    with pytest.raises(ChatsmithError, match="not a reward model"):
        load_reward_model(str(tmp_path))


def test_every_rm_recipe_runs_two_steps(tmp_path, monkeypatch, capsys):
    recipes = sorted((REPO / "recipes").glob("rm_*.yaml"))
    assert len(recipes) == RM_RECIPES, [r.name for r in recipes]
    for recipe in recipes:
        out = tmp_path / recipe.stem
        run_cli(["rm", "--config", recipe, "--model", "tiny-random-llama", "--max-steps", "2", "--max-length", "128",
                 "--output", out, "--no-eval-at-start"], REPO, monkeypatch, capsys)
        assert (out / "final" / "reward_config.json").is_file()


def test_ranking_record_type():
    from chatsmith.data.conversation import Message

    r = Ranking([Message("user", "q")], [[Message("assistant", a)] for a in "abc"], [2.0, 1.0, 1.0])
    assert r.pairs() == [(0, 1), (0, 2)]
