"""A run that crashes and is resumed ends with the weights of the run that never stopped (within
1e-4), for rm, dpo, ppo and grpo (sft: tests/test_train.py, with a real SIGKILL). The crash comes
right after a step that is not a checkpoint, so the resumed run also redoes lost work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import Crash
from safetensors.torch import load_file

from chatsmith.config import DPOConfig, GRPOConfig, PPOConfig, RMConfig


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def crash_then_resume(run_fn, cfg_cls, common: dict, tmp_path: Path, crash_after_step, at: int) -> tuple[Path, Path]:
    clean = run_fn(cfg_cls(output=str(tmp_path / "clean"), **common))
    crash_after_step(at)
    with pytest.raises(Crash):
        run_fn(cfg_cls(output=str(tmp_path / "crash"), **common))
    assert not (tmp_path / "crash" / "final").exists()
    resumed = run_fn(cfg_cls(output=str(tmp_path / "crash"), resume=True, **common))
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"] == at - at % common["save_every"]
    steps = [r["step"] for r in records(resumed) if "loss" in r]
    assert steps == list(range(1, common["max_steps"] + 1))   # no step logged twice, none lost
    # Evaluations: step 0 (the starting model) is logged once, by the first attempt, and the resumed
    # run's evaluations are the uninterrupted run's.
    evals_clean = [r for r in records(clean) if "loss" not in r or any(k.startswith("eval_") for k in r)]
    evals_resumed = [r for r in records(resumed) if "loss" not in r or any(k.startswith("eval_") for k in r)]
    assert [r["step"] for r in evals_resumed] == [r["step"] for r in evals_clean]
    assert [r["step"] for r in evals_resumed].count(0) == (1 if evals_clean else 0)
    for a, b in zip(evals_clean, evals_resumed, strict=True):
        for k in (k for k in a if k.startswith("eval_") and not k.endswith("_time_s")):
            assert b[k] == pytest.approx(a[k], abs=1e-4), (a["step"], k)
    start = "before" if "before" in summary else "eval_start"   # rl: before/after; the others: eval_start/eval
    clean_start = json.loads((clean / "summary.json").read_text())[start]
    assert {k: v for k, v in summary[start].items() if k != "samples"} == pytest.approx(
        {k: v for k, v in clean_start.items() if k != "samples"}, abs=1e-4)
    wc, wr = weights(clean), weights(resumed)
    for k in wc:
        torch.testing.assert_close(wr[k], wc[k], atol=1e-4, rtol=0, msg=k)
    from chatsmith.models.loading import tiny_random_dir

    base = load_file(str(tiny_random_dir() / "model.safetensors"))
    moved = max((wc[k] - base[k]).abs().max().item() for k in wc if k in base)
    assert moved > 1e-3, moved   # training moved the weights well beyond the tolerance
    return clean, resumed


def test_rm_resume_equals_uninterrupted(tmp_path, crash_after_step):
    from chatsmith.train.rm import run_rm

    common = dict(model="tiny-random-llama", data=["builtin:identity-preferences"], method="lora", lora_r=4,
                  max_steps=6, batch_size=4, lr=5e-3, max_length=96, eval_split=8, eval_every=2, save_every=2,
                  seed=1)
    clean, resumed = crash_then_resume(run_rm, RMConfig, common, tmp_path, crash_after_step, at=5)
    assert [r["step"] for r in records(resumed) if "eval_loss" in r] == [0, 2, 4, 6]


def test_dpo_resume_equals_uninterrupted(tmp_path, crash_after_step):
    from chatsmith.train.dpo import run_dpo

    common = dict(model="tiny-random-llama", data=["builtin:identity-preferences"], method="lora", lora_r=4,
                  lora_dropout=0.1, max_steps=6, batch_size=4, lr=3e-2, max_length=96, eval_split=0, save_every=2,
                  seed=2)
    crash_then_resume(run_dpo, DPOConfig, common, tmp_path, crash_after_step, at=3)


@pytest.fixture
def reward_file(tmp_path):
    (tmp_path / "chars.py").write_text("def reward(prompts, completions, **kw):\n"
                                       "    return [len(c) / 40.0 for c in completions]\n")
    old = os.getcwd()
    os.chdir(tmp_path)
    yield "chars.py"
    os.chdir(old)


def test_grpo_resume_equals_uninterrupted(tmp_path, crash_after_step, reward_file):
    from chatsmith.train.grpo import run_grpo

    common = dict(model="tiny-random-llama", data=["builtin:arithmetic"], reward=[reward_file], method="lora",
                  lora_r=4, batch_size=2, group_size=4, max_new_tokens=6, max_steps=6, lr=5e-2, eval_prompts=2,
                  save_every=2, seed=3)
    clean, resumed = crash_then_resume(run_grpo, GRPOConfig, common, tmp_path, crash_after_step, at=3)
    # The rollouts after the resume are the uninterrupted run's rollouts.
    rc = [r["reward_mean"] for r in records(clean) if "loss" in r]
    rr = [r["reward_mean"] for r in records(resumed) if "loss" in r]
    assert rr == pytest.approx(rc, abs=1e-6)


def test_ppo_resume_restores_kl_controller_and_reward_moments(tmp_path, crash_after_step, reward_file):
    """PPO's adaptive KL coefficient and reward-normalisation moments travel in the checkpoint: a
    resumed run computes the same rewards and KL penalties as the uninterrupted one."""
    from chatsmith.train.ppo import run_ppo

    common = dict(model="tiny-random-llama", data=["builtin:arithmetic"], reward=[reward_file], method="lora",
                  lora_r=4, batch_size=4, ppo_epochs=1, num_minibatches=2, max_new_tokens=6, max_steps=6, lr=2e-2,
                  kl_coef=0.2, kl_target=0.01, kl_horizon=8, eval_prompts=2, save_every=2, seed=4)
    clean, resumed = crash_then_resume(run_ppo, PPOConfig, common, tmp_path, crash_after_step, at=5)
    kc = [r["kl_coef"] for r in records(clean) if "loss" in r]
    kr = [r["kl_coef"] for r in records(resumed) if "loss" in r]
    assert kc[-1] != kc[0]                      # the controller moved: the check below is not vacuous
    assert kr == pytest.approx(kc, rel=1e-9)   # and the resumed run continued from where it was
    vc = load_file(str(clean / "value_head.safetensors"))
    vr = load_file(str(resumed / "value_head.safetensors"))
    for k in vc:
        torch.testing.assert_close(vr[k], vc[k], atol=1e-4, rtol=0)


def test_rl_checkpoints_must_fall_between_rollouts():
    from chatsmith.errors import ConfigError

    with pytest.raises(ConfigError, match=r"save_every \(3\) must be a multiple of ppo_epochs x num_minibatches \(4\)"):
        PPOConfig(reward=["length"], save_every=3, ppo_epochs=2, num_minibatches=2)
