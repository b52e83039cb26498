"""What chatsmith knows about each base-model family: where its blocks are, how packed rows stay
exact, which engine path decodes it, whether `export --to gguf` writes it, and the chat template a
base checkpoint without one of its own gets.

One row per family, keyed by the `model_type` in the checkpoint's config.json, so a tiny random
config built in a test and a real checkpoint downloaded elsewhere take the same code path. The
table is data; the functions below it are the only readers. docs/families.md shows it as a table
and says which test backs each cell.

Packed rows (several training examples back to back in one row, data/packing.py) are exact in one
of three ways, named by `Family.packing`:

- "segment": chatsmith's segment attention (models/attention.py) runs SDPA on each example's own
  span; sliding windows are applied inside the span.
- "positions": the model's own attention (eager, not SDPA) builds a block-diagonal mask from the
  restarting position ids, which transformers does for these families (Gemma 2: logit
  soft-capping is eager-only in transformers, so SDPA is not available to it).
- "per-example": the family cannot keep examples apart inside one row, so the backbone runs each
  example on its own and the hidden states are put back in row order (models/attention.py). The
  numbers are exact; the row only saves the padding. `packing_reason` says why.
- "padded": encoder-decoder models (T5): each example has its own encoder input, so batches are
  padded (models/seq2seq.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from chatsmith.errors import ChatsmithError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """One base-model family (see the module docstring for `packing`)."""

    name: str                       # what users call it
    model_types: tuple[str, ...]    # config.json model_type values
    projects: str                   # the ChatGPT-alternative projects built on it
    layers: str                     # dotted path from the *ForCausalLM model to its list of blocks
    final_norm: str | None          # dotted path to the norm after the last block (trains with freeze)
    packing: str                    # segment | positions | per-example
    packing_reason: str = ""        # why, when packing is not "segment"
    int8: bool = False              # the engine's native int8 decode step (Llama-family runner)
    gguf: bool = False              # `chatsmith export --to gguf` writes it
    fallback_template: str = "alpaca"   # used when a checkpoint has no chat template of its own
    # Whether the model's own (non-SDPA: eager, flash) attention keeps packed examples apart from the
    # restarting position ids; when not, a non-SDPA model of the family runs examples one by one.
    own_mask_packs: bool = True
    gguf_reason: str = ("chatsmith's GGUF writer maps Llama, Mistral and Qwen2 tensors only; export --to hf "
                        "and convert that directory with llama.cpp's convert_hf_to_gguf.py")


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), "Alpaca, Vicuna, Koala, Baize, SmolLM2", "model.layers", "model.norm",
           "segment", int8=True, gguf=True, fallback_template="vicuna"),
    Family("Mistral", ("mistral",), "Zephyr, OpenHermes", "model.layers", "model.norm", "segment",
           int8=True, gguf=True, fallback_template="zephyr"),
    Family("Qwen2", ("qwen2",), "Qwen2-Instruct", "model.layers", "model.norm", "segment", int8=True, gguf=True,
           fallback_template="zephyr"),
    Family("Gemma 2", ("gemma2",), "Gemma-2-it", "model.layers", "model.norm", "positions",
           "attention logit soft-capping runs only in transformers' eager attention, which masks packed "
           "rows from their restarting position ids", fallback_template="zephyr"),
    Family("Gemma 3", ("gemma3_text",), "Gemma-3-it", "model.layers", "model.norm", "segment",
           fallback_template="zephyr"),
    Family("Phi-3", ("phi3",), "Phi-3-mini-instruct", "model.layers", "model.norm", "segment",
           fallback_template="zephyr"),
    Family("GPT-2", ("gpt2",), "Cerebras-GPT, DialoGPT", "transformer.h", "transformer.ln_f", "segment"),
    Family("GPT-NeoX", ("gpt_neox",), "Dolly v2, OpenChatKit, StableLM-alpha, Pythia", "gpt_neox.layers",
           "gpt_neox.final_layer_norm", "segment"),
    Family("GPT-J", ("gptj",), "Dolly v1, GPT4All-J", "transformer.h", "transformer.ln_f", "segment"),
    Family("BLOOM", ("bloom",), "BELLE, Firefly, BLOOMZ", "transformer.h", "transformer.ln_f", "per-example",
           "transformers' BLOOM attention is its own (ALiBi, no attention-function hook) and builds a plain "
           "causal mask without position ids, so examples in one row would attend to each other"),
    Family("OPT", ("opt",), "OPT-IML", "model.decoder.layers", "model.decoder.final_layer_norm", "segment",
           own_mask_packs=False),   # builds its causal mask without the position ids
    Family("GPT-BigCode", ("gpt_bigcode",), "SantaCoder, StarCoder, StarChat", "transformer.h",
           "transformer.ln_f", "segment"),
    Family("GLM", ("glm", "glm4"), "ChatGLM (as transformers ships GLM natively)", "model.layers", "model.norm",
           "segment", fallback_template="zephyr"),
    Family("RWKV", ("rwkv",), "ChatRWKV, Raven", "rwkv.blocks", "rwkv.ln_out", "per-example",
           "a recurrent model: its state flows from one token to the next whatever the position ids say, so "
           "an example in a row would start from the state the previous one left"),
    # Encoder-decoder: prompt in the encoder, answer in the decoder (models/seq2seq.py); padded batches.
    Family("T5 / mT5", ("t5", "mt5"), "ChatYuan, FastChat-T5", "decoder.block", "decoder.final_layer_norm",
           "padded", "an encoder-decoder: each example has its own encoder input, so examples are padded "
           "into a batch, never packed into one row"),
)


_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def model_type(model: Any) -> str | None:
    """The config.json model_type of `model` (a PEFT wrapper, a value-head model or a bare config)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", base)
    return getattr(config, "model_type", None)


