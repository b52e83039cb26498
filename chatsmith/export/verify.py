"""The round trip after every GGUF export: reload the file and prove it is the model that was trained.

1. Metadata: the chat template, EOS and end-of-turn ids and the pre-tokenizer name are the source's.
2. Tokenizer: the file's tokenizer gives the source tokenizer's ids on a fixed multilingual text
   (llama.cpp's own tokenizer when the xllamacpp binding is installed, else transformers' GGUF reader).
3. Greedy tokens on a few chat prompts: the file loaded by transformers' GGUF reader (which de-quantises
   exactly) against the source with its weights rounded to the same GGML types ("the same precision"):
   every token must match. With llama.cpp installed, its greedy tokens (which end at the first
   end-of-generation token) are compared with the same rounded source too: f32 and f16 must match
   exactly, bf16 on the first 4 tokens (llama.cpp rounds activations to bf16 as well); quantised files
   run llama.cpp's quantised kernels, which round activations to 8 bits, so there the agreement is
   reported, not required.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError
from chatsmith.export.source import ExportSource

log = logging.getLogger(__name__)

VERIFY_TEXT = ("Hello world! The quick brown fox jumps over the lazy dog, 1234567 times. "
               "Grüße aus München, ça va? ¿Qué tal? Привет, как дела? 你好，世界！こんにちは。안녕하세요. "
               "مرحبا بالعالم. 🦙🚀 def f(x):\n\treturn x ** 2  # 3.14159\n\n  tabs\tand   spaces")
VERIFY_PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.",
                  "Wie viele Beine hat eine Spinne?")


@dataclass
class VerifyReport:
    """What the round trip checked and found."""

    path: str
    quant: str
    backends: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def greedy_ids(model: Any, ids: list[int], n: int) -> list[int]:
    """The first n greedy token ids after `ids` (no stop tokens), with a KV cache."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        x = torch.tensor([ids])
        past = None
        for _ in range(n):
            r = model(input_ids=x, past_key_values=past, use_cache=True)
            past = r.past_key_values
            nxt = int(r.logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


def rounded_like_gguf(model: Any, quant: str) -> Any:
    """A copy of `model` whose weights went through the GGML types the GGUF export gives them
    (quantised and de-quantised with gguf-py), computing in fp32."""
    import gguf
    import numpy as np
    import torch

    from chatsmith.export.gguf_file import check_architecture, quantize_tensor

    arch = check_architecture(model.config)
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch.upper()),
                                        model.config.num_hidden_layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for hf_name, p in rounded.named_parameters():
            if tied and hf_name == "lm_head.weight":
                continue
            name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias")) or hf_name
            data = p.detach().float().numpy()
            q, qtype = quantize_tensor(name, data, quant, tied)
            back = gguf.quants.dequantize(q, qtype).reshape(data.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(back)))
    return rounded


def _field_str(reader: Any, key: str) -> str | None:
    f = reader.get_field(key)
    return None if f is None else bytes(f.parts[f.data[0]]).decode("utf-8")


def _field_int(reader: Any, key: str) -> int | None:
    f = reader.get_field(key)
    return None if f is None else int(f.parts[f.data[0]][0])


def check_metadata(path: Path, src: ExportSource, report: VerifyReport) -> None:
    import gguf

    r = gguf.GGUFReader(str(path))
    template = _field_str(r, "tokenizer.chat_template")
    eos = _field_int(r, "tokenizer.ggml.eos_token_id")
    eot = _field_int(r, "tokenizer.ggml.eot_token_id")
    report.checks["metadata"] = {"chat_template_equal": template == src.template, "eos_token_id": eos,
                                 "eot_token_id": eot, "pre": _field_str(r, "tokenizer.ggml.pre")}
    if template != src.template:
        report.problems.append("the GGUF's chat template differs from the source's")
    want_eot = src.tokenizer.convert_tokens_to_ids(src.end_of_turn) if src.end_of_turn else None
    if eos != src.tokenizer.eos_token_id or (want_eot is not None and eot != want_eot):
        report.problems.append(f"EOS/EOT ids in the file ({eos}/{eot}) are not the source's "
                               f"({src.tokenizer.eos_token_id}/{want_eot})")


