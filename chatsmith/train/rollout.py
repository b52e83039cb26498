"""Rollouts for online RL (ppo, grpo): prompts -> engine -> completions + log-probs + rewards, and
the batch source that feeds them to the one training loop.

Shape of an RL run inside the loop (STYLE.md, principle 2): the loop asks `RolloutBatches` for
the micro-batches of each optimizer step. Every `ppo_epochs * num_minibatches` steps it collects a
fresh rollout with the CURRENT policy (the engine runs the live module, `sync_weights()` after
each update), then serves that rollout's minibatches epoch by epoch. The rollout of step s is
fully determined by the seed and s, so a resumed run regenerates it with the restored weights.

Batches are padding-free packed rows like SFT's: prompt + completion of every episode in one row,
position ids restarting per episode, logits only at the completion positions.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatsmith.errors import ChatsmithError, DataError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Episodes and prompts
# ---------------------------------------------------------------------------------------------
@dataclass
class Episode:
    """One prompt x completion pair of a rollout, with its per-token training targets."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]                 # behaviour policy log p(token), one per completion token
    record: dict[str, Any]
    group: int = 0                        # index of the prompt within its rollout
    text: str = ""
    finish_reason: str = "length"
    reward: float = 0.0
    ref_logprobs: list[float] | None = None
    values: list[float] | None = None
    advantages: list[float] = field(default_factory=list)   # one per completion token
    returns: list[float] | None = None


@dataclass
class Prompt:
    ids: list[int]
    text: str
    record: dict[str, Any]


def _prompt_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    p = record.get("prompt")
    if isinstance(p, str) and p.strip():
        return [{"role": "user", "content": p}]
    if isinstance(p, list) and p and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in p]
    raise DataError("needs a 'prompt': a non-empty string or a list of {role, content} messages",
                    path=where.split(":")[0], record=where.split(":", 1)[1] if ":" in where else None,
                    field="prompt", hint="map another column with --columns prompt=COLUMN")


def render_prompts(tokenizer: Any, records: Sequence[dict[str, Any]], *, template: str | None,
                   system_prompt: str | None, max_prompt_tokens: int) -> tuple[list[Prompt], int]:
    """Records -> prompts ending with the assistant header, via the one template renderer.
    Returns (prompts, number dropped for exceeding max_prompt_tokens)."""
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation

    out, dropped = [], 0
    for i, rec in enumerate(records):
        msgs = _prompt_messages(rec, str(rec.get("_source", f"prompts:record {i}")))
        conv = Conversation([Message(m["role"], m["content"]) for m in msgs])
        r = render_conversation(tokenizer, conv, template=template, add_generation_prompt=True,
                                system_prompt=system_prompt)
        if len(r.input_ids) > max_prompt_tokens:
            dropped += 1
            continue
        out.append(Prompt(r.input_ids, msgs[-1]["content"], rec))
    return out, dropped


def render_prompt_splits(cfg: Any, tokenizer: Any, train_records: Sequence[dict[str, Any]],
                         held_records: Sequence[dict[str, Any]]) -> tuple[list[Prompt], list[Prompt], int, int]:
    """(training prompts, held-out prompts, training prompts dropped, the prompt token limit): a
    prompt must leave --max-new-tokens of room within --max-length."""
    limit = cfg.max_length - cfg.max_new_tokens
    prompts, dropped = render_prompts(tokenizer, train_records, template=cfg.template, system_prompt=cfg.system_prompt,
                                      max_prompt_tokens=limit)
    held, _ = render_prompts(tokenizer, held_records, template=cfg.template, system_prompt=cfg.system_prompt,
                             max_prompt_tokens=limit)
    if not prompts:
        raise ChatsmithError(f"no prompt fits in --max-length {cfg.max_length} minus --max-new-tokens {cfg.max_new_tokens}")
    return prompts, held, dropped, limit


