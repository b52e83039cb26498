"""The moderation gate of `chatsmith serve --moderation SPEC`: requests and answers checked by a
rules file or a classifier, as OpenChatKit shipped a moderation model beside its chat model.

SPEC is one of:
- a rules file (`.yaml`, `.yml` or `.json`, or `rules:PATH`): categories of keywords (whole words,
  any case) and regular expressions:

      violence: {keywords: [kill, attack], patterns: ["\\\\bshoot(ing)?\\\\b"]}
      self-harm: {keywords: [suicide]}

- a classifier directory (or `classifier:PATH`), optionally `@THRESHOLD`:
  - a `chatsmith rm` reward model (higher is better): a text is flagged when its reward is below
    the threshold (default 0.0), in the category "harmful" (score: sigmoid of minus the reward);
  - any transformers sequence classifier: each label that is not a safe one (safe, neutral, ok,
    none, clean, benign, non-toxic, not_toxic, label_0 of a 2-label model) is a category, scored by
    its softmax probability (sigmoid for a multi-label model); flagged at or above the threshold
    (default 0.5).

A flagged request is refused in OpenAI's shape (`finish_reason: "content_filter"`); a flagged answer
is cut where the check fails (streamed: nothing of the flagged piece is sent, the stream ends with
`content_filter`); `/v1/moderations` answers in OpenAI's shape; /metrics counts checks and flags.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError

REFUSAL = "I can't help with that request."
SAFE_LABELS = {"safe", "neutral", "ok", "none", "clean", "benign", "non-toxic", "not_toxic", "non_toxic",
               "harmless", "acceptable"}


@dataclass
class Verdict:
    """One text's moderation result: flagged, and per category whether it applies and its score."""
    flagged: bool
    categories: dict[str, bool] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    def to_openai(self) -> dict[str, Any]:
        """A result object of OpenAI's /v1/moderations."""
        return {"flagged": self.flagged, "categories": self.categories, "category_scores": self.scores}


class RulesModerator:
    """Keywords and regular expressions by category, from a YAML or JSON file."""
    kind = "rules"
    check_every = 1   # characters of new answer text between checks while streaming (rules are cheap)

    def __init__(self, path: str) -> None:
        p = Path(path)
        if not p.is_file():
            raise ChatsmithError(f"--moderation {path}: no such rules file")
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(p.read_text(encoding="utf-8"))
            else:
                import yaml

                data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except Exception as e:   # JSON or YAML syntax: say where
            raise ChatsmithError(f"--moderation {path}: cannot parse the rules file ({e})") from None
        if not isinstance(data, dict) or not data:
            raise ChatsmithError(f"--moderation {path}: expected categories, e.g. "
                                 "{violence: {keywords: [kill], patterns: ['\\\\bshoot']}}")
        self.name = p.name
        self.rules: dict[str, re.Pattern[str]] = {}
        for cat, spec in data.items():
            if not isinstance(spec, dict) or not set(spec) <= {"keywords", "patterns"}:
                raise ChatsmithError(f"--moderation {path}: category '{cat}' must be {{keywords: [...], patterns: [...]}}")
            parts = []
            for i, word in enumerate(spec.get("keywords") or []):
                if not isinstance(word, str) or not word.strip():
                    raise ChatsmithError(f"--moderation {path}: {cat}.keywords[{i}] must be a non-empty string")
                parts.append(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)")
            for i, pattern in enumerate(spec.get("patterns") or []):
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as e:
                    raise ChatsmithError(f"--moderation {path}: {cat}.patterns[{i}] is not a regular expression "
                                         f"({e})") from None
                parts.append(f"(?:{pattern})")
            if not parts:
                raise ChatsmithError(f"--moderation {path}: category '{cat}' has no keywords or patterns")
            self.rules[str(cat)] = re.compile("|".join(parts), re.IGNORECASE)

    def check(self, texts: list[str]) -> list[Verdict]:
        """One verdict per text: a category applies when one of its keywords or patterns occurs."""
        out = []
        for t in texts:
            cats = {c: bool(r.search(t)) for c, r in self.rules.items()}
            out.append(Verdict(any(cats.values()), cats, {c: float(v) for c, v in cats.items()}))
        return out


