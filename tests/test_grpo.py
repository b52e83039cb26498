"""GRPO/RLOO on tiny models through the one training loop: rollout log-probs equal the trainer's
after an update, a bandit task where RL must raise the reward, the CLI end to end, and resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from chatsmith.config import GRPOConfig
from chatsmith.data.prompts import Prompt
from chatsmith.infer.engine import Engine
from chatsmith.infer.sampling import SamplingParams
from chatsmith.train.grpo import grpo_trainer
from chatsmith.train.rl_batches import Episode
from chatsmith.train.rollout import completion_logprobs

REPO = Path(__file__).resolve().parents[1]
TARGET = 3   # the bandit's rewarded token id


def tiny_vocab_model(seed: int = 0):
    """A seeded 2-layer Llama over a 16-token vocabulary: a random policy hits TARGET 1/16 of the time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=15, pad_token_id=0)
    return LlamaForCausalLM(cfg).float()


def bandit_prompts(n: int = 8) -> list[Prompt]:
    g = torch.Generator().manual_seed(1)
    return [Prompt(torch.randint(1, 15, (4,), generator=g).tolist(), "", {}) for _ in range(n)]


def target_fraction(episodes: list[Episode]) -> dict[str, float]:
    for e in episodes:
        e.reward = sum(t == TARGET for t in e.completion_ids) / len(e.completion_ids)
    return {}


def rl_cfg(tmp_path: Path, **kw) -> GRPOConfig:
    base = dict(model="unused", output=str(tmp_path), method="full", batch_size=4, group_size=8, max_new_tokens=8,
                max_length=64, lr=2e-2, max_grad_norm=1.0, seed=0, save_every=0)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_bandit_reward_goes_up(tmp_path, estimator):
    """Reward = fraction of generated tokens equal to TARGET: starts near 1/16 and must pass 0.5."""
    model = tiny_vocab_model()
    cfg = rl_cfg(tmp_path, estimator=estimator, max_steps=25)
    engine = Engine(model, None, max_batch_size=32)
    trainer, source = grpo_trainer(cfg, model, None, engine, bandit_prompts(), steps=cfg.max_steps,
                                   score=target_fraction, run=tmp_path, stop_ids=set())
    trainer.fit()
    rewards = [r["reward_mean"] for r in trainer.history if "reward_mean" in r]
    assert rewards[0] < 0.2, rewards
    assert max(rewards[-5:]) > 0.5, rewards
    assert source.rollouts == 25


