"""What every training stage does around its loop: read and mix the data, create the run directory,
add template tokens, plan the steps; after the loop, save on the main process."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chatsmith.config import to_yaml
from chatsmith.data.conversation import Conversation
from chatsmith.errors import ChatsmithError
from chatsmith.train.dist import is_main, world_size
from chatsmith.train.loop import latest_checkpoint
from chatsmith.train.plan import Plan, plan_steps

log = logging.getLogger(__name__)


def say(msg: str) -> None:
    """Tell the user something on stderr (the main process only, so P processes say it once)."""
    if is_main():
        print(msg, file=sys.stderr, flush=True)


def load_conversations(cfg: Any, specs: Sequence[str] | None = None) -> list[Conversation]:
    """Read every --data source (PATH[:WEIGHT]) and mix them; with `specs` (held-out files,
    --eval-data) read those instead, each whole and in order."""
    from chatsmith.data.formats import read_conversations
    from chatsmith.data.mixing import mix
    from chatsmith.data.spec import parse_data_spec

    if specs is None and not cfg.data:
        raise ChatsmithError("no training data: pass --data FILE (several allowed, FILE:WEIGHT to mix)")
    results, weights = [], []
    for spec in cfg.data if specs is None else specs:
        src = parse_data_spec(spec)
        if specs is not None:
            _whole_file(src, spec)
        res = read_conversations(src.path, format=src.format, columns=cfg.columns or None,
                                 skip_bad=cfg.skip_bad, system_prompt=cfg.system_prompt)
        if res.skipped:
            say(f"{src.path}: skipped {len(res.skipped)} malformed record(s) (--skip-bad); first: {res.skipped[0]}")
        say(f"{src.path}: {len(res.conversations)} {'held-out ' if specs is not None else ''}conversations "
            f"({res.format})")
        results.append(res.conversations)
        weights.append(src.weight)
    return mix(results, weights, seed=cfg.seed)


def _whole_file(src: Any, spec: str) -> None:
    if src.weight is not None:
        raise ChatsmithError(f"--eval-data {spec}: a held-out file is read whole; drop the ':{src.weight:g}' weight")


def prepare_run_dir(cfg: Any) -> Path:
    """The run directory, checked (no finished run or checkpoints there unless --resume) and created,
    with config.yaml: the resolved config, which `--config` takes back."""
    run = Path(cfg.output)
    if run.exists() and latest_checkpoint(run) is not None and not cfg.resume:
        raise ChatsmithError(f"{run} already holds checkpoints of a run. Pass --resume to continue it, "
                             "or choose another --output")
    if run.exists() and (run / "final").exists() and not cfg.resume:
        raise ChatsmithError(f"{run} already holds a finished run (final/). Choose another --output "
                             "or delete it first")
    run.mkdir(parents=True, exist_ok=True)
    if is_main():
        (run / "config.yaml").write_text(to_yaml(cfg))
    return run


def add_template_tokens(model: Any, tokenizer: Any, template: str | None) -> int:
    """A fallback template's special tokens (e.g. <|im_start|>) are added to the vocabulary."""
    from chatsmith.data.template import template_tokens

    missing = [t for t in template_tokens(template) if t not in tokenizer.get_vocab()]
    if not missing:
        return 0
    tokenizer.add_special_tokens({"additional_special_tokens": missing})
    model.resize_token_embeddings(len(tokenizer))   # new rows start at the mean embedding
    # Adapter methods freeze the embeddings; prepare_trainable reads this to train these rows.
    model.chatsmith_new_token_ids = tokenizer.convert_tokens_to_ids(missing)
    say(f"added template tokens {missing} to the vocabulary (their embeddings train from the mean)")
    return len(missing)


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON (the main process only)."""
    if is_main():
        path.write_text(json.dumps(data, indent=2))


def read_data_specs(cfg: Any, reader: Any, describe: Any, what: str, specs: Sequence[str] | None = None) -> list[Any]:
    """Every --data spec (or each of `specs`: held-out files) read with `reader(path, skip_bad)` (a
    PreferenceData), each file summarised with `describe(records)`; `what` names the expected
    records in the no-data error."""
    from chatsmith.data.preference import BUILTIN_PREFIX
    from chatsmith.data.spec import parse_data_spec

    if specs is None and not cfg.data:
        raise ChatsmithError(f"no training data: pass --data FILE ({what})")
    records: list[Any] = []
    for spec in cfg.data if specs is None else specs:
        if spec.startswith(BUILTIN_PREFIX):
            path = spec
        else:
            src = parse_data_spec(spec)
            if specs is not None:
                _whole_file(src, spec)
            path = src.path
        res = reader(path, skip_bad=cfg.skip_bad)
        if res.skipped:
            say(f"{path}: skipped {len(res.skipped)} malformed record(s) (--skip-bad); first: {res.skipped[0]}")
        say(f"{path}: {describe(res.records)}{' held out' if specs is not None else ''}")
        records.extend(res.records)
    return records


def _describe_rankings(records: list[Any]) -> str:
    kinds = sorted({len(r.responses) for r in records})
    return f"{len(records)} preference records ({'pairs' if kinds == [2] else f'K = {kinds}'})"


def load_rankings(cfg: Any, specs: Sequence[str] | None = None) -> list[Any]:
    """Every --data file (or each of `specs`) of pairs or rankings (rm, dpo), validated into Ranking records."""
    from chatsmith.data.preference import read_preferences

    return read_data_specs(cfg, read_preferences, _describe_rankings,
                           "pairs or rankings; or builtin:identity-preferences", specs)


def split_or_eval_data(cfg: Any, records: list[Any], read: Callable[[Sequence[str]], list[Any]]
                       ) -> tuple[list[Any], list[Any]]:
    """(training, held-out) records: --eval-data files read with `read(specs)`, else an --eval-split of `records`."""
    from chatsmith.data.mixing import split_eval

    if cfg.eval_data:
        held = read(cfg.eval_data)
        if not held:
            raise ChatsmithError(f"--eval-data {' '.join(cfg.eval_data)}: no held-out records in the file(s)")
        return records, held
    return split_eval(records, cfg.eval_split, cfg.seed)


def check_eval_suite(cfg: Any) -> None:
    """Fail now, before any model loads, on an --eval-suite that names an unknown set or an unreadable file."""
    if getattr(cfg, "eval_suite", None):
        from chatsmith.eval.tasks import load_task_sets

        sets = load_task_sets(cfg.eval_suite)
        say(f"--eval-suite: {', '.join(f'{t.name} ({len(t.items)} items)' for t in sets)} at every evaluation")


def say_suite(start: dict[str, Any], end: dict[str, Any]) -> None:
    """Print the task suite's metrics at the end beside those at step 0 (nothing without a suite)."""
    suite = {k: v for k, v in end.items() if k.startswith("suite/")}
    if suite:
        say("task suite: " + ", ".join(f"{k.removeprefix('suite/')} {v:.3f}"
                                       + (f" (step 0: {start[k]:.3f})" if k in start else "") for k, v in suite.items()))