class ClassifierModerator:
    """A `chatsmith rm` reward model or a transformers sequence classifier with a threshold."""
    kind = "classifier"
    check_every = 200   # characters of new answer text between checks while streaming

    def __init__(self, path: str, threshold: float | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from chatsmith.models.reward import REWARD_CONFIG, load_reward_model

        p = Path(path)
        if not p.is_dir():
            raise ChatsmithError(f"--moderation {path}: not a directory (a classifier) nor a rules file "
                                 "(.yaml/.json)")
        self.name = p.name
        self.reward = None
        if (p / REWARD_CONFIG).is_file() or (p / "final" / REWARD_CONFIG).is_file():
            self.reward = load_reward_model(path)
            self.threshold = 0.0 if threshold is None else threshold
            return
        self.threshold = 0.5 if threshold is None else threshold
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        labels = self.model.config.id2label or {}
        n = self.model.config.num_labels
        self.multi = self.model.config.problem_type == "multi_label_classification"
        self.labels = [str(labels.get(i, f"LABEL_{i}")) for i in range(n)]
        unsafe = [i for i, name in enumerate(self.labels) if name.lower() not in SAFE_LABELS
                  and not (n == 2 and not self.multi and name.upper() == "LABEL_0")]
        if not unsafe:
            raise ChatsmithError(f"--moderation {path}: every label of this classifier ({', '.join(self.labels)}) "
                                 "is a safe one; nothing could be flagged")
        self.unsafe = unsafe

    def check(self, texts: list[str]) -> list[Verdict]:
        """One verdict per text (prompt and answer texts are scored alone, as the user's words)."""
        if self.reward is not None:
            rewards = self.reward.score(["Is this safe?"] * len(texts), texts)
            return [Verdict(r < self.threshold, {"harmful": r < self.threshold},
                            {"harmful": 1 / (1 + math.exp(r))}) for r in rewards]
        import torch

        with torch.no_grad():
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=512)
            logits = self.model(**enc).logits.float()
            probs = logits.sigmoid() if self.multi else logits.softmax(-1)
        out = []
        for row in probs.tolist():
            scores = {self.labels[i]: row[i] for i in self.unsafe}
            cats = {c: s >= self.threshold for c, s in scores.items()}
            out.append(Verdict(any(cats.values()), cats, scores))
        return out


async def moderate(state: Any, texts: list[str], where: str) -> list[Verdict]:
    """The server's moderator's verdicts on `texts` (run in a worker thread), counted in /metrics."""
    import asyncio

    verdicts = await asyncio.to_thread(state.moderator.check, texts)
    state.metrics.moderated(where, len(texts), sum(v.flagged for v in verdicts))
    return verdicts


def refusal(job_id: str, model: str, fingerprint: str, stream: bool, include_usage: bool) -> Any:
    """The answer to a request the gate flagged: the refusal with finish_reason "content_filter",
    as one JSON object or as a stream of chunks."""
    choice = {"index": 0, "message": {"role": "assistant", "content": REFUSAL}, "finish_reason": "content_filter",
              "logprobs": None}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    base = {"id": job_id, "created": int(__import__("time").time()), "model": model, "system_fingerprint": fingerprint}
    if not stream:
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}

    async def events() -> Any:
        chunk = {**base, "object": "chat.completion.chunk"}
        for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": REFUSAL}, None),
                              ({}, "content_filter")):
            yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]})}\n\n"
        if include_usage:
            yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    return events()


def load_moderator(spec: str) -> Any:
    """The moderator of a --moderation SPEC (module docstring)."""
    kind, _, rest = spec.partition(":") if spec.startswith(("rules:", "classifier:")) else ("", "", spec)
    threshold = None
    if "@" in rest and kind != "rules":
        rest, _, t = rest.rpartition("@")
        try:
            threshold = float(t)
        except ValueError:
            raise ChatsmithError(f"--moderation {spec}: the threshold after '@' must be a number, got '{t}'") from None
    if kind == "rules" or (not kind and Path(rest).suffix.lower() in (".yaml", ".yml", ".json")):
        return RulesModerator(rest)
    return ClassifierModerator(rest, threshold)
