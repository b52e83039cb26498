"""Typed configs: YAML is a saved instance; unknown keys and bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatsmith.config import SFTConfig, load_config, to_yaml
from chatsmith.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_unknown_key_names_itself_and_the_allowed_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-4\nlearning_rate: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p)
    msg = str(e.value)
    assert "unknown key 'learning_rate'" in msg and str(p) in msg
    assert "lr" in msg and "max_steps" in msg and "packing" in msg


def test_bad_choice_and_bad_type(tmp_path):
    with pytest.raises(ConfigError, match="method: 'lorax' is not one of full, freeze, lora"):
        load_config(SFTConfig, None, {"method": "lorax"})
    with pytest.raises(ConfigError, match="'batch_size' must be int"):
        load_config(SFTConfig, None, {"batch_size": "four"})


def test_flags_override_yaml_override_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.001\nbatch_size: 2\ndata: [a.json]\n")
    cfg = load_config(SFTConfig, p, {"batch_size": "8"})
    assert cfg.lr == 0.001 and cfg.batch_size == 8 and cfg.data == ["a.json"]
    assert cfg.method == SFTConfig().method


def test_yaml_round_trip(tmp_path):
    cfg = SFTConfig(lr=3e-4, data=["x.json:0.5"], columns={"prompt": "q"})
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(SFTConfig, p) == cfg


def test_every_recipe_loads():
    from chatsmith.config import DPOConfig, RMConfig

    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    # update when adding a recipe: 3 sft, 1 dpo, 2 rm, 1 grpo, 1 ppo
    assert len(recipes) == 8, [r.name for r in recipes]
    prefixes = [r.name.split("_")[0] for r in recipes]
    counts = {p: prefixes.count(p) for p in prefixes}
    assert counts == {"sft": 3, "dpo": 1, "rm": 2, "grpo": 1, "ppo": 1}, [r.name for r in recipes]
    stage_config = {"rm": RMConfig, "dpo": DPOConfig}   # by file-name prefix; sft_* and the rest: SFTConfig
    from chatsmith.config import GRPOConfig, PPOConfig

    stage_config.update({"grpo": GRPOConfig, "ppo": PPOConfig})   # run by tests/test_grpo.py, tests/test_ppo.py
    for r in recipes:
        cfg = load_config(stage_config.get(r.name.split("_")[0], SFTConfig), r)
        assert cfg.data, r