def test_rollout_logprobs_match_trainer_after_update(tmp_path):
    """After optimizer steps, the engine (sync_weights called) samples with the updated policy and
    its log-probs equal the trainer's packed-forward log-probs for the same tokens."""
    from chatsmith.models import load_model
    from chatsmith.models.adapters import prepare_trainable

    base, _ = load_model("tiny-random-llama", dtype=torch.float32)
    cfg = rl_cfg(tmp_path, method="lora", lr=5e-2, max_steps=2, kl_coef=0.1, lora_r=4, lora_alpha=8)
    model = prepare_trainable(base, cfg)
    from chatsmith.models.attention import enable_segment_attention

    assert enable_segment_attention(model)   # the trainer's packed forward, as in `chatsmith grpo`
    engine = Engine(model, None, max_batch_size=16)
    prompts = [Prompt(ids, "", {}) for ids in ([1, 520, 3412, 30], [1, 28, 9, 4000, 77, 12], [1, 5])]

    def score(episodes):   # any reward with spread will move the weights
        for i, e in enumerate(episodes):
            e.reward = float(i % 3)
        return {}

    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10, seed=7)
    ids = [p.ids for p in prompts]
    before = engine.generate(ids, params, stop_ids=set())
    trainer, _ = grpo_trainer(cfg, model, None, engine, prompts, steps=2, score=score, run=tmp_path, stop_ids=set())
    trainer.fit()
    engine.sync_weights()
    after = engine.generate(ids, params, stop_ids=set())
    eps = [Episode(p, c.token_ids, c.logprobs, {}) for p, c in zip(ids, after)]
    trainer_lp, _ = completion_logprobs(trainer.unwrapped(), eps)
    for c, lp in zip(after, trainer_lp):
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(lp), atol=2e-4, rtol=1e-4)
    # Non-vacuous: the update changed the policy's log-probs of the same tokens.
    old_eps = [Episode(p, c.token_ids, c.logprobs, {}) for p, c in zip(ids, before)]
    new_lp, _ = completion_logprobs(trainer.unwrapped(), old_eps)
    moved = max(abs(a - b) for c, lp in zip(before, new_lp) for a, b in zip(c.logprobs, lp))
    assert moved > 1e-2, moved


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatsmith", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_grpo_with_user_reward_file_and_resume(tmp_path):
    """`chatsmith grpo` end to end on the tiny model with a reward given as a file path, two
    weighted rewards, checkpoints, and --resume finishing the run."""
    (tmp_path / "my_reward.py").write_text(
        "def reward(prompts, completions, answer, **fields):\n"
        "    return [float(len(c) > 0) + 0.0 * len(a) for c, a in zip(completions, answer)]\n")
    out = tmp_path / "run"
    common = ["grpo", "--model", "tiny-random-llama", "--data", "builtin:arithmetic", "--reward",
              "my_reward.py=0.5", "exact_answer", "--output", str(out), "--batch-size", "2", "--group-size", "4",
              "--max-new-tokens", "8", "--eval-prompts", "4", "--save-every", "2", "--kl-coef", "0.05"]
    r = _cli(*common, "--max-steps", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli(*common, "--max-steps", "4", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint at step 2" in r.stderr
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in records if "loss" in x]
    assert steps == [1, 2, 3, 4]
    assert all("reward_my_reward:reward" in x and "kl" in x for x in records if "loss" in x)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["eval_prompts"] == 4 and summary["resumed_from"] == 2
    assert (out / "rl.png").is_file() and (out / "final" / "config.json").is_file()


def test_cli_grpo_rejects_bad_reward(tmp_path, capsys):
    from chatsmith.cli import main

    code = main(["grpo", "--model", "tiny-random-llama", "--data", "builtin:arithmetic", "--reward", "no_such_thing",
                 "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--reward no_such_thing" in err and "exact_answer" in err
    assert not (tmp_path / "x").exists()   # rejected before anything was written or loaded


def test_every_rl_recipe_runs_two_steps(tmp_path, monkeypatch, capsys):
    """Every grpo_*/ppo_* recipe runs (on the tiny model, 2 steps)."""
    grpo, ppo = sorted((REPO / "recipes").glob("grpo_*.yaml")), sorted((REPO / "recipes").glob("ppo_*.yaml"))
    # update when adding or renaming one: grpo_arithmetic, ppo_arithmetic
    assert (len(grpo), len(ppo)) == (1, 1), [r.name for r in grpo + ppo]
    recipes = grpo + ppo
    for recipe in recipes:
        out = tmp_path / recipe.stem
        command = recipe.name.split("_")[0]
        run_cli([command, "--config", recipe, "--model", "tiny-random-llama", "--max-steps", "2", "--output", out,
                 "--eval-prompts", "2", "--batch-size", "2"], REPO, monkeypatch, capsys)
        assert (out / "final" / "config.json").is_file()


def test_rollout_engine_slots_hold_max_length_not_the_whole_context(tmp_path):
    """The rollout engine's KV slots are sized to --max-length (every prompt + completion fits it), not to
    the model's context: on a GPU the cache is allocated up front, generation_batch_size x slot tokens."""
    from chatsmith.train.rl import prepare_rl

    cfg = rl_cfg(tmp_path, model="tiny-random-llama", data=["builtin:arithmetic"], reward=["last_number"],
                 max_length=96, max_new_tokens=12, generation_batch_size=8, eval_prompts=4)
    setup = prepare_rl(cfg, need_reference=False)
    assert setup.engine.context > 96 and setup.engine.slot_tokens == 96 == setup.engine.runner.slot_tokens
    assert max(len(p.ids) for p in setup.prompts + setup.held) + cfg.max_new_tokens <= 96
