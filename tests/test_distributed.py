"""Several processes: 2 processes under `accelerate launch` (gloo on this CPU) train to the same
weights as 1 process with the same global batch, for sft, rm, dpo and grpo; and sharded (FSDP2 full
shard, recipes/accelerate/fsdp*.yaml) for sft and dpo, with a sharded checkpoint that resumes.

Tolerance: 1e-5 absolute on every weight after 3 steps. The two runs see the same micro-batches and
the same loss denominators; only the order of the gradient sums differs (DDP adds the processes'
gradients, FSDP reduce-scatters them, one process accumulates them), which moves float32 weights by
~1e-7 (FSDP sft: 3.6e-7 measured). Adam's first steps hardly depend on the gradient's scale, so the
FSDP tests also compare the gradient norm before clipping, at 1e-3 relative: every parameter's
gradient was found equal within 1e-6, but a float32 norm over the 3M-element embedding gradient
summed in another order (per shard) moves by up to 1e-4 (benchmarks/sharded_cpu.py: 9.7e-5).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatsmith.config import DPOConfig, GRPOConfig, RMConfig, SFTConfig

REPO = Path(__file__).resolve().parents[1]


def launch_two(args: list[str], cwd: Path, recipe: str | None = None) -> subprocess.CompletedProcess:
    """`chatsmith ARGS --num-processes 2`: the shortcut runs `accelerate launch --multi_gpu` (or
    with `recipe`, an accelerate config from recipes/accelerate/) with two processes (gloo here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "chatsmith", *args, "--num-processes", "2", "--main-process-port", str(port)]
    if recipe:
        cmd += ["--accelerate-config", str(REPO / "recipes" / "accelerate" / recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # 2 processes on 2 cores
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "launching 2 processes" in r.stderr
    return r


def flags(cfg_overrides: dict) -> list[str]:
    out = []
    for k, v in cfg_overrides.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, list):
            out += [flag, *map(str, v)]
        elif isinstance(v, bool):
            out.append(flag if v else f"--no-{k.replace('_', '-')}")
        else:
            out += [flag, str(v)]
    return out


def assert_same_weights(a: Path, b: Path, base_dir: str | None = None) -> None:
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)
    if base_dir is not None:   # non-vacuous: the weights moved
        base = load_file(str(Path(base_dir) / "model.safetensors"))
        moved = max((wa[k] - base[k]).abs().max().item() for k in wa if k in base)
        assert moved > 1e-4, moved


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def tiny_dir() -> str:
    from chatsmith.models.loading import tiny_random_dir

    return str(tiny_random_dir())


@pytest.fixture(scope="module")
def sft_one(tmp_path_factory, shared_data) -> tuple[Path, dict]:
    """The 1-process sft run (accumulation 2) that the DDP and FSDP sft runs must equal, and its settings."""
    from chatsmith.train.sft import run_sft

    d = tmp_path_factory.mktemp("sft_one")
    (d / "tasks.jsonl").write_text("".join(json.dumps({"prompt": q, "answer": "Paris"}) + "\n"
                                           for q in ("Where is the Louvre?", "Capital of France?")))
    common = dict(model="tiny-random-llama", data=[str(shared_data / "alpaca_50.json")], method="full", max_steps=3,
                  batch_size=2, lr=1e-3, max_length=96, max_grad_norm=1.0, warmup_ratio=0.0, scheduler="constant",
                  seed=3, eval_split=6, packing=True, eval_every=2, eval_suite=str(d / "tasks.jsonl"),
                  eval_suite_max_new_tokens=4)
    return run_sft(SFTConfig(output=str(d / "one"), grad_accum=2, **common)), common


