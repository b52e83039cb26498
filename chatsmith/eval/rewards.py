"""Rewards for online RL: built-in verifiable ones, user functions, a reward model, and a weighted
combination of several.

A reward function takes (prompts: list[str], completions: list[str], **fields) and returns one
float per completion; `fields` holds the other columns of the prompt records as lists (e.g.
answer=[...], pattern=[...]), so a task's ground truth reaches its checker by name (the same
convention as TRL's reward functions).

--reward SPEC[=WEIGHT], several allowed:
  exact_answer           1 if the reply is exactly the number in the record's "answer" field
  last_number            1 if the last number in the reply equals "answer" (lenient)
  format[:REGEX]         1 if the whole reply matches REGEX (default: the record's "pattern")
  length[:N]             1 - |reply tokens - N| / N, floored at 0 (N defaults to 32)
  module:function        a Python function importable from the current directory or PYTHONPATH
  path/to/file.py[:fn]   a function in a file (fn defaults to `reward`)
  RUN_OR_MODEL_DIR       a reward model trained with `chatsmith rm`
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatsmith.errors import ConfigError

RewardFn = Callable[..., list[float]]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _reply(text: str) -> str:
    return text.strip()


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _field(fields: dict[str, Any], name: str, reward: str, n: int) -> list[Any]:
    values = fields.get(name)
    if values is None:
        raise ConfigError(f"reward '{reward}' needs a '{name}' field in every prompt record; the records have "
                          f"{', '.join(sorted(fields)) or 'no fields besides prompt'}")
    if len(values) != n:
        raise ConfigError(f"reward '{reward}': {len(values)} '{name}' values for {n} completions")
    return list(values)


def exact_answer(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
    """1.0 when the whole reply (spaces and one final period aside) is the answer's number."""
    answers = _field(fields, "answer", "exact_answer", len(completions))
    out = []
    for c, a in zip(completions, answers):
        reply = _reply(c).removesuffix(".").strip()
        got, want = (_as_number(reply) if _NUMBER.fullmatch(reply.replace(",", "")) else None), _as_number(str(a))
        out.append(1.0 if got is not None and want is not None and math.isclose(got, want) else 0.0)
    return out


def last_number(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
    """1.0 when the last number in the reply equals the answer (words around it allowed)."""
    answers = _field(fields, "answer", "last_number", len(completions))
    out = []
    for c, a in zip(completions, answers):
        nums = _NUMBER.findall(c.replace(",", ""))
        want = _as_number(str(a))
        out.append(1.0 if nums and want is not None and math.isclose(float(nums[-1]), want) else 0.0)
    return out


def format_match(pattern: str | None = None) -> RewardFn:
    """1.0 when the whole reply matches `pattern` (or each record's "pattern" field)."""
    compiled = _compile(pattern) if pattern else None

    def format(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        pats = [compiled] * len(completions) if compiled else \
            [_compile(p) for p in _field(fields, "pattern", "format", len(completions))]
        return [1.0 if p.fullmatch(_reply(c)) else 0.0 for p, c in zip(pats, completions)]

    return format


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"reward format: '{pattern}' is not a valid regular expression ({e})") from None


def length_reward(target: int = 32) -> RewardFn:
    """1 - |n - target| / target, floored at 0, where n is the reply's length in tokens
    (`completion_tokens` field, which the rollout supplies) or in words when it is absent."""
    if target <= 0:
        raise ConfigError(f"reward length:{target}: the target length must be a positive integer")

    def length(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        ns = fields.get("completion_tokens") or [len(c.split()) for c in completions]
        return [max(0.0, 1.0 - abs(n - target) / target) for n in ns]

    return length


BUILTIN = ("exact_answer", "last_number", "format", "length")


@dataclass
class Reward:
    """One named reward with its weight."""

    name: str
    fn: RewardFn
    weight: float = 1.0


def _split_weight(spec: str) -> tuple[str, float]:
    if "=" in spec:
        head, tail = spec.rsplit("=", 1)
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def _load_from_file(path: Path, fn_name: str, spec: str) -> RewardFn:
    mod_name = f"chatsmith_user_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"--reward {spec}: cannot import {path} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    module_spec.loader.exec_module(module)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"--reward {spec}: {path} has no function '{fn_name}' (name it with {path}:FUNCTION)")
    return fn


def _load_module_function(module: str, fn_name: str, spec: str) -> RewardFn:
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))   # `module:function` finds files in the working directory
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"--reward {spec}: cannot import module '{module}' ({e}). Give a built-in reward "
                          f"({', '.join(BUILTIN)}), module:function, path/to/file.py[:function] or a "
                          "reward model directory") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"--reward {spec}: module '{module}' has no function '{fn_name}'")
    return fn


