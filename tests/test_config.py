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
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(recipes) == 3, [r.name for r in recipes]  # update when adding a recipe
    for r in recipes:
        cfg = load_config(SFTConfig, r)
        assert cfg.data, r
