"""Model arguments: aliases, HF dirs, run dirs, adapter dirs, .gguf files, hub ids offline."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chatsmith.errors import ModelNotFoundError
from chatsmith.models import load_model, resolve_model
from chatsmith.models.loading import local_path
from chatsmith.models.registry import embedded_gguf_path


def test_aliases_and_directories(tmp_path):
    assert resolve_model("smollm2-135m").kind == "alias"
    tiny = local_path(resolve_model("tiny-random-llama"))
    assert resolve_model(tiny).kind == "hf_dir"
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    r = resolve_model(str(run))
    assert r.kind == "run" and r.path.endswith("final")


def test_adapter_directory_resolves_its_base(tmp_path):
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text('{"base_model_name_or_path": "tiny-random-llama"}')
    r = resolve_model(str(ad))
    assert r.kind == "adapter" and r.adapter == str(ad) and r.path == "tiny-random-llama"


def test_gguf_file_loads_and_is_cached():
    gguf = embedded_gguf_path()
    r = resolve_model(str(gguf))
    assert r.kind == "gguf"
    model, tok = load_model(r)
    assert model.config.num_hidden_layers == 30 and tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == 2


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not an alias.*chatsmith models"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="holds no model"):
        resolve_model(str(tmp_path / "empty"))


def test_hub_id_offline_says_how_to_use_a_local_copy():
    r = subprocess.run([sys.executable, "-m", "chatsmith", "chat", "someone/some-model", "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr[-1500:]
    assert "could not load 'someone/some-model'" in r.stderr and "--local-dir" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_remote_code_and_safetensors_only(tmp_path):
    """A directory with only a pickled .bin is refused unless the user opts in."""
    import shutil

    src = local_path(resolve_model("tiny-random-llama"))
    d = tmp_path / "bin-only"
    shutil.copytree(src, d)
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d)
    (d / "model.safetensors").unlink()
    torch.save(m.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ModelNotFoundError, match="no safetensors weights") as err:
        load_model(str(d))
    # The error's own conversion command works, and its output loads.
    command = str(err.value).split("python -c ", 1)[1].strip().strip('"')
    subprocess.run([sys.executable, "-c", command], check=True, capture_output=True)
    model, _ = load_model(f"{d}-safe")
    assert model.config.num_hidden_layers == 2
    model, _ = load_model(str(d), allow_pickle=True)   # the Python API can opt in explicitly
    assert model.config.num_hidden_layers == 2


def test_cli_models_and_help():
    r = subprocess.run([sys.executable, "-m", "chatsmith", "models"], capture_output=True, text=True)
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "tiny-random-llama" in r.stdout
    r = subprocess.run([sys.executable, "-m", "chatsmith", "sft", "--help"], capture_output=True, text=True)
    assert "examples:" in r.stdout and "--method" in r.stdout and "--resume" in r.stdout


def test_every_help_page_renders_cleanly():
    """Every command's --help (examples included) prints, in one process, with no '%%' left over
    from argparse's %-formatting (epilogs are printed raw, help strings are %-formatted)."""
    import argparse
    import contextlib
    import io

    from chatsmith.cli import _parser as build_parser

    def parsers(p: argparse.ArgumentParser):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    seen = 0
    for p in parsers(build_parser()):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            p.print_help()
        assert "%%" not in out.getvalue(), p.prog
        seen += 1
    assert seen > 20


def test_import_is_light():
    code = "import sys, chatsmith.cli; bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; print(bad)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]"
