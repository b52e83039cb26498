"""Ship a model: `chatsmith export MODEL --to hf|gguf|ollama`.

source.py loads MODEL with its adapter merged into full-precision weights; hf.py, gguf_file.py and
ollama.py write the formats; verify.py reloads a GGUF and proves it is the same model (tokenizer ids,
greedy tokens, template and stop ids), through llama.cpp itself when xllamacpp is installed.
Importing this package imports nothing heavy.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError

TARGETS = ("hf", "gguf", "ollama")
DEFAULT_QUANT = {"hf": "f32", "gguf": "f16", "ollama": "q8_0"}


@dataclass
class ExportResult:
    """What was written, and what the round trip found."""

    target: str
    quant: str
    paths: list[str]
    seconds: float
    verify: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def export_model(spec: str, to: str, output: str | Path, *, quant: str | None = None, verify: bool = True,
                 template: str | None = None, system_prompt: str | None = None, pre_tokenizer: str | None = None,
                 progress: bool = True, trust_remote_code: bool = False) -> ExportResult:
    """Export MODEL (`spec`) to `output` as `to` (hf, gguf or ollama); see the module docstring."""
    from chatsmith.export.source import load_source

    if to not in TARGETS:
        raise ChatsmithError(f"--to {to}: choose one of {', '.join(TARGETS)}")
    quant = (quant or DEFAULT_QUANT[to]).lower()
    output = Path(output)
    t0 = time.perf_counter()
    if to == "hf":
        from chatsmith.export.hf import HF_DTYPES, write_hf

        if quant not in HF_DTYPES:
            raise ChatsmithError(f"--quant {quant} is a GGUF type; a Hugging Face directory is written in one of "
                                 f"{', '.join(HF_DTYPES)}")
        src = load_source(spec, template=template, system_prompt=system_prompt, trust_remote_code=trust_remote_code)
        write_hf(src, output, quant)
        return ExportResult(to, quant, [str(output)], time.perf_counter() - t0, notes=src.notes)

    from chatsmith.export.gguf_file import check_architecture, check_type, write_gguf

    quant = check_type(quant)
    src = load_source(spec, template=template, system_prompt=system_prompt, trust_remote_code=trust_remote_code)
    check_architecture(src.model.config)
    name = _safe_name(spec)
    if to == "ollama":   # a directory: the GGUF beside its Modelfile
        from chatsmith.export.ollama import modelfile

        path = output / f"{name}-{quant}.gguf"
        # Check that the template translates before spending time on the weights.
        modelfile(path.name, src.tokenizer, src.template, src.end_of_turn, src.system_prompt, source=spec)
    else:
        path = output if output.suffix == ".gguf" else output / f"{name}-{quant}.gguf"
    write_gguf(src, path, quant, pre_tokenizer=pre_tokenizer, progress=progress)
    seconds = time.perf_counter() - t0
    paths = [str(path)]
    if to == "ollama":
        from chatsmith.export.ollama import write_modelfile

        paths.append(str(write_modelfile(output, path, src)))
    report = None
    if verify:
        from chatsmith.export.verify import raise_on_problems, verify_gguf

        r = verify_gguf(src, path, quant)
        report = {"backends": r.backends, "checks": r.checks, "problems": r.problems}
        (path.parent / (path.name + ".verify.json")).write_text(json.dumps(report, indent=2))
        raise_on_problems(r)
    return ExportResult(to, quant, paths, seconds, verify=report, notes=src.notes)


def _safe_name(spec: str) -> str:
    p = Path(spec)
    name = p.name if p.name not in ("final", "adapter", "") else p.parent.name
    name = name.removesuffix(".gguf") or "model"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def print_result(r: ExportResult) -> None:
    """The summary `chatsmith export` prints."""
    for n in r.notes:
        print(f"note: {n}")
    for p in r.paths:
        print(f"wrote {p}")
    print(f"{r.target} {r.quant}: {r.seconds:.1f} s")
    if r.verify is not None:
        checks = r.verify["checks"]
        tok = checks.get("tokenizer", {})
        tr = checks.get("greedy_transformers", {})
        line = (f"round trip ({', '.join(r.verify['backends'])}): tokenizer ids equal on {tok.get('tokens')} tokens "
                f"({tok.get('backend')}), greedy tokens equal on {tr.get('equal')}/{tr.get('prompts')} prompts x "
                f"{tr.get('tokens')} tokens (transformers, same precision)")
        if "greedy_llamacpp" in checks:
            line += f", llama.cpp matching prefixes {checks['greedy_llamacpp']['prefix_agreement']}"
        print(line)
    if r.target == "ollama":
        mf = Path(r.paths[-1])
        print(f"then: ollama create {mf.parent.name or 'mymodel'} -f {mf}")
        print(f"      ollama run {mf.parent.name or 'mymodel'}")