def reward_model_fn(path: str) -> RewardFn:
    """A reward model from `chatsmith rm` as a reward function; prompts are scored as conversations
    ("messages" field when the records have one, else the prompt text)."""
    from chatsmith.models.reward import load_reward_model

    rm = load_reward_model(path)

    def reward_model(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        convs = fields.get("messages") or prompts
        return [float(x) for x in rm.score(list(convs), list(completions))]

    return reward_model


def load_reward(spec: str) -> Reward:
    """Parse one --reward SPEC[=WEIGHT] (see the module docstring)."""
    body, weight = _split_weight(spec.strip())
    if not body:
        raise ConfigError("--reward: empty reward name")
    name, _, arg = body.partition(":")
    if name == "exact_answer" and not arg:
        return Reward(name, exact_answer, weight)
    if name == "last_number" and not arg:
        return Reward(name, last_number, weight)
    if name == "format":
        return Reward(name, format_match(arg or None), weight)
    if name == "length":
        try:
            target = int(arg) if arg else 32
        except ValueError:
            raise ConfigError(f"--reward {spec}: the length target must be an integer, e.g. length:32") from None
        return Reward(name, length_reward(target), weight)
    in_file = re.fullmatch(r"(.+\.py)(?::(\w+))?", body)
    if in_file:
        path, fn_name = Path(in_file.group(1)), in_file.group(2) or "reward"
        if not path.is_file():
            raise ConfigError(f"--reward {spec}: file {path} does not exist")
        return Reward(f"{path.stem}:{fn_name}", _load_from_file(path, fn_name, spec), weight)
    if Path(body).is_dir():
        return Reward("reward_model", reward_model_fn(body), weight)
    if arg and re.fullmatch(r"[A-Za-z_][\w.]*", name) and re.fullmatch(r"[A-Za-z_]\w*", arg):
        return Reward(f"{name}:{arg}", _load_module_function(name, arg, spec), weight)
    raise ConfigError(f"--reward {spec}: not a built-in reward ({', '.join(BUILTIN)}), module:function, "
                      "an existing path/to/file.py[:function], or a reward model directory")


@dataclass
class RewardSet:
    """Several weighted rewards; `score` returns the weighted sum and each component."""

    rewards: list[Reward]

    def score(self, prompts: list[str], completions: list[str],
              fields: dict[str, list[Any]]) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted total per completion, each reward's values by name)."""
        total = [0.0] * len(completions)
        parts: dict[str, list[float]] = {}
        for r in self.rewards:
            values = _call(r, prompts, completions, fields)
            parts[r.name] = values
            total = [t + r.weight * v for t, v in zip(total, values)]
        return total, parts


def _call(r: Reward, prompts: list[str], completions: list[str], fields: dict[str, list[Any]]) -> list[float]:
    try:
        params = inspect.signature(r.fn).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kw = fields if takes_all else {k: v for k, v in fields.items() if k in params}
    except (TypeError, ValueError):
        kw = fields
    values = r.fn(prompts, completions, **kw)
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"reward '{r.name}' must return a list of floats, got {type(values).__name__}") from None
    if len(values) != len(completions):
        raise ConfigError(f"reward '{r.name}' returned {len(values)} values for {len(completions)} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ConfigError(f"reward '{r.name}' returned a non-finite value for completion {bad[0]}: {values[bad[0]]}")
    return values


def load_rewards(specs: Sequence[str]) -> RewardSet:
    """The RewardSet of several --reward SPEC[=WEIGHT] (see the module docstring)."""
    if not specs:
        raise ConfigError("no reward: pass --reward NAME (e.g. exact_answer), module:function, "
                          "path/to/file.py or a reward model directory")
    return RewardSet([load_reward(s) for s in specs])


def reward_fields(records: Sequence[dict[str, Any]], completion_tokens: Sequence[int]) -> dict[str, list[Any]]:
    """The keyword fields a reward function receives: each record field as a list (one value per
    completion; None where a record lacks it), and the completions' lengths in tokens."""
    keys = sorted({k for r in records for k in r if k not in ("prompt", "_source")})
    fields: dict[str, list[Any]] = {k: [r.get(k) for r in records] for k in keys}
    fields["completion_tokens"] = list(completion_tokens)
    return fields


def evaluate_rewards(engine: Any, rewards: RewardSet, prompts: Sequence[Any], *, max_new_tokens: int,
                     stop_ids: set[int], samples: int = 0) -> dict[str, Any]:
    """Greedy answers to held-out prompts (data.prompts.Prompt) through the engine: the mean reward
    (and each component's, when there are several), the mean length in tokens, and the first
    `samples` (prompt, answer, reward) triples."""
    from chatsmith.infer.sampling import SamplingParams

    if not prompts:
        return {}
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    comps = engine.generate([p.ids for p in prompts], params, stop_ids=stop_ids)
    records = [p.record for p in prompts]
    total, parts = rewards.score([p.text for p in prompts], [c.text for c in comps],
                                 reward_fields(records, [len(c.token_ids) for c in comps]))
    out: dict[str, Any] = {"eval_reward": sum(total) / len(total),
                           "eval_length": sum(len(c.token_ids) for c in comps) / len(comps),
                           "eval_prompts": len(comps)}
    if len(parts) > 1:
        out.update({f"eval_reward_{k}": sum(v) / len(v) for k, v in parts.items()})
    if samples:
        out["samples"] = [{"prompt": p.text, "answer": c.text, "reward": r}
                          for p, c, r in list(zip(prompts, comps, total))[:samples]]
    return out