def family_of(model_or_type: Any) -> Family | None:
    """The family of a model, a config or a model_type string; None for a family not in the table."""
    kind = model_or_type if isinstance(model_or_type, str) else model_type(model_or_type)
    return _BY_TYPE.get(kind or "")


def supported_types() -> list[str]:
    """Every model_type in the table, sorted."""
    return sorted(_BY_TYPE)


def attribute(model: Any, path: str | None) -> Any:
    """The object at dotted `path` under `model`, or None."""
    if not path:
        return None
    obj = model
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


_BLOCK_PATHS = tuple(dict.fromkeys(f.layers for f in FAMILIES))
_NORM_PATHS = tuple(dict.fromkeys(f.final_norm for f in FAMILIES if f.final_norm))


def transformer_blocks(model: Any) -> Any:
    """The model's list of transformer blocks (the family's path, else the known paths in turn), or
    a ChatsmithError naming the model class."""
    fam = family_of(model)
    for path in ((fam.layers,) if fam else ()) + _BLOCK_PATHS:
        blocks = attribute(model, path)
        if blocks is not None:
            return blocks
    raise ChatsmithError(f"--method freeze does not know where the transformer blocks of "
                         f"{type(model).__name__} are; use --method lora or full")


def final_norm(model: Any) -> Any:
    """The norm after the last block (trained alongside the last blocks by --method freeze), or None."""
    fam = family_of(model)
    for path in ((fam.final_norm,) if fam and fam.final_norm else ()) + _NORM_PATHS:
        norm = attribute(model, path)
        if norm is not None:
            return norm
    return None


def apply_fallback_template(tokenizer: Any, kind: str | None, where: str = "the model") -> str | None:
    """Give a tokenizer without a chat template its family's fallback (data/template.py's named
    templates; the tokenizer's EOS ends a turn, so no token is added). Returns the template's name,
    or None when the tokenizer has a template of its own. The template then travels with the
    tokenizer into every run, the server and every export."""
    from chatsmith.data.template import FALLBACK_TEMPLATES, has_chat_template

    if has_chat_template(tokenizer):
        return None
    fam = _BY_TYPE.get(kind or "")
    name = fam.fallback_template if fam else "alpaca"
    tokenizer.chat_template = FALLBACK_TEMPLATES[name][0]
    log.warning("%s has no chat template of its own; using the '%s' fallback template%s (pass --template "
                "to choose another)", where, name, f" of the {fam.name} family" if fam else "")
    return name


def packing_mode(model: Any) -> str:
    """How packed rows stay exact for this loaded `model`: segment, positions, per-example or padded (module
    docstring). A "segment" family loaded with another attention than SDPA keeps its own mask when
    that mask reads the position ids, else runs examples one by one; a family not in the table gets
    segment attention under SDPA and runs examples one by one otherwise (always exact)."""
    fam = family_of(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    sdpa = getattr(getattr(base, "config", None), "_attn_implementation", None) in ("sdpa", "chatsmith_segments")
    if fam is None:
        return "segment" if sdpa else "per-example"
    if fam.packing != "segment" or sdpa:
        return fam.packing
    return "positions" if fam.own_mask_packs else "per-example"
