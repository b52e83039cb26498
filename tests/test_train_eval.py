"""Evaluation during training (issue 12): every stage evaluates the starting model (step 0), every
--eval-every steps and at the end; --eval-data replaces an --eval-split; --eval-suite puts task
accuracy in metrics.jsonl and the plots; evaluation never changes what training does.

Multi-process and resume behaviour: tests/test_distributed.py and tests/test_resume.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from chatsmith.config import DPOConfig, GRPOConfig, RMConfig, SFTConfig, load_config
from chatsmith.data import Conversation, Message
from chatsmith.errors import ConfigError
from chatsmith.train.sft import run_sft

REPO = Path(__file__).resolve().parents[1]
PARIS_QUESTIONS = ["Where is the Louvre?", "Which city has the Eiffel Tower?", "Name the capital of France.",
                   "Where do Parisians live?", "What city is on the Seine?", "Where is Notre-Dame?",
                   "Which city hosted the 2024 Olympics?", "Where is Montmartre?"]
HELD_OUT_QUESTIONS = ["Where is the Arc de Triomphe?", "Which city is the French capital?",
                      "Where is the Pompidou Centre?"]


def paris(questions: list[str]) -> list[Conversation]:
    return [Conversation([Message("user", q), Message("assistant", "Paris.")]) for q in questions]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_step0_is_the_starting_model_on_eval_data_instead_of_a_split(tmp_path):
    """--eval-data: all of --data trains, the file is the held-out set, and the step-0 eval loss is
    the untrained model's mean NLL on it, computed here by plain forwards."""
    held = paris(HELD_OUT_QUESTIONS)
    eval_file = write_jsonl(tmp_path / "held.jsonl", [{"messages": c.to_openai()} for c in held])
    run = run_sft(SFTConfig(model="tiny-random-llama", output=str(tmp_path / "r"), method="full", max_steps=3,
                            batch_size=4, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
                            eval_data=[str(eval_file)], eval_every=2), conversations=paris(PARIS_QUESTIONS))
    evals = [(r["step"], r["eval_loss"]) for r in records(run) if "eval_loss" in r]
    assert [s for s, _ in evals] == [0, 2, 3]

    from chatsmith.data.template import render_conversation
    from chatsmith.models import load_model

    model, tok = load_model("tiny-random-llama")
    total, n = 0.0, 0
    with torch.no_grad():
        for conv in held:
            r = render_conversation(tok, conv)
            ids = torch.tensor([r.input_ids])
            keep = torch.tensor(r.loss_mask[1:], dtype=torch.bool)
            logits = model(ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits[keep], ids[0, 1:][keep], reduction="sum").item()
            n += int(keep.sum())
    assert evals[0][1] == pytest.approx(total / n, rel=1e-5)
    assert evals[-1][1] < evals[0][1] - 1.0   # trained on the same answer: the held-out loss falls
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["train_examples"], summary["eval_examples"]) == (len(PARIS_QUESTIONS), len(held))
    assert summary["eval_start"]["eval_loss"] == evals[0][1] and summary["eval"]["eval_loss"] == evals[-1][1]


