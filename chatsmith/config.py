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
    eval_split: float = _f(0.0, "fraction (<1) or number (>=1) of --data records held out for evaluation")
    eval_data: list[str] = _f([], "held-out file(s) to evaluate on instead of an --eval-split of --data, in any "
                              "format the stage reads for --data (several allowed)")
    eval_every: int = _f(0, "also evaluate every N steps (0: only at the start and the end)")
    eval_at_start: bool = _f(True, "evaluate the starting model before the first step: step 0 of every eval curve "
                             "(--no-eval-at-start saves that time)")
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
        validate_evaluation(self)


@dataclass
class EvalSuiteFields:
    """--eval-suite (sft, dpo, grpo): a task suite run at every evaluation."""

    eval_suite: str | None = _f(None, "task suite run at every evaluation (step 0, every --eval-every steps, the end): "
                                "comma-separated builtin:NAME (identity, arithmetic) or task files; its metrics "
                                "(suite/SET/accuracy) go to metrics.jsonl and the plots")
    eval_suite_max_new_tokens: int = _f(64, "tokens each --eval-suite answer may take")


@dataclass
class SFTConfig(EvalSuiteFields, TrainConfig):
    """Supervised fine-tuning."""

    packing: bool = _f(False, "pack several short examples into each --max-length row (no attention across examples)")


RM_METHODS = ("full", "freeze", "head", "lora", "dora")
RM_LOSSES = ("pairwise", "listwise")
DPO_LOSSES = ("dpo", "ipo", "cdpo", "kto", "orpo", "simpo", "rrhf")
DPO_METHODS = ("full", "freeze", "lora", "dora")
REF_MODES = ("auto", "precompute", "online")


@dataclass
class RMConfig(TrainConfig):
    """Reward model: a causal LM backbone with a scalar head, trained on pairs or rankings."""

    output: str = _f("runs/rm", "run directory (checkpoints, metrics, plots, final reward model)")
    method: str = _f("lora", "what to train (head: a frozen backbone, only the scalar head trains)", RM_METHODS)
    lr: float = _f(1e-4, "peak learning rate")
    batch_size: int = _f(8, "preference records (pairs or rankings) per micro-batch")
    max_length: int = _f(512, "tokens per prompt+answer; longer ones are truncated on the left of the prompt")
    eval_split: float | None = _f(None, "fraction (<1) or number (>=1) of --data records held out for pairwise "
                                  "accuracy (default: 0.1, or 0 with --eval-data)")
    loss: str = _f("pairwise", "pairwise: Bradley-Terry on every pair of a ranking; listwise: Plackett-Luce", RM_LOSSES)
    margin: float = _f(0.0, "Bradley-Terry margin: r_chosen - r_rejected must exceed it (a record's `margin` field wins)")

    def __post_init__(self) -> None:
        if self.eval_split is None:   # a reward model is judged on held-out pairs unless told otherwise
            self.eval_split = 0.0 if self.eval_data else 0.1
        super().__post_init__()


@dataclass
class DPOConfig(EvalSuiteFields, TrainConfig):
    """Direct preference optimisation and its RL-free relatives."""

    output: str = _f("runs/dpo", "run directory (checkpoints, metrics, plots, final model)")
    method: str = _f("lora", "what to train", DPO_METHODS)
    loss: str = _f("dpo", "preference loss", DPO_LOSSES)
    beta: float = _f(0.1, "dpo/ipo/cdpo/kto: KL strength; orpo: lambda; simpo: reward scale (try 2.0)")
    lr: float = _f(5e-5, "peak learning rate")
    batch_size: int = _f(4, "preference records per micro-batch")
    max_length: int = _f(512, "tokens per prompt+answer; longer ones are truncated on the left of the prompt")
    label_smoothing: float = _f(0.1, "cdpo: assumed rate of flipped labels (0 < eps < 0.5)")
    simpo_gamma: float = _f(0.5, "simpo: target reward margin gamma")
    rrhf_weight: float = _f(1.0, "rrhf: weight of the ranking term against the SFT term")
    desirable_weight: float = _f(1.0, "kto: weight of desirable answers")
    undesirable_weight: float = _f(1.0, "kto: weight of undesirable answers")
    ref_logps: str = _f("auto", "reference log-probs: auto (online with the adapter disabled for LoRA, "
                        "precomputed once for full/freeze), precompute or online", REF_MODES)


