"""Typed configuration for every stage. A YAML file is only a saved instance of these dataclasses.

Precedence: dataclass defaults < YAML (`--config`) < command-line flags. Unknown keys and values
outside a field's choices are rejected at load time with a message naming the key and the allowed
values (STYLE.md, principle 5).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from chatsmith.errors import ConfigError

T = TypeVar("T")

METHODS = ("full", "freeze", "lora", "dora", "qlora", "prompt", "prefix", "adapter")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    """Flags shared by every training stage (sft, rm, dpo, ppo, grpo)."""

    model: str = _f("smollm2-135m", "model: alias (see `chatsmith models`), HF directory, run directory, adapter directory, .gguf file or hub id")
    data: list[str] = _f([], "data files as PATH or PATH:WEIGHT (mixing weight); several allowed")
    output: str = _f("runs/sft", "run directory (checkpoints, metrics, plots, final model)")
    method: str = _f("lora", "what to train", METHODS)
    max_steps: int = _f(-1, "optimizer steps to run; -1 means --epochs over the data")
    epochs: float = _f(1.0, "passes over the training data when --max-steps is -1")
    batch_size: int = _f(4, "examples per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(2e-4, "peak learning rate")
    max_length: int = _f(1024, "tokens per example; longer ones are truncated (counted and reported)")
    eval_split: float = _f(0.0, "fraction (<1) or number (>=1) of records held out for evaluation")
    eval_every: int = _f(0, "evaluate every N steps (0: only at the end)")
    save_every: int = _f(0, "write a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "how many of the latest checkpoints to keep")
    seed: int = _f(42, "random seed (data order, initialisation, dropout)")
    resume: bool = _f(False, "continue from the latest checkpoint in --output")
    scheduler: str = _f("cosine", "learning-rate schedule after warmup", SCHEDULERS)
    warmup_ratio: float = _f(0.05, "fraction of steps spent warming the learning rate up from 0")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "clip gradients to this global norm (0: no clipping)")
    precision: str = _f("auto", "auto: bf16 on a GPU that supports it, else fp32", PRECISIONS)
    log_every: int = _f(1, "log metrics every N steps")
    template: str | None = _f(None, "chat template: the model's own (default) or chatml, llama-3, alpaca, vicuna, zephyr")
    system_prompt: str | None = _f(None, "system prompt added to conversations that have none")
    trust_remote_code: bool = _f(False, "allow model code from the model's directory or hub repo to run")
    skip_bad: bool = _f(False, "drop malformed records (and report how many) instead of stopping")
    columns: dict[str, str] = _f({}, "column mapping for CSV/Parquet/JSONL, e.g. {prompt: question, response: answer}")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    # adapters
    lora_r: int = _f(16, "LoRA/DoRA rank")
    lora_alpha: int = _f(32, "LoRA/DoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    lora_targets: str = _f("all-linear", "modules to adapt: all-linear or a comma list such as q_proj,v_proj")
    freeze_trainable_layers: int = _f(2, "--method freeze: train only the last N transformer blocks (and the final norm)")
    num_virtual_tokens: int = _f(20, "--method prompt/prefix/adapter: learned virtual tokens")
    adapter_layers: int = _f(8, "--method adapter: LLaMA-Adapter layers (counted from the top)")

    def __post_init__(self) -> None:
        validate_choices(self)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning."""

    packing: bool = _f(False, "pack several short examples into each --max-length row (no attention across examples)")


def validate_choices(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{f.name}: '{value}' is not one of {', '.join(choices)}")


def field_type(cls: type, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[name]


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    t = field_type(cls, name)
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None:
            return None
        t = next(a for a in args if a is not type(None))
        origin = typing.get_origin(t)
    try:
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
        if origin is list:
            return [str(v) for v in (value if isinstance(value, list) else [value])]
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{name}' must be {getattr(t, '__name__', t)}, got {value!r}") from None
    return value


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build `cls` from a mapping, rejecting unknown keys with the list of allowed ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        k = key.replace("-", "_")
        if k not in names:
            raise ConfigError(f"{where}: unknown key '{key}'. Allowed keys: {', '.join(names)}")
        kwargs[k] = _coerce(cls, k, value, where)
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults < YAML file < overrides (the flags the user actually passed)."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of keys to values at the top level")
        values.update(loaded)
        where = str(p)
    else:
        where = "config"
    for k, v in (overrides or {}).items():
        values[k.replace("-", "_")] = v
    return from_dict(cls, values, where)


def to_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)


def add_dataclass_arguments(parser: Any, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Expose every field of `cls` as a --flag (default SUPPRESS: only given flags override)."""
    import argparse

    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        t = field_type(cls, f.name)
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(t) is list:
            parser.add_argument(flag, nargs="+", metavar=f.name.upper(), **kw)
        elif typing.get_origin(t) is dict:
            parser.add_argument(flag, type=_parse_mapping, metavar="K=V,...", **kw)
        else:
            parser.add_argument(flag, metavar=f.name.upper(), **kw)


def _parse_mapping(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"expected KEY=VALUE pairs separated by commas, got '{text}'")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out
