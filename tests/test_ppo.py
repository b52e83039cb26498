"""PPO through the one training loop: a bandit where reward must go up with the value head, KL
penalty and adaptive coefficient; the CLI with a reward file, PPO-ptx and the memory-lean LoRA
default (no reference copy)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import torch
from test_grpo import bandit_prompts, target_fraction, tiny_vocab_model

from chatsmith.config import PPOConfig
from chatsmith.infer.engine import Engine
from chatsmith.models.value_head import PolicyWithValueHead
from chatsmith.train.ppo import AdaptiveKLController, RunningMoments, ppo_targets, ppo_trainer
from chatsmith.train.rl_batches import Episode


def test_bandit_reward_goes_up_with_critic_and_kl(tmp_path):
    policy = tiny_vocab_model()
    ref = copy.deepcopy(policy).eval()
    model = PolicyWithValueHead(policy)
    cfg = PPOConfig(model="unused", output=str(tmp_path), method="full", batch_size=16, max_new_tokens=8,
                    max_length=64, lr=1e-2, max_steps=40, ppo_epochs=2, num_minibatches=2, kl_coef=0.01,
                    kl_target=2.0, vf_coef=0.5, seed=0)
    engine = Engine(policy, None, max_batch_size=32)
    trainer, rollouts, kl_ctl = ppo_trainer(cfg, model, ref, engine, bandit_prompts(16), steps=cfg.max_steps,
                                            score=target_fraction, run=tmp_path, stop_ids=set())
    trainer.fit()
    h = [r for r in trainer.history if "reward_mean" in r]
    assert rollouts.rollouts == 10
    assert h[0]["reward_mean"] < 0.2, [r["reward_mean"] for r in h]
    assert max(r["reward_mean"] for r in h[-4:]) > 0.45, [r["reward_mean"] for r in h]
    assert h[-1]["kl"] > h[0]["kl"]                       # the policy moved away from the reference
    assert kl_ctl.value != cfg.kl_coef                    # and the controller reacted
    assert all(k in h[-1] for k in ("value_loss", "clip_frac", "entropy", "explained_variance", "response_length"))


def test_ppo_targets_kl_penalty_and_gae():
    """Score 1 at the last token, KL penalty 0.1 per nat, gamma=lam=1, zero values: the advantage
    of each token is the sum of the rewards from it to the end."""
    e = Episode([1], [5, 6], [-1.0, -2.0], {})
    e.ref_logprobs, e.values = [-1.5, -2.0], [0.0, 0.0]
    stats = ppo_targets([e], [1.0], kl_coef=0.1, gamma=1.0, lam=1.0, whiten_advantages=False)
    # per-token KL (k1): [0.5, 0.0]; rewards [-0.05, 1.0]; advantages [0.95, 1.0]
    assert stats["kl"] == 0.5
    torch.testing.assert_close(torch.tensor(e.advantages), torch.tensor([0.95, 1.0]))
    torch.testing.assert_close(torch.tensor(e.returns), torch.tensor([0.95, 1.0]))


def test_adaptive_kl_and_running_moments():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    assert abs(ctl.update(2.0, 5) - 0.1 * (1 + 0.2 * 0.5)) < 1e-12   # error clipped to +0.2
    assert ctl.update(0.5, 10) < 0.11                                 # KL below target: coefficient shrinks
    m = RunningMoments()
    m.update([1.0, 3.0])
    m.update([5.0])
    assert abs(m.mean - 3.0) < 1e-3 and abs(m.std - (8 / 3) ** 0.5) < 1e-2


def test_cli_ppo_lora_with_ptx(tmp_path, shared_data):
    (tmp_path / "r.py").write_text("def reward(prompts, completions, **kw):\n"
                                   "    return [len(c) / 100.0 for c in completions]\n")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "chatsmith", "ppo", "--model", "tiny-random-llama",
                        "--data", "builtin:format", "--reward", "r.py", "--output", str(out), "--batch-size", "4",
                        "--max-new-tokens", "8", "--max-steps", "4", "--eval-prompts", "4",
                        "--ptx-data", f"{shared_data}/alpaca_50.json", "--ptx-coef", "0.5", "--max-length", "128"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PPO-ptx: " in r.stderr
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "loss" in x]
    assert len(steps) == 4 and all(x["ptx_loss"] > 5 for x in steps)   # an untrained tiny model: NLL ~ ln(49k)
    assert all(k in steps[-1] for k in ("kl", "kl_coef", "value_loss", "explained_variance", "reward_mean"))
    assert (out / "value_head.safetensors").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "rl.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rollouts"] == 1 and summary["after"]["eval_prompts"] == 4