@pytest.fixture(scope="module")
def dpo_one(tmp_path_factory) -> tuple[Path, dict]:
    """The 1-process LoRA dpo run (accumulation 2) that the DDP and FSDP dpo runs must equal."""
    from chatsmith.train.dpo import run_dpo

    common = dict(model="tiny-random-llama", data=["builtin:identity-preferences"], method="lora", lora_r=4,
                  max_steps=3, batch_size=2, lr=3e-2, max_length=96, eval_split=0, warmup_ratio=0.0,
                  scheduler="constant", seed=5)
    return run_dpo(DPOConfig(output=str(tmp_path_factory.mktemp("dpo_one") / "one"), grad_accum=2, **common)), common


def test_sft_two_processes_equal_one(tmp_path, sft_one):
    """Also evaluation: the held-out loss is split over the processes, the task suite runs on the
    main process while the other waits; both from step 0, with the same numbers as one process."""
    one, common = sft_one
    launch_two(["sft", *flags({**common, "output": str(tmp_path / "two")})], tmp_path)
    assert_same_weights(one, tmp_path / "two", tiny_dir())
    assert losses(tmp_path / "two") == pytest.approx(losses(one), rel=1e-6)
    ev1, ev2 = ([r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
                for run in (one, tmp_path / "two"))
    assert [r["step"] for r in ev2] == [r["step"] for r in ev1] == [0, 2, 3]
    for a, b in zip(ev1, ev2, strict=True):   # evaluation split over processes
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)
        assert b["suite/tasks/accuracy"] == a["suite/tasks/accuracy"]
    assert not (tmp_path / "two" / "final" / "adapter_config.json").exists()


def test_rm_two_processes_equal_one(tmp_path):
    from chatsmith.train.rm import run_rm

    common = dict(model="tiny-random-llama", data=["builtin:identity-preferences"], method="full", max_steps=3,
                  batch_size=2, lr=2e-3, max_length=96, eval_split=8, warmup_ratio=0.0, scheduler="constant", seed=4,
                  eval_at_start=False)
    one = run_rm(RMConfig(output=str(tmp_path / "one"), grad_accum=2, **common))
    launch_two(["rm", *flags({**common, "output": str(tmp_path / "two")})], tmp_path)
    assert_same_weights(one, tmp_path / "two")
    assert losses(tmp_path / "two") == pytest.approx(losses(one), rel=1e-5)
    ev1, ev2 = (json.loads((r / "summary.json").read_text())["eval"] for r in (one, tmp_path / "two"))
    assert ev2["eval_accuracy"] == ev1["eval_accuracy"] and ev2["eval_loss"] == pytest.approx(ev1["eval_loss"], rel=1e-5)


def test_dpo_lora_two_processes_equal_one(tmp_path, dpo_one):
    """DPO with LoRA: the reference is the adapter switched off inside each process's model."""
    one, common = dpo_one
    launch_two(["dpo", *flags({**common, "output": str(tmp_path / "two")})], tmp_path, recipe="ddp.yaml")
    assert_same_weights(one, tmp_path / "two", tiny_dir())
    assert losses(tmp_path / "two") == pytest.approx(losses(one), rel=1e-5)


def test_grpo_two_processes_equal_one(tmp_path):
    """Each process samples its half of every rollout, with the seeds one process would use for
    those sequences; advantages are per group, the loss denominator counts every process's tokens."""
    from chatsmith.train.grpo import run_grpo

    (tmp_path / "chars.py").write_text("def reward(prompts, completions, **kw):\n"
                                       "    return [len(c) / 40.0 for c in completions]\n")
    common = dict(model="tiny-random-llama", data=["builtin:arithmetic"], reward=["chars.py"], method="lora",
                  lora_r=4, group_size=4, max_new_tokens=6, max_steps=3, lr=5e-2, eval_prompts=2, seed=6)
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        one = run_grpo(GRPOConfig(output=str(tmp_path / "one"), batch_size=4, **common))
    finally:
        os.chdir(old)
    launch_two(["grpo", *flags({**common, "output": str(tmp_path / "two"), "batch_size": 2})], tmp_path)
    assert_same_weights(one, tmp_path / "two", tiny_dir())
    r1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    r2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip([x for x in r1 if "loss" in x], [x for x in r2 if "loss" in x], strict=True):
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], rel=1e-6)   # the same episodes
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)