def suite_evaluators(cfg: Any, tokenizer: Any) -> list[Callable[[Any, int], dict[str, float]]]:
    """The --eval-suite evaluator for the loop (none without --eval-suite): the task suite's flat
    metrics (suite/SET/accuracy, ...) for the model at each evaluation."""
    spec = getattr(cfg, "eval_suite", None)
    if not spec:
        return []

    def evaluate(model: Any, step: int) -> dict[str, float]:
        from chatsmith.eval.tasks import evaluate_suite

        return evaluate_suite(model, tokenizer, spec, template=cfg.template,
                              max_new_tokens=cfg.eval_suite_max_new_tokens)

    return [evaluate]


def plan_for(cfg: Any, examples: Sequence[Any], token_budget: int | None = None) -> Plan:
    """The run's step plan over `examples` (--batch-size, --grad-accum, --max-steps, --epochs,
    --seed), with a share of every step for each process."""
    return plan_steps([len(e) for e in examples], batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                      max_steps=cfg.max_steps, epochs=cfg.epochs, seed=cfg.seed, token_budget=token_budget,
                      processes=world_size())


def fit_and_save(trainer: Any, save: Callable[[Any], Any]) -> Any:
    """Run the loop, switch the trained model back to plain attention and `save(model)` on the main
    process; returns the loop's result."""
    from chatsmith.models.attention import disable_segment_attention

    result = trainer.fit()
    model = trainer.final_model()   # sharded: gathered from every process (all take part), None off the main one
    if is_main():
        disable_segment_attention(model)
        save(model)
    return result
