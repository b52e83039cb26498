"""Reward model on the tiny random Llama: one packed forward per ranking, packed scores equal
separate ones, it learns the demo preference, batch scores equal one-by-one scores, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatsmith.config import RMConfig, load_config
from chatsmith.data.packing import collate_preferences
from chatsmith.data.preference import Ranking, encode_rankings, read_preferences
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
                             "ranking": "B>A>D>C"}) + "\n"
                 + json.dumps({"prompt": "Hi", "chosen": "Hello there.", "rejected": "What?"}) + "\n")
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
    loss, metrics = rm_loss(model, batch)
    assert loss.item() > 0 and 0 <= metrics["accuracy"] <= 7
    listwise, m2 = rm_loss(model, collate_preferences(examples, unit="examples"), loss="listwise")
    assert listwise.item() > 0 and 0 <= m2["accuracy"] <= 2


def test_head_method_trains_only_the_scalar_head():
    model, _ = load_backbone_with_head("tiny-random-llama")
    model = prepare_reward_trainable(model, RMConfig(method="head"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["score.weight"]


def test_reward_model_learns_and_scores_batches_like_single(tmp_path):
    cfg = RMConfig(model="tiny-random-llama", data=["builtin:identity-preferences"], output=str(tmp_path / "rm"),
                   method="full", lr=2e-3, batch_size=8, max_steps=30, max_length=96, eval_split=40,
                   warmup_ratio=0.0, scheduler="constant")
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


def test_rm_recipes_load_and_bad_spec(tmp_path):
    for recipe in sorted((REPO / "recipes").glob("rm_*.yaml")):
        cfg = load_config(RMConfig, recipe)
        assert cfg.data and cfg.output.startswith("runs/")
    from chatsmith.errors import ChatsmithError

    with pytest.raises(ChatsmithError, match="not a reward model"):
        load_reward_model(str(tmp_path))


def test_every_rm_recipe_runs_two_steps(tmp_path):
    for recipe in sorted((REPO / "recipes").glob("rm_*.yaml")):
        out = tmp_path / recipe.stem
        r = subprocess.run([sys.executable, "-m", "chatsmith", "rm", "--config", str(recipe), "--model",
                            "tiny-random-llama", "--max-steps", "2", "--max-length", "128", "--output", str(out)],
                           capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, (recipe, r.stderr[-2000:])
        assert (out / "final" / "reward_config.json").is_file()


def test_ranking_record_type():
    from chatsmith.data.conversation import Message

    r = Ranking([Message("user", "q")], [[Message("assistant", a)] for a in "abc"], [2.0, 1.0, 1.0])
    assert r.pairs() == [(0, 1), (0, 2)]