def validate_choices(cfg: Any) -> None:
    """Raise ConfigError naming the first field whose value is not one of its allowed choices."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{f.name}: '{value}' is not one of {', '.join(choices)}")


def validate_evaluation(cfg: Any) -> None:
    """Raise ConfigError for an evaluation setting that cannot work: a held-out set from two places,
    a negative count, an empty --eval-suite part, --eval-every with nothing to evaluate."""
    if cfg.eval_split is not None and cfg.eval_split < 0:
        raise ConfigError(f"eval_split must be >= 0 (a fraction below 1 or a number of records), got {cfg.eval_split}")
    if cfg.eval_data and cfg.eval_split:
        raise ConfigError(f"eval_data ({', '.join(cfg.eval_data)}) and eval_split ({cfg.eval_split}) are both set: the "
                          "held-out set comes from one place. Set eval_split to 0 (--eval-split 0) to evaluate on "
                          "the eval_data file(s), or drop eval_data to hold out part of --data")
    if any(not str(p).strip() for p in cfg.eval_data):
        raise ConfigError("eval_data holds an empty path: give held-out files, e.g. --eval-data heldout.jsonl")
    if cfg.eval_every < 0:
        raise ConfigError(f"eval_every must be >= 0 (0: evaluate only at the start and the end), got {cfg.eval_every}")
    suite = getattr(cfg, "eval_suite", None)
    if suite is not None:
        parts = [p.strip() for p in suite.split(",")]
        if not any(parts) or any(p in ("", "builtin:") for p in parts):
            raise ConfigError(f"eval_suite '{suite}': each comma-separated part must be builtin:NAME (identity, "
                              "arithmetic) or a task file, e.g. --eval-suite builtin:identity,my_questions.jsonl")
        if cfg.eval_suite_max_new_tokens < 1:
            raise ConfigError(f"eval_suite_max_new_tokens must be >= 1, got {cfg.eval_suite_max_new_tokens}")
    # Online RL always has held-out prompts when --data is a builtin task; elsewhere say it now.
    if cfg.eval_every and not isinstance(cfg, RLConfig) and not (cfg.eval_split or cfg.eval_data or suite):
        raise ConfigError(f"eval_every is {cfg.eval_every} but there is nothing to evaluate: pass --eval-data FILE "
                          "or --eval-split N" + (" or --eval-suite SPEC" if hasattr(cfg, "eval_suite") else ""))


def field_type(cls: type, name: str) -> Any:
    """The resolved type annotation of field `name` of dataclass `cls`."""
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
    try:
        return cls(**kwargs)
    except ConfigError as e:   # a check across fields (__post_init__): say which file it came from
        raise ConfigError(f"{where}: {e}") from None


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
    """The config as YAML text (what `--config` reads back)."""
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
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            text += f" (one of: {', '.join(f.metadata['choices'])})"
        if default not in (None, [], {}) and t is not bool:
            text += f" [default: {default}]"
        # argparse formats help with %: a literal % must be doubled.
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
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


# ---------------------------------------------------------------------------------------------
# Online RL (ppo, grpo)
# ---------------------------------------------------------------------------------------------
RL_METHODS = ("full", "freeze", "lora", "dora")
RL_ESTIMATORS = ("grpo", "rloo")
RL_AGGREGATIONS = ("token", "sequence", "dr_grpo")
ROLLOUT_ENGINES = ("builtin", "vllm")


@dataclass
class RLConfig(TrainConfig):
    """Flags shared by the online RL stages. --data gives prompts (builtin:arithmetic, builtin:format
    or JSON/JSONL records with a 'prompt' field); --max-steps counts optimizer steps."""

    method: str = _f("lora", "what to train; with lora/dora the reference is the base with the adapter disabled "
                     "(one model in memory), with full/freeze a frozen copy", RL_METHODS)
    batch_size: int = _f(4, "prompts per rollout")
    lr: float = _f(5e-5, "peak learning rate")
    warmup_ratio: float = _f(0.0, "fraction of steps spent warming the learning rate up from 0")
    scheduler: str = _f("constant", "learning-rate schedule after warmup", SCHEDULERS)
    max_length: int = _f(512, "prompt tokens + --max-new-tokens; longer prompts are dropped (counted)")
    reward: list[str] = _f([], "reward(s), SPEC[=WEIGHT]: exact_answer, last_number, format[:REGEX], length[:N], "
                           "module:function, path/to/file.py[:function], or a reward model directory from `chatsmith rm`")
    max_new_tokens: int = _f(32, "tokens generated per completion")
    temperature: float = _f(1.0, "sampling temperature of rollouts (1: the policy's own distribution)")
    top_p: float = _f(1.0, "nucleus sampling of rollouts (1: off)")
    top_k: int = _f(0, "top-k sampling of rollouts (0: off)")
    ppo_epochs: int = _f(1, "passes over each rollout batch")
    num_minibatches: int = _f(1, "optimizer steps per pass over a rollout batch")
    clip_eps: float = _f(0.2, "PPO ratio clip epsilon")
    clip_eps_high: float | None = _f(None, "upper ratio clip (DAPO clip-higher); default: --clip-eps")
    loss_aggregation: str = _f("token", "token: mean over all tokens; sequence: per-sequence mean then mean "
                               "(GRPO paper); dr_grpo: sum / (sequences x max-new-tokens)", RL_AGGREGATIONS)
    eval_prompts: int = _f(64, "held-out prompts answered greedily before/after training (0: all); a builtin:TASK "
                           "holds out its own, files are split by --eval-split or given by --eval-data")
    eval_every: int = _f(0, "also evaluate on the held-out prompts every N steps (0: only before and after)")
    generation_batch_size: int = _f(32, "sequences generated together by the rollout engine")
    rollout_engine: str = _f("builtin", "what generates rollouts and held-out answers: builtin (chatsmith's engine, "
                             "CPU or GPU, runs the live policy) or vllm (vLLM colocated on the CUDA GPU, the "
                             "policy's weights pushed to it before every rollout; pip install 'chatsmith[vllm]')",
                             ROLLOUT_ENGINES)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_new_tokens", "ppo_epochs", "num_minibatches", "batch_size", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 for rollouts (exploration needs sampling), got {self.temperature}")
        if self.max_new_tokens >= self.max_length:
            raise ConfigError(f"max_new_tokens ({self.max_new_tokens}) must be below max_length ({self.max_length})")
        per_rollout = self.ppo_epochs * self.num_minibatches
        if self.save_every and self.save_every % per_rollout:
            raise ConfigError(f"save_every ({self.save_every}) must be a multiple of ppo_epochs x num_minibatches "
                              f"({per_rollout}): checkpoints then fall between rollouts, so a resumed run "
                              "continues exactly as the interrupted one would have")


@dataclass
class GRPOConfig(EvalSuiteFields, RLConfig):
    """Group-relative policy optimisation (and RLOO): G completions per prompt, no critic."""

    output: str = _f("runs/grpo", "run directory (checkpoints, metrics, plots, final model)")
    estimator: str = _f("grpo", "grpo: group-normalised advantages; rloo: leave-one-out baseline", RL_ESTIMATORS)
    group_size: int = _f(8, "completions sampled per prompt (G)")
    scale_rewards: bool = _f(True, "divide group advantages by the group's std (off for Dr. GRPO)")
    kl_coef: float = _f(0.0, "beta: weight of the k3 KL to the reference (0 skips the reference forward)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (advantages compare completions of a prompt), got {self.group_size}")


@dataclass
class PPOConfig(RLConfig):
    """PPO with a critic (value head), a per-token KL penalty to the reference, and PPO-ptx."""

    output: str = _f("runs/ppo", "run directory (checkpoints, metrics, plots, final model)")
    ppo_epochs: int = _f(2, "passes over each rollout batch")
    num_minibatches: int = _f(2, "optimizer steps per pass over a rollout batch")
    batch_size: int = _f(16, "prompts per rollout")
    kl_coef: float = _f(0.05, "initial coefficient of the per-token KL penalty in the reward")
    adaptive_kl: bool = _f(True, "adapt the KL coefficient towards --kl-target (Ziegler et al. 2019)")
    kl_target: float = _f(1.0, "target KL per response (nats, summed over tokens): the KL budget")
    kl_horizon: int = _f(200, "adaptive KL horizon in episodes (smaller reacts faster)")
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE lambda")
    vf_coef: float = _f(0.1, "weight of the value loss")
    value_clip: float = _f(0.2, "value clipping range")
    ent_coef: float = _f(0.0, "entropy bonus weight")
    reward_norm: bool = _f(True, "normalise scores by running mean/std before adding the KL penalty")
    reward_clip: float = _f(5.0, "clip normalised scores to [-c, c] (0: off)")
    whiten_advantages: bool = _f(True, "whiten advantages over each rollout batch")
    ptx_data: list[str] = _f([], "PPO-ptx: SFT/pre-training data mixed into every step (files as for `chatsmith sft`)")
    ptx_coef: float = _f(0.0, "PPO-ptx: weight of the SFT loss on --ptx-data (InstructGPT used 27.8 with its own scaling)")
    ptx_batch_size: int = _f(4, "PPO-ptx: SFT examples per micro-batch")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("ptx_coef > 0 needs --ptx-data FILE (the SFT data to keep training on)")