def _prompt_ids(src: ExportSource) -> list[list[int]]:
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation

    return [render_conversation(src.tokenizer, Conversation([Message("user", p)]), template=src.template,
                                add_generation_prompt=True).input_ids for p in VERIFY_PROMPTS]


def verify_gguf(src: ExportSource, path: Path, quant: str, *, n_tokens: int = 16,
                use_llamacpp: bool | None = None) -> VerifyReport:
    """Reload `path` and check it against `src` (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatsmith.export import llamacpp

    report = VerifyReport(str(path), quant)
    check_metadata(path, src, report)
    want_ids = src.tokenizer.encode(VERIFY_TEXT, add_special_tokens=False)
    prompts = _prompt_ids(src)

    # transformers' GGUF reader: exact de-quantisation, so greedy tokens must equal the rounded source's.
    report.backends.append("transformers-gguf")
    gm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ref = rounded_like_gguf(src.model, quant).eval() if quant != "f32" else src.model.eval()
    want_greedy = [greedy_ids(ref, p, n_tokens) for p in prompts]
    got = [greedy_ids(gm, p, n_tokens) for p in prompts]
    same = [a == b for a, b in zip(want_greedy, got)]
    report.checks["greedy_transformers"] = {"prompts": len(prompts), "tokens": n_tokens, "equal": sum(same)}
    if not all(same):
        report.problems.append(f"transformers' GGUF reader: greedy tokens differ from the source (same precision) "
                               f"on {same.count(False)} of {len(same)} prompts")
    del gm

    if use_llamacpp is None:
        use_llamacpp = llamacpp.available()
    if use_llamacpp:
        report.backends.append("llama.cpp")
        with llamacpp.LlamaCpp(path) as lc:
            ids = lc.tokenize(VERIFY_TEXT)
            report.checks["tokenizer"] = {"backend": "llama.cpp", "tokens": len(want_ids), "equal": ids == want_ids}
            if ids != want_ids:
                report.problems.append(f"llama.cpp tokenizes the check text differently ({len(ids)} tokens vs "
                                       f"{len(want_ids)}): the pre-tokenizer or the vocabulary is wrong")
            lc_greedy = [lc.greedy(p, n_tokens) for p in prompts]
        stops = set(src.stop_ids)
        agree = [_prefix(until_stop(a, stops), b) for a, b in zip(want_greedy, lc_greedy)]
        exact = [until_stop(a, stops) == b for a, b in zip(want_greedy, lc_greedy)]
        report.checks["greedy_llamacpp"] = {"prompts": len(prompts), "tokens": n_tokens, "prefix_agreement": agree,
                                            "equal": sum(exact)}
        if (quant in ("f32", "f16") and not all(exact)) or (quant == "bf16" and min(agree) < min(n_tokens, 4)):
            report.problems.append(f"llama.cpp's greedy tokens part from the source's in the same precision "
                                   f"(matching prefixes {agree} of {n_tokens}): the file computes a different function")
    else:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        ids = tok.encode(VERIFY_TEXT, add_special_tokens=False)
        report.checks["tokenizer"] = {"backend": "transformers-gguf", "tokens": len(want_ids), "equal": ids == want_ids}
        if ids != want_ids:
            report.problems.append("transformers' GGUF tokenizer gives other ids on the check text than the source "
                                   "(install xllamacpp to check with llama.cpp's own tokenizer)")
    return report


def until_stop(ids: list[int], stops: set[int]) -> list[int]:
    """`ids` up to and including the first stop id (where llama.cpp ends a generation)."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def raise_on_problems(report: VerifyReport) -> None:
    if not report.ok:
        raise ChatsmithError(f"round-trip check of {report.path} failed: " + "; ".join(report.problems)
                             + ". The file is kept for inspection; --no-verify skips this check")
