"""Shared fixtures: the embedded tokenizer and tiny models come from chatsmith's own cache
(built offline from the embedded GGUF on first use); the real dataset samples come from
../shared/data, named in one place here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs two pytest-xdist workers on this 2-core machine: each worker, and every process it
# starts, computes on one thread (two workers with two OpenMP threads each would fight over the cores).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

# The repository sits beside shared/ (CI clones it the same way).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def shared_file(name: str) -> Path:
    """The path of one real dataset sample in ../shared/data, or a failure that says where it was expected."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.fail(f"the real dataset sample {name} is missing: expected {path} (the shared data folder "
                    "that sits beside this repository; see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from chatsmith.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"expected the shared data samples at {SHARED_DATA} (the folder beside this repository)")
    return SHARED_DATA


class Crash(Exception):
    """Raised by `crash_after_step` to stop a training run as a crash would (no checkpoint written)."""


@pytest.fixture
def crash_after_step(monkeypatch):
    """crash_after_step(n): the next training run raises Crash right after logging step n."""
    from chatsmith.train import loop

    def arm(n: int) -> None:
        original = loop.Trainer._log

        def _log(self, record):
            original(self, record)
            if record.get("step") == n and "loss" in record:
                monkeypatch.setattr(loop.Trainer, "_log", original)   # one crash only
                raise Crash(f"crashed after step {n}")

        monkeypatch.setattr(loop.Trainer, "_log", _log)

    return arm


def run_cli(args: list[str], cwd: Path, monkeypatch, capsys) -> str:
    """`chatsmith ARGS` in this process (the same argument parsing and code as the command, without
    a new interpreter's start-up); fails with the command's stderr unless it exits 0. Returns stderr."""
    from chatsmith.cli import main

    monkeypatch.chdir(cwd)
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 0, (args, err[-3000:])
    return err


# Run `python -m chatsmith ARGS` in a process that kills itself (SIGKILL, like `kill -9` or the OOM
# killer) right after it logs step N: python -c KILL_AFTER_STEP N ARGS...
KILL_AFTER_STEP = """
import os, signal, sys
from chatsmith.cli import main
from chatsmith.train import loop
step, original = int(sys.argv[1]), loop.Trainer._log
def _log(self, record):
    original(self, record)
    if record.get("step") == step and "loss" in record:
        os.kill(os.getpid(), signal.SIGKILL)
loop.Trainer._log = _log
sys.exit(main(sys.argv[2:]))
"""


def trained_segments(tok, r) -> list[str]:
    """Decode each maximal run of trained tokens of a Rendered (ids + loss mask)."""
    segs, cur = [], []
    for t, m in zip(r.input_ids, r.loss_mask):
        if m:
            cur.append(t)
        elif cur:
            segs.append(tok.decode(cur))
            cur = []
    return segs + ([tok.decode(cur)] if cur else [])