def test_a_process_count_other_than_asked_fails_loudly(tmp_path, monkeypatch):
    """accelerate can start fewer processes than asked (huggingface/accelerate#2741: `--cpu
    --num_processes 2` runs one): the loop refuses to train with the wrong world size."""
    from chatsmith.data import Conversation, Message
    from chatsmith.errors import ChatsmithError
    from chatsmith.train.sft import run_sft

    monkeypatch.setenv("CHATSMITH_EXPECTED_WORLD", "2")
    cfg = SFTConfig(model="tiny-random-llama", output=str(tmp_path / "run"), max_steps=1, method="full")
    with pytest.raises(ChatsmithError, match="asked for 2 processes but this process sees 1"):
        run_sft(cfg, conversations=[Conversation([Message("user", "hi"), Message("assistant", "hello")])] * 4)


def grad_norms(run: Path) -> list[float]:
    return [r["grad_norm"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_every_accelerate_recipe_loads():
    """Each file in recipes/accelerate/ goes through accelerate launch's own config parsing, and the
    variables it hands to the processes ask for the strategy the file's name says."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    files = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
    assert [f.name for f in files] == ["ddp.yaml", "fsdp.yaml", "fsdp_offload.yaml", "zero2.yaml", "zero3.yaml"]
    for f in files:
        args = launch_command_parser().parse_args(["--config_file", str(f), "--num_processes", "2", "train.py"])
        args, defaults, _ = _validate_launch_command(args)
        if f.name.startswith("zero"):
            assert args.use_deepspeed and not args.use_fsdp
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)   # as launch does
            _, env = prepare_deepspeed_cmd_env(args)
            assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == f.name[4]
            assert float(env["ACCELERATE_GRADIENT_CLIPPING"]) == 0.0   # DeepSpeed's default 1.0 would clip twice
            continue
        env = prepare_multi_gpu_env(args)
        assert env.get("ACCELERATE_USE_FSDP", "false") == ("true" if f.name.startswith("fsdp") else "false"), f.name
        if f.name.startswith("fsdp"):
            old = dict(os.environ)
            os.environ.update(env)
            try:
                plugin = FullyShardedDataParallelPlugin()
            finally:
                os.environ.clear()
                os.environ.update(old)
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
            assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
            offload = isinstance(plugin.cpu_offload, CPUOffloadPolicy)
            assert offload == (f.name == "fsdp_offload.yaml") and isinstance(plugin.cpu_offload, OffloadPolicy)


def test_fsdp_sft_equals_one_process_and_resumes_from_sharded_checkpoint(tmp_path, sft_one):
    """FSDP2 full shard on 2 processes: the weights, losses and gradient norms of 1 process; the
    held-out loss and the task suite (on the main process alone, the layers gathered whole) as 1
    process; each checkpoint holds one part per process, and final/ is a normal model. With the last
    checkpoint and final/ removed, --resume continues from step 2's sharded checkpoint to the same weights."""
    from transformers import AutoModelForCausalLM

    one, common = sft_one
    common = {**common, "save_every": 2}   # (checkpoints do not change the weights)
    two = tmp_path / "two"
    r = launch_two(["sft", *flags({**common, "output": str(two)})], tmp_path, recipe="fsdp.yaml")
    assert "sharded over 2 processes (FSDP)" in r.stderr
    assert_same_weights(one, two, tiny_dir())
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)
    assert grad_norms(two) == pytest.approx(grad_norms(one), rel=1e-3)
    ev1, ev2 = ([r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
                for run in (one, two))
    assert [r["step"] for r in ev2] == [r["step"] for r in ev1] == [0, 2, 3]
    for a, b in zip(ev1, ev2, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)
        assert b["suite/tasks/accuracy"] == a["suite/tasks/accuracy"]
    parts = sorted(p.name for p in (two / "checkpoints" / "step-000002" / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert parts == ["__0_0.distcp", "__1_0.distcp"]
    loaded = AutoModelForCausalLM.from_pretrained(two / "final")
    finished = load_file(str(two / "final" / "model.safetensors"))
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p.detach(), finished[name], atol=0, rtol=0, msg=name)

    shutil.rmtree(two / "checkpoints" / "step-000003")
    shutil.rmtree(two / "final")
    r = launch_two(["sft", *flags({**common, "output": str(two), "resume": True})], tmp_path, recipe="fsdp.yaml")
    assert "resumed from checkpoint at step 2 of 3" in r.stderr
    resumed = load_file(str(two / "final" / "model.safetensors"))
    for k in finished:
        torch.testing.assert_close(resumed[k], finished[k], atol=1e-6, rtol=0, msg=k)
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)   # step 3 logged again, once


def test_fsdp_offload_dpo_lora_equals_one_process(tmp_path, dpo_one):
    """LoRA under FSDP2 with CPU offload (fsdp_offload.yaml; without a GPU the offload runs unpinned):
    the frozen base and the adapter are sharded alike (FSDP2 keeps each parameter's own
    requires_grad, what FSDP1 needed use_orig_params for); the reference is the adapter switched off;
    adapter/ and the merged final/ equal 1 process's."""
    one, common = dpo_one
    r = launch_two(["dpo", *flags({**common, "output": str(tmp_path / "two")})], tmp_path, recipe="fsdp_offload.yaml")
    assert "sharded over 2 processes (FSDP)" in r.stderr
    assert_same_weights(one, tmp_path / "two", tiny_dir())
    a1, a2 = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (one, tmp_path / "two"))
    assert a1.keys() == a2.keys() and a1
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], atol=1e-5, rtol=0, msg=k)
    assert losses(tmp_path / "two") == pytest.approx(losses(one), rel=1e-5)
    assert grad_norms(tmp_path / "two") == pytest.approx(grad_norms(one), rel=1e-3)