def read_prompt_file(path: str, columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """JSON list or JSON lines of records with a 'prompt' field (other fields reach the rewards)."""
    p = Path(path)
    if not p.is_file():
        raise DataError("file not found", path=path, hint="pass a JSON/JSONL prompt file or builtin:arithmetic")
    text = p.read_text(encoding="utf-8")
    records: list[Any]
    if p.suffix == ".jsonl" or (text.lstrip()[:1] == "{" and "\n{" in text):
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg})", path=path, record=f"line {n}") from None
    else:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg} at line {e.lineno})", path=path) from None
        records = loaded if isinstance(loaded, list) else [loaded]
    out = []
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise DataError("expected an object with a 'prompt' field", path=path, record=f"record {n}")
        rec = dict(rec)
        for want, have in (columns or {}).items():
            if have in rec:
                rec[want] = rec.pop(have)
        if "prompt" not in rec:
            raise DataError("has no 'prompt' field", path=path, record=f"record {n}", field="prompt",
                            hint="map another column with --columns prompt=COLUMN")
        rec["_source"] = f"{path}:record {n}"
        _prompt_messages(rec, rec["_source"])
        out.append(rec)
    return out


def load_prompt_records(cfg: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, held-out records) from --data: builtin:TASK (its own held-out split) or
    prompt files (held out with --eval-split)."""
    from chatsmith.data.tasks import parse_task_spec, task_records
    from chatsmith.train.prepare import split_eval

    if not cfg.data:
        raise ChatsmithError("no prompts: pass --data builtin:arithmetic (or builtin:format) or a JSON/JSONL "
                             "file of records with a 'prompt' field")
    train: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    for spec in cfg.data:
        task = parse_task_spec(spec)
        if task:
            train += task_records(task, "train", seed=cfg.seed)
            held += task_records(task, "test", n=cfg.eval_prompts or None, seed=0)
        else:
            files += read_prompt_file(spec, cfg.columns or None)
    if files:
        tr, ev = split_eval(files, cfg.eval_split, cfg.seed)
        train += tr
        held += ev[: cfg.eval_prompts] if cfg.eval_prompts else ev
    return train, held


# ---------------------------------------------------------------------------------------------
# Generation: the engine shared with serving, or a minimal batched sampler until it exists
# ---------------------------------------------------------------------------------------------
@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int


class BatchedSampler:
    """Minimal batched KV-cache sampler with the engine's interface (`generate`, `sync_weights`),
    used only when `chatsmith.infer.engine` is not importable. It runs the live module, so
    `sync_weights` has nothing to refresh. Log-probs are under the raw model distribution."""

    def __init__(self, model: Any, tokenizer: Any = None, *, max_batch_size: int = 16) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_id = int(pad) if pad is not None else 0

    def sync_weights(self) -> None:
        return None

    def generate(self, prompts: list[list[int]], params: Any, stop_ids: Any = None) -> list[Completion]:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        out: list[Completion] = []
        for i in range(0, len(prompts), self.max_batch_size):
            out += self._generate_chunk(prompts[i:i + self.max_batch_size], plist[i:i + self.max_batch_size],
                                        set(stop_ids or ()))
        return out

    def _generate_chunk(self, prompts: list[list[int]], plist: list[Any], stop: set[int]) -> list[Completion]:
        import torch
        from transformers import DynamicCache

        from chatsmith.infer.sampling import next_token

        model = self.model
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long, device=dev)
        att = torch.zeros((b, width), dtype=torch.long, device=dev)
        for r, p in enumerate(prompts):   # left padding: every row's next token is at the same column
            ids[r, width - len(p):] = torch.tensor(p, device=dev)
            att[r, width - len(p):] = 1
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        budget = max(p.max_new_tokens for p in plist)
        shared = all(p == plist[0] for p in plist) and plist[0].repetition_penalty == 1.0
        gens = [torch.Generator(device=dev).manual_seed(int(p.seed) + r) if p.seed is not None else None
                for r, p in enumerate(plist)]
        toks: list[list[int]] = [[] for _ in range(b)]
        lps: list[list[float]] = [[] for _ in range(b)]
        reason = ["length"] * b
        done = [False] * b
        cache = DynamicCache(config=model.config)
        step_ids, step_pos = ids, pos
        try:
            with torch.inference_mode():
                for _ in range(budget):
                    logits = model(input_ids=step_ids, attention_mask=att, position_ids=step_pos,
                                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
                    logp = torch.log_softmax(logits, dim=-1)
                    if shared:
                        chosen = _sample_rows(logits, plist[0], gens[0])
                    else:
                        chosen = [next_token(logits[r], plist[r], torch.tensor(prompts[r] + toks[r]), gens[r])
                                  for r in range(b)]
                    picked = logp[torch.arange(b, device=dev), torch.as_tensor(chosen, device=dev)].tolist()
                    nxt = []
                    for r in range(b):
                        if done[r]:
                            nxt.append(self.pad_id)
                            continue
                        tok = int(chosen[r])
                        toks[r].append(tok)
                        lps[r].append(float(picked[r]))
                        if tok in stop:
                            done[r], reason[r] = True, "stop"
                        elif len(toks[r]) >= plist[r].max_new_tokens:
                            done[r] = True
                        nxt.append(tok)
                    if all(done):
                        break
                    step_ids = torch.tensor(nxt, device=dev).unsqueeze(1)
                    att = torch.cat([att, torch.ones((b, 1), dtype=att.dtype, device=dev)], dim=1)
                    step_pos = step_pos[:, -1:] + 1
        finally:
            model.train(was_training)
        return [Completion(toks[r], lps[r], reason[r], len(prompts[r])) for r in range(b)]


def _sample_rows(logits: torch.Tensor, params: Any, generator: torch.Generator | None) -> list[int]:
    """Vectorised temperature / top-k / top-p / min-p sampling of [B, V] logits (same order as
    `infer.sampling.next_token_probs`)."""
    import torch

    if params.greedy:
        return logits.argmax(-1).tolist()
    scores = logits / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        s, order = torch.sort(scores, descending=True, dim=-1)
        probs = s.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        drop[:, 0] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1).tolist()


def make_engine(model: Any, tokenizer: Any, max_batch_size: int = 16) -> Any:
    """The generation engine shared with serving (chatsmith.infer.engine) when available."""
    try:
        from chatsmith.infer.engine import Engine
    except ImportError:
        return BatchedSampler(model, tokenizer, max_batch_size=max_batch_size)
    return Engine(model, tokenizer, max_batch_size=max_batch_size)


# ---------------------------------------------------------------------------------------------
# Rollout collection
# ---------------------------------------------------------------------------------------------
def generate_episodes(engine: Any, tokenizer: Any, prompts: Sequence[Prompt], *, group_size: int,
                      params: Any, stop_ids: set[int]) -> list[Episode]:
    """G completions per prompt, laid out prompt by prompt (episode i belongs to prompt i // G)."""
    ids = [p.ids for p in prompts for _ in range(group_size)]
    comps = engine.generate(ids, params, stop_ids=stop_ids)
    episodes = []
    for i, c in enumerate(comps):
        p = prompts[i // group_size]
        text_ids = [t for t in c.token_ids if t not in stop_ids]
        episodes.append(Episode(list(p.ids), list(c.token_ids), list(c.logprobs), p.record, group=i // group_size,
                                text=tokenizer.decode(text_ids, skip_special_tokens=True) if tokenizer else "",
                                finish_reason=c.finish_reason))
    if any(len(e.completion_ids) == 0 for e in episodes):
        raise ChatsmithError("the engine returned an empty completion; check --max-new-tokens")
    return episodes


def score_episodes(rewards: Any, episodes: Sequence[Episode], prompts_text: Sequence[str]) -> dict[str, float]:
    """Fill episode.reward with the weighted reward; return the mean of each component."""
    fields: dict[str, list[Any]] = {}
    keys = sorted({k for e in episodes for k in e.record if k not in ("prompt", "_source")})
    for k in keys:
        fields[k] = [e.record.get(k) for e in episodes]
    fields["completion_tokens"] = [len(e.completion_ids) for e in episodes]
    total, parts = rewards.score(list(prompts_text), [e.text for e in episodes], fields)
    for e, r in zip(episodes, total):
        e.reward = float(r)
    return {f"reward_{k}": sum(v) / len(v) for k, v in parts.items()} if len(parts) > 1 else {}


def prompt_text(e: Episode) -> str:
    p = e.record.get("prompt")
    return p if isinstance(p, str) else str(p[-1]["content"])


@dataclass
class RLBatchSpec:
    """How rollouts become per-token training batches."""

    aggregation: str = "token"        # token | sequence | dr_grpo
    max_new_tokens: int = 32
    # Put each distinct prompt in the row once and let its completions attend to that copy (needs
    # segment attention on the model): a GRPO group of G answers then costs 1 prompt, not G.
    share_prompts: bool = False


def collate_episodes(episodes: Sequence[Episode], spec: RLBatchSpec) -> dict[str, Any]:
    """One packed row: input_ids/position_ids [1, L]; completion positions, targets and the
    per-token tensors (old/ref log-probs, advantages, returns, old values) [N]; seq_index [N]."""
    import torch

    from chatsmith.train.losses import rl_loss_units

    ids: list[int] = []
    pos: list[int] = []
    tpos: list[int] = []
    tgt: list[int] = []
    seq: list[int] = []
    old: list[float] = []
    ref: list[float] = []
    adv: list[float] = []
    ret: list[float] = []
    val: list[float] = []
    have_ref = all(e.ref_logprobs is not None for e in episodes)
    have_val = all(e.values is not None and e.returns is not None for e in episodes)
    bounds: list[tuple[int, ...]] = []
    prompt_span: dict[tuple[int, ...], tuple[int, int]] = {}
    for s, e in enumerate(episodes):
        start, n_prompt = len(ids), len(e.prompt_ids)
        if spec.share_prompts:
            key = tuple(e.prompt_ids)
            if key not in prompt_span:
                ids.extend(e.prompt_ids)
                pos.extend(range(n_prompt))
                prompt_span[key] = (start, len(ids))
                bounds.append((start, len(ids)))
            ps, pe = prompt_span[key]
            start = len(ids)
            ids.extend(e.completion_ids)
            pos.extend(range(n_prompt, n_prompt + len(e.completion_ids)))
            bounds.append((start, len(ids), ps, pe))
            # The first completion token is predicted at the shared prompt's last position.
            tpos.append(pe - 1)
            tpos.extend(range(start, start + len(e.completion_ids) - 1))
        else:
            full = e.prompt_ids + e.completion_ids
            ids.extend(full)
            pos.extend(range(len(full)))
            tpos.extend(range(start + n_prompt - 1, start + len(full) - 1))
            bounds.append((start, len(ids)))
        tgt.extend(e.completion_ids)
        seq.extend([s] * len(e.completion_ids))
        old.extend(e.logprobs)
        adv.extend(e.advantages)
        if have_ref:
            ref.extend(e.ref_logprobs or [])
        if have_val:
            ret.extend(e.returns or [])
            val.extend(e.values or [])
    batch: dict[str, Any] = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "target_positions": torch.tensor(tpos, dtype=torch.long),
        "targets": torch.tensor(tgt, dtype=torch.long),
        "seq_index": torch.tensor(seq, dtype=torch.long),
        "old_logprobs": torch.tensor(old, dtype=torch.float32),
        "advantages": torch.tensor(adv, dtype=torch.float32),
        "n_seqs": len(episodes),
        # per-episode causal attention instead of one masked [L, L] product (models/attention.py)
        "segment_bounds": bounds,
        "n_tokens": len(ids),
        "n_targets": rl_loss_units(len(tgt), len(episodes), spec.aggregation, spec.max_new_tokens),
    }
    if have_ref:
        batch["ref_logprobs"] = torch.tensor(ref, dtype=torch.float32)
    if have_val:
        batch["returns"] = torch.tensor(ret, dtype=torch.float32)
        batch["old_values"] = torch.tensor(val, dtype=torch.float32)
    return batch


def completion_logprobs(model: Any, episodes: Sequence[Episode], chunk: int = 16,
                        with_hidden: bool = False) -> tuple[list[list[float]], list[Any]]:
    """Trainer-side log p(completion token) of each episode under `model` (no gradient), from the
    same packed forward the loss uses. With with_hidden, also the last hidden state at those
    positions (the critic's input). Returns (log-probs per episode, hidden [T_i, H] per episode)."""
    import torch

    from chatsmith.train.losses import token_logprobs

    spec = RLBatchSpec()
    lps: list[list[float]] = []
    hid: list[Any] = []
    with torch.no_grad():
        for i in range(0, len(episodes), chunk):
            part = list(episodes[i:i + chunk])
            b = collate_episodes(part, spec)
            out = model(input_ids=b["input_ids"].to(_device(model)), position_ids=b["position_ids"].to(_device(model)),
                        logits_to_keep=b["target_positions"].to(_device(model)), use_cache=False,
                        output_hidden_states=with_hidden, segment_bounds=b["segment_bounds"])
            lp = token_logprobs(out.logits[0], b["targets"].to(out.logits.device)).cpu()
            h = out.hidden_states[-1][0, b["target_positions"].to(out.logits.device)].cpu() if with_hidden else None
            start = 0
            for e in part:
                n = len(e.completion_ids)
                lps.append(lp[start:start + n].tolist())
                if with_hidden:
                    hid.append(h[start:start + n])
                start += n
    return lps, hid


def _device(model: Any) -> Any:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# The batch source the training loop pulls from
# ---------------------------------------------------------------------------------------------
class RolloutBatches:
    """Serves the loop's optimizer steps from rollouts collected on demand.

    make_rollout(rollout_index) -> (episodes with advantages, rollout metrics). Each rollout gives
    ppo_epochs x num_minibatches optimizer steps; each step's minibatch is cut into grad_accum
    micro-batches (collated packed rows).
    """

    def __init__(self, make_rollout: Callable[[int], tuple[list[Episode], dict[str, float]]], *,
                 spec: RLBatchSpec, ppo_epochs: int, num_minibatches: int, grad_accum: int, seed: int,
                 after_update: Callable[[], None] | None = None) -> None:
        self.make_rollout = make_rollout
        self.spec = spec
        self.ppo_epochs = max(1, ppo_epochs)
        self.num_minibatches = max(1, num_minibatches)
        self.grad_accum = max(1, grad_accum)
        self.seed = seed
        self.after_update = after_update
        self.steps_per_rollout = self.ppo_epochs * self.num_minibatches
        self._index: int | None = None
        self._schedule: list[list[list[Episode]]] = []
        self.rollout_metrics: dict[str, float] = {}
        self.rollout_time = 0.0
        self.rollouts = 0
        self.step = 0

    def __call__(self, step: int) -> list[dict[str, Any]]:
        index, k = divmod(step, self.steps_per_rollout)
        self.step = step
        if step > 0 and self.after_update is not None:
            self.after_update()           # the previous step changed the weights
        if index != self._index:
            t0 = time.perf_counter()
            episodes, metrics = self.make_rollout(index)
            self.rollout_time = time.perf_counter() - t0
            self.rollouts += 1
            self.rollout_metrics = {**metrics, "rollout_time_s": self.rollout_time, "rollout": float(index)}
            self._schedule = self._minibatches(episodes, index)
            self._index = index
        micro = self._schedule[k]
        return [collate_episodes(m, self.spec) for m in micro]

    def _minibatches(self, episodes: list[Episode], index: int) -> list[list[list[Episode]]]:
        rng = random.Random(self.seed * 7919 + index)
        out = []
        for _ in range(self.ppo_epochs):
            order = list(range(len(episodes)))
            rng.shuffle(order)
            size = math.ceil(len(order) / self.num_minibatches)
            for m in range(self.num_minibatches):
                chunk = [episodes[i] for i in order[m * size:(m + 1) * size]] or [episodes[order[-1]]]
                per = math.ceil(len(chunk) / self.grad_accum)
                out.append([chunk[j:j + per] for j in range(0, len(chunk), per)])
        return out

    def metrics(self) -> dict[str, float]:
        return dict(self.rollout_metrics)


# ---------------------------------------------------------------------------------------------
# Held-out evaluation and plots
# ---------------------------------------------------------------------------------------------
def evaluate_prompts(engine: Any, tokenizer: Any, rewards: Any, prompts: Sequence[Prompt], *,
                     max_new_tokens: int, stop_ids: set[int], samples: int = 0) -> dict[str, Any]:
    """Greedy answers to held-out prompts: mean reward (and each component), mean length, and the
    first `samples` (prompt, answer, reward) triples."""
    from chatsmith.infer.sampling import SamplingParams

    if not prompts:
        return {}
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    episodes = generate_episodes(engine, tokenizer, prompts, group_size=1, params=params, stop_ids=stop_ids)
    parts = score_episodes(rewards, episodes, [prompt_text(e) for e in episodes])
    out: dict[str, Any] = {"eval_reward": sum(e.reward for e in episodes) / len(episodes),
                           "eval_length": sum(len(e.completion_ids) for e in episodes) / len(episodes),
                           "eval_prompts": len(episodes)}
    out.update({f"eval_{k}": v for k, v in parts.items()})
    if samples:
        out["samples"] = [{"prompt": prompt_text(e), "answer": e.text, "reward": e.reward} for e in episodes[:samples]]
    return out


def append_metrics(trainer: Any, record: dict[str, Any]) -> None:
    """Add a record (e.g. the final held-out evaluation) to metrics.jsonl after the loop ended."""
    trainer.history.append(record)
    if trainer.accelerator.is_main_process:
        with trainer.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")


RL_PANELS = [("reward_mean", "reward (mean of rollout)"), ("eval_reward", "held-out reward (greedy)"),
             ("kl", "KL to reference"), ("entropy", "entropy"), ("value_loss", "value loss"),
             ("clip_frac", "clip fraction"), ("response_length", "response length (tokens)"),
             ("explained_variance", "explained variance"), ("loss", "loss")]


def plot_rl_metrics(records: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """One small panel per logged RL metric."""
    panels = [(k, label) for k, label in RL_PANELS if any(k in r for r in records)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), dpi=100, squeeze=False)
    for ax, (k, label) in zip(axes.flat, panels):
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) < 30 else "-", ms=3, color="#17a")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# The policy and its reference
# ---------------------------------------------------------------------------------------------
def load_policy(cfg: Any, need_reference: bool) -> tuple[Any, Any, Any]:
    """(trainable policy, tokenizer, frozen reference or None).

    Memory-lean default: with LoRA/DoRA there is ONE base model in memory; the reference is that
    base with the adapter disabled (`reference_logprobs`), so no copy is made. Full and freeze
    fine-tuning change the base weights, so they keep a frozen copy when a reference is needed.
    """
    import copy

    import torch

    from chatsmith.models import load_model
    from chatsmith.models.adapters import PEFT_METHODS, prepare_trainable
    from chatsmith.models.attention import enable_segment_attention
    from chatsmith.train.prepare import add_template_tokens

    model, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)
    add_template_tokens(model, tokenizer, cfg.template)
    enable_segment_attention(model)   # packed rows: attention per episode, not over the whole row
    ref = None
    if need_reference and cfg.method not in PEFT_METHODS:
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    model = prepare_trainable(model, cfg)
    return model, tokenizer, ref


def reference_logprobs(policy: Any, ref: Any, episodes: Sequence[Episode]) -> list[list[float]]:
    """log p_ref(completion tokens): the frozen copy, or the policy with its adapter disabled."""
    if ref is not None:
        return completion_logprobs(ref, episodes)[0]
    with policy.disable_adapter():
        return completion_logprobs(policy, episodes)[0]


def prompt_order(n: int, index: int, per_rollout: int, seed: int) -> list[int]:
    """Indices of rollout `index`'s prompts: epoch by epoch through a seeded shuffle of all n."""
    out = []
    for j in range(index * per_rollout, (index + 1) * per_rollout):
        epoch, k = divmod(j, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[k])
    return out


def total_steps(cfg: Any, n_prompts: int) -> int:
    """Optimizer steps: --max-steps, or --epochs over the prompts (each rollout gives
    ppo_epochs x num_minibatches steps)."""
    if cfg.max_steps and cfg.max_steps > 0:
        return cfg.max_steps
    rollouts = max(1, math.ceil(cfg.epochs * n_prompts / cfg.batch_size))
    return rollouts * cfg.ppo_epochs * cfg.num_minibatches