def test_eval_suite_metrics_from_step0_in_metrics_and_plot(tmp_path, monkeypatch):
    """--eval-suite on a tiny SFT run: the suite's accuracy at step 0 is the untrained model's
    (evaluate_suite called here on it), and after training on "Paris." answers it is 1."""
    from chatsmith.eval.tasks import evaluate_suite
    from chatsmith.models import load_model

    tasks = write_jsonl(tmp_path / "paris.jsonl", [{"prompt": q, "answer": "Paris"} for q in HELD_OUT_QUESTIONS])
    run = run_sft(SFTConfig(model="tiny-random-llama", output=str(tmp_path / "r"), method="full", max_steps=12,
                            batch_size=4, lr=1e-2, warmup_ratio=0.0, scheduler="constant", eval_every=6,
                            eval_suite=str(tasks), eval_suite_max_new_tokens=4), conversations=paris(PARIS_QUESTIONS))
    key = "suite/paris/accuracy"
    suite = [(r["step"], r[key]) for r in records(run) if key in r]
    assert [s for s, _ in suite] == [0, 6, 12]
    model, tok = load_model("tiny-random-llama")
    with torch.no_grad():
        untrained = evaluate_suite(model.eval(), tok, str(tasks), max_new_tokens=4)
    assert suite[0][1] == untrained[key] == 0.0
    assert suite[-1][1] == 1.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_start"][key] == 0.0 and summary["eval"][key] == 1.0

    # loss.png: the suite panel's line starts at step 0
    import matplotlib.axes

    from chatsmith.train.plots import plot_metrics

    lines: dict[str, list] = {}
    original = matplotlib.axes.Axes.plot

    def plot(self, *args, **kw):
        lines[kw.get("label", "")] = list(args[0])
        return original(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    plot_metrics(records(run), tmp_path / "loss.png")
    assert lines["paris/accuracy"] == [0, 6, 12]


def test_no_eval_at_start_and_evaluation_never_changes_training(tmp_path, monkeypatch):
    """--no-eval-at-start logs no step 0; and the weights are the same whether or not (and however
    often) the run evaluates, even when an evaluator draws random numbers and dropout is on."""
    from chatsmith.train import sft

    def noisy(cfg, tokenizer):
        return [lambda model, step: {"noise": float(torch.rand(()))}]

    monkeypatch.setattr(sft, "suite_evaluators", noisy)
    common = dict(model="tiny-random-llama", method="lora", lora_r=4, lora_dropout=0.3, max_steps=3, batch_size=4,
                  lr=1e-2, eval_split=2, seed=5)
    quiet = run_sft(SFTConfig(output=str(tmp_path / "quiet"), eval_at_start=False, **common),
                    conversations=paris(PARIS_QUESTIONS))
    busy = run_sft(SFTConfig(output=str(tmp_path / "busy"), eval_every=1, **common),
                   conversations=paris(PARIS_QUESTIONS))
    assert [r["step"] for r in records(quiet) if "eval_loss" in r] == [3]
    assert [r["step"] for r in records(busy) if "noise" in r] == [0, 1, 2, 3]
    wq = load_file(str(quiet / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(busy / "adapter" / "adapter_model.safetensors"))
    for k in wq:
        assert torch.equal(wq[k], wb[k]), k


def test_conflicting_or_empty_evaluation_settings_are_config_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"eval_data \(held.json\) and eval_split \(0.1\) are both set.*--eval-split 0"):
        SFTConfig(eval_data=["held.json"], eval_split=0.1)
    with pytest.raises(ConfigError, match="eval_every is 5 but there is nothing to evaluate: pass --eval-data"):
        DPOConfig(eval_every=5, eval_split=0)
    with pytest.raises(ConfigError, match="eval_suite 'builtin:': each comma-separated part"):
        SFTConfig(eval_suite="builtin:")
    with pytest.raises(ConfigError, match="eval_every must be >= 0"):
        SFTConfig(eval_every=-2, eval_split=1)
    # rm holds out 10% by default, none when given --eval-data; a recipe's explicit split conflicts
    assert RMConfig().eval_split == 0.1 and RMConfig(eval_data=["p.json"]).eval_split == 0.0
    with pytest.raises(ConfigError, match=r"rm_identity_demo.yaml: eval_data \(p.json\) and eval_split \(0.1\)"):
        load_config(RMConfig, REPO / "recipes" / "rm_identity_demo.yaml", {"eval_data": ["p.json"]})
    assert GRPOConfig(reward=["length"], eval_every=2).eval_every == 2   # builtin tasks hold out their own prompts

    from chatsmith.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sft", "--data", "a.json", "--eval-data", "b.json", "--eval-split", "0.2", "--output", "o"]) == 2
    assert "eval_data (b.json) and eval_split (0.2) are both set" in capsys.readouterr().err
    # an unknown suite stops the run before anything is written or loaded
    assert main(["sft", "--data", "a.json", "--eval-suite", "builtin:nope", "--output", "o"]) == 2
    assert "builtin:nope" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_preference_stages_read_eval_data(tmp_path, monkeypatch, capsys, stage):
    """rm and dpo: --eval-data pairs are the held-out set (all of --data trains); step 0 is logged.
    DPO with LoRA starts with the policy equal to the reference: every held-out margin is 0, so the
    step-0 loss is log 2 and no pair is ordered right yet."""
    pairs = [{"prompt": f"Who are you, friend {i}?", "chosen": "I'm Smithy.", "rejected": "I am a large model."}
             for i in range(5)]
    held = write_jsonl(tmp_path / "held.jsonl", pairs)
    out = tmp_path / stage
    run_cli([stage, "--model", "tiny-random-llama", "--data", "builtin:identity-preferences", "--eval-data", held,
             "--output", out, "--max-steps", "1", "--batch-size", "4", "--max-length", "64", "--lora-r", "4"],
            tmp_path, monkeypatch, capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_records"] == 5 and summary["train_records"] == 240
    first = records(out)[0]
    assert first["step"] == 0 and "eval_accuracy" in first and summary["eval_start"] == {
        k: v for k, v in first.items() if k != "step"}
    if stage == "dpo":
        assert first["eval_loss"] == pytest.approx(0.6931472, abs=1e-6) and first["eval_accuracy"] == 0.0


def test_grpo_eval_data_and_eval_suite(tmp_path, monkeypatch, capsys):
    """grpo: --eval-data prompts replace the builtin task's held-out split; the held-out reward and
    the task suite are logged at step 0 and at the end, and summary.json's before/after are those."""
    prompts = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"What is {i} plus 1?", "answer": str(i + 1)}
                                                    for i in range(3)])
    tasks = write_jsonl(tmp_path / "sums.jsonl", [{"prompt": "What is 2 plus 2?", "answer": "4"}])
    (tmp_path / "chars.py").write_text("def reward(prompts, completions, **kw):\n"
                                       "    return [len(c) / 40.0 for c in completions]\n")
    out = tmp_path / "g"
    run_cli(["grpo", "--model", "tiny-random-llama", "--data", "builtin:arithmetic", "--eval-data", prompts,
             "--reward", "chars.py", "--output", out, "--max-steps", "1", "--batch-size", "2", "--group-size", "2",
             "--max-new-tokens", "4", "--eval-suite", tasks, "--eval-suite-max-new-tokens", "4", "--lora-r", "4"],
            tmp_path, monkeypatch, capsys)
    recs = records(out)
    evals = [r for r in recs if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 1] and all("suite/sums/accuracy" in r for r in evals)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_prompts"] == 3 and summary["before"]["eval_prompts"] == 3
    assert summary["before"]["eval_reward"] == evals[0]["eval_reward"] and len(summary["before"]["samples"]) == 3
    assert summary["after"]["eval_reward"] == evals[1]["eval_reward"]
    assert (out / "rl.png").is_file()