def test_deepspeed_recipe_without_deepspeed_says_what_to_install(tmp_path, monkeypatch):
    """A zero*.yaml launch sets ACCELERATE_USE_DEEPSPEED; without the package (an optional extra) the
    run stops before training with the command that installs it."""
    import sys

    from chatsmith.data import Conversation, Message
    from chatsmith.errors import ChatsmithError
    from chatsmith.train.sft import run_sft

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)   # `import deepspeed` raises ImportError
    cfg = SFTConfig(model="tiny-random-llama", output=str(tmp_path / "run"), max_steps=1, method="full")
    with pytest.raises(ChatsmithError, match=r"pip install 'chatsmith\[deepspeed\]'.*fsdp.yaml"):
        run_sft(cfg, conversations=[Conversation([Message("user", "hi"), Message("assistant", "hello")])] * 4)
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_launched_process_ends_without_finalization(world):
    """A process started by a launcher (WORLD_SIZE > 1) leaves through os._exit once its command has
    returned: its output flushed, its exit status kept (0, and 2 for an error), and no interpreter
    finalization (where gloo's threads can abort a finished run); a single process exits normally."""
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('finalized', flush=True))\n"
              "from chatsmith.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "WORLD_SIZE": world, "RANK": "1"}
    ok = subprocess.run([sys.executable, "-c", script, "plan", "--model", "tiny-random-llama", "--method", "lora"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "weights in fp32" in ok.stdout   # the plan's last lines came out before the exit
    bad = subprocess.run([sys.executable, "-c", script, "plan", "--model", "/nonexistent", "--method", "lora"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "error: model '/nonexistent' not found" in bad.stderr
    for r in (ok, bad):
        assert ("finalized" in r.stdout) == (world == "1")
