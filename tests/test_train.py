"""The one training loop and SFT on the tiny random model: invariances, resume after kill -9,
packing without leakage, every method, and that training learns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import KILL_AFTER_STEP, run_cli
from safetensors.torch import load_file

from chatsmith.config import SFTConfig, load_config
from chatsmith.data import Conversation, Message
from chatsmith.data.packing import collate_packed
from chatsmith.data.template import Rendered
from chatsmith.models import load_model
from chatsmith.train.plan import plan_steps
from chatsmith.train.sft import run_sft

REPO = Path(__file__).resolve().parents[1]


def arithmetic(n: int = 48) -> list[Conversation]:
    return [Conversation([Message("user", f"What is {i} plus {i}?"),
                          Message("assistant", f"{i} plus {i} is {2 * i}." + " Indeed." * (i % 5))])
            for i in range(n)]


def write_jsonl(path: Path, convs: list[Conversation]) -> Path:
    path.write_text("".join(json.dumps({"messages": c.to_openai()}) + "\n" for c in convs))
    return path


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_packed_rows_do_not_leak_attention():
    model, tok = load_model("tiny-random-llama")
    a = tok("Hello there, how are you doing today?")["input_ids"]
    b = tok("The capital of France is Paris.")["input_ids"]
    batch = collate_packed([Rendered(a, [1] * len(a)), Rendered(b, [1] * len(b))])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone_b = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
    torch.testing.assert_close(packed[len(a):], alone_b, atol=1e-4, rtol=1e-4)


def test_plan_is_deterministic_and_covers_epochs():
    lengths = [10] * 10
    p1 = plan_steps(lengths, batch_size=4, grad_accum=1, max_steps=-1, epochs=2, seed=3)
    p2 = plan_steps(lengths, batch_size=4, grad_accum=1, max_steps=-1, epochs=2, seed=3)
    assert p1 == p2 and len(p1) == 6
    first_epoch = sorted(i for step in p1[:3] for mb in step for i in mb)
    assert first_epoch == list(range(10))
    packed = plan_steps([100, 300, 200, 50], batch_size=1, grad_accum=1, max_steps=-1, epochs=1, seed=0, token_budget=400)
    assert all(sum([100, 300, 200, 50][i] for i in mb) <= 400 for step in packed for mb in step)


def test_balanced_plan_deals_each_step_by_tokens():
    """With several processes each step keeps its examples and its micro-batch count, every
    micro-batch is non-empty, and the tokens per process are far closer than the naive split's
    on a long-tailed length distribution (the measured version: benchmarks/rank_balance.py)."""
    import random
    import statistics

    from chatsmith.train.plan import rank_tokens

    rng = random.Random(0)
    lengths = [1 + int(min(4096, rng.lognormvariate(5, 1))) for _ in range(800)]
    for processes, accum in ((2, 1), (4, 2), (3, 2)):
        kw = dict(batch_size=4, grad_accum=accum, max_steps=-1, epochs=1, seed=1, processes=processes)
        naive, balanced = plan_steps(lengths, balance=False, **kw), plan_steps(lengths, **kw)
        assert len(naive) == len(balanced)
        for a, b in zip(naive, balanced):
            assert len(b) == len(a) == accum * processes and all(b)
            assert sorted(i for mb in a for i in mb) == sorted(i for mb in b for i in mb)

        def spread(plan, processes=processes):
            return statistics.mean(max(t) / statistics.mean(t) for t in (rank_tokens(s, lengths, processes)
                                                                          for s in plan))
        assert spread(naive) > 1.15 and spread(balanced) < 1.05, (processes, spread(naive), spread(balanced))
    # One micro-batch per step: nothing to deal. One process accumulating 2 micro-batches gets the
    # very micro-batches of 2 processes with 1 each (so the equivalence runs sum the same numbers).
    one = dict(batch_size=4, max_steps=-1, epochs=1, seed=1)
    assert plan_steps(lengths, grad_accum=1, **one) == plan_steps(lengths, grad_accum=1, balance=False, **one)
    assert plan_steps(lengths, grad_accum=2, **one) == plan_steps(lengths, grad_accum=1, processes=2, **one)
    # A token budget still bounds every micro-batch.
    budgeted = plan_steps(lengths, batch_size=1, grad_accum=2, max_steps=-1, epochs=1, seed=0, token_budget=1024,
                          processes=2)
    assert all(sum(lengths[i] for i in mb) <= max(1024, max(lengths)) for step in budgeted for mb in step)


def test_grad_accumulation_invariance(tmp_path):
    """batch 8 x 1 step equals batch 2 x 4 accumulated micro-batches (same examples, same update)."""
    data = arithmetic(16)
    common = dict(model="tiny-random-llama", method="full", max_steps=2, lr=1e-3, max_grad_norm=0.0,
                  warmup_ratio=0.0, scheduler="constant", seed=5)
    a = run_sft(SFTConfig(output=str(tmp_path / "a"), batch_size=8, grad_accum=1, **common), conversations=data)
    b = run_sft(SFTConfig(output=str(tmp_path / "b"), batch_size=2, grad_accum=4, **common), conversations=data)
    wa, wb = weights(a), weights(b)
    base, _ = load_model("tiny-random-llama")
    moved = max((wa[k] - base.state_dict()[k]).abs().max().item() for k in wa)
    assert moved > 1e-4  # the step did something
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=1e-4)
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)


def _sft_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "chatsmith", "sft", "--model", "tiny-random-llama", "--data", str(data),
            "--output", str(out), "--method", "lora", "--lora-dropout", "0.1", "--max-steps", "12",
            "--batch-size", "4", "--lr", "0.002", "--save-every", "4", "--seed", "7", *extra]


def test_resume_after_kill9_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", arithmetic(40))
    killed = [sys.executable, "-c", KILL_AFTER_STEP, "10", *_sft_cmd(data, tmp_path / "crash")[3:]]
    crashed = subprocess.run(killed, capture_output=True, text=True, cwd=tmp_path)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    ckpts = sorted(p.name for p in (tmp_path / "crash" / "checkpoints").iterdir())
    assert ckpts == ["step-000004", "step-000008"]          # keeps the last 2, none half-written
    assert not (tmp_path / "crash" / "final").exists()
    # Running again without --resume refuses to clobber the crashed run.
    from chatsmith.cli import main

    assert main(_sft_cmd(data, tmp_path / "crash")[3:]) == 2 and "--resume" in capsys.readouterr().err
    resumed = subprocess.run(_sft_cmd(data, tmp_path / "crash", "--resume"), capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint at step 8" in resumed.stderr
    run_cli(_sft_cmd(data, tmp_path / "clean")[3:], tmp_path, monkeypatch, capsys)   # uninterrupted, in-process
    wr, wc = weights(tmp_path / "crash"), weights(tmp_path / "clean")
    for k in wc:
        torch.testing.assert_close(wr[k], wc[k], atol=1e-6, rtol=1e-5)
    steps = [json.loads(x)["step"] for x in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))   # the crashed run's steps 9-10 were not logged twice
    a = load_file(str(tmp_path / "crash" / "adapter" / "adapter_model.safetensors"))
    assert a and all("lora" in k for k in a)


def test_sft_learns_and_writes_a_complete_run(tmp_path):
    data = arithmetic(24)
    run = run_sft(SFTConfig(model="tiny-random-llama", output=str(tmp_path / "r"), method="full", epochs=10,
                            batch_size=4, lr=1e-2, eval_split=4, eval_every=10), conversations=data)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert len(evals) >= 2 and evals[-1] < evals[0]
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "final/config.json",
                 "final/generation_config.json", "final/chat_template.jinja"):
        assert (run / name).exists(), name
    assert list((run / "tb").rglob("events.out.tfevents.*"))
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(run / "final")
    assert m.generation_config.eos_token_id == 2   # stops at <|im_end|>
    cfg = load_config(SFTConfig, run / "config.yaml")
    assert cfg.method == "full" and cfg.epochs == 10


@pytest.mark.parametrize("method", ["freeze", "lora", "dora", "prompt", "prefix", "adapter"])
def test_every_method_trains_and_reloads(tmp_path, method):
    data = arithmetic(16)
    cfg = SFTConfig(model="tiny-random-llama", output=str(tmp_path / method), method=method, max_steps=12,
                    batch_size=4, lr=5e-3, num_virtual_tokens=4, adapter_layers=2, freeze_trainable_layers=1,
                    warmup_ratio=0.0, scheduler="constant")
    run = run_sft(cfg, conversations=data)
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert min(losses[-3:]) < losses[0], losses
    model, _ = load_model(str(run))
    base, _ = load_model("tiny-random-llama")
    if method == "freeze":
        sd, bsd = model.state_dict(), base.state_dict()
        assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], bsd["model.layers.0.self_attn.q_proj.weight"])
        assert not torch.equal(sd["model.layers.1.self_attn.q_proj.weight"], bsd["model.layers.1.self_attn.q_proj.weight"])
    if method in ("lora", "dora"):
        assert (run / "adapter" / "adapter_config.json").is_file()
        assert type(model).__name__ == "LlamaForCausalLM"   # merged


def test_qlora_without_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU message is what is tested here")
    from chatsmith.errors import ChatsmithError

    with pytest.raises(ChatsmithError, match="QLoRA needs a CUDA GPU.*--method lora"):
        run_sft(SFTConfig(model="tiny-random-llama", output=str(tmp_path / "q"), method="qlora", max_steps=1),
                conversations=arithmetic(4))


def test_cli_sft_with_shared_files_and_mixing(tmp_path, shared_data):
    out = tmp_path / "mix"
    r = subprocess.run([sys.executable, "-m", "chatsmith", "sft", "--model", "tiny-random-llama", "--data",
                        f"{shared_data}/alpaca_50.json:0.5", f"{shared_data}/sharegpt_20.json:0.5",
                        "--output", str(out), "--max-steps", "3", "--max-length", "128", "--packing"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "truncated at --max-length 128" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["truncated"] > 0 and summary["steps"] == 3


def test_every_recipe_runs_two_steps(tmp_path, monkeypatch, capsys):
    # sft_* here; rm_* and dpo_* recipes run in tests/test_rm.py and tests/test_dpo.py
    recipes = sorted((REPO / "recipes").glob("sft_*.yaml"))
    # update when adding or renaming one: sft_dora_freeze_demo, sft_full_sharegpt, sft_lora_alpaca
    assert len(recipes) == 3, [r.name for r in recipes]
    for recipe in recipes:
        out = tmp_path / recipe.stem
        run_cli(["sft", "--config", recipe, "--model", "tiny-random-llama", "--max-steps", "2", "--output", out,
                 "--save-every", "0", "--no-eval-at-start"], REPO, monkeypatch, capsys)
        assert (out / "final" / "config.json").is_file()
