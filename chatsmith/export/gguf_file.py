"""`--to gguf`: write a merged model as a GGUF file with gguf-py, in llama.cpp's own layout.

The layout follows llama.cpp's convert_hf_to_gguf.py: tensor names from gguf-py's TensorNameMap,
Llama's Q and K rows permuted from Hugging Face's rotate-half RoPE order to llama.cpp's interleaved
order (Qwen2 uses NEOX RoPE in llama.cpp and is not permuted), 1-D tensors and norms in f32, biases in
f32, a tied LM head not written (llama.cpp reuses token_embd), Llama 3 RoPE scaling as a rope_freqs
tensor. For q4_0/q4_1 the output projection (token_embd when tied) is q8_0, as llama.cpp's own
quantizer does for a model whose rows do not divide into 256-wide K-quant blocks; where they do it
would use q6_k, which gguf-py cannot write, so ours stays q8_0 there (a little larger, not worse).
A tensor whose rows do not divide into the type's blocks falls back to f16, as in the converter.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError
from chatsmith.export.source import ExportSource

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
K_QUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q3_k_m", "q4_k_m", "q5_k_m", "q4_k_s", "q5_k_s")


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face architecture maps onto llama.cpp's."""

    gguf_arch: str          # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool        # rotate-half -> interleaved RoPE rows for Q and K


ARCHITECTURES: dict[str, Arch] = {
    "LlamaForCausalLM": Arch("llama", True),       # Llama 2/3, SmolLM/SmolLM2, TinyLlama
    "MistralForCausalLM": Arch("llama", True),     # llama.cpp runs Mistral as llama
    "Qwen2ForCausalLM": Arch("qwen2", False),
}


def check_architecture(config: Any) -> Arch:
    """The mapping for this config, or an error that names the nearest supported architecture."""
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        guess = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        archs = [guess.get(getattr(config, "model_type", ""), getattr(config, "model_type", "unknown"))]
    arch = archs[0]
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    nearest = difflib.get_close_matches(arch, list(ARCHITECTURES), n=1, cutoff=0.0)[0]
    raise ChatsmithError(
        f"`chatsmith export --to gguf` does not support {arch} (supported: {', '.join(ARCHITECTURES)}); the "
        f"nearest supported architecture is {nearest}, but a file written as {nearest} would be a broken "
        f"{arch}. Export --to hf and convert that directory with llama.cpp's convert_hf_to_gguf.py")


def check_type(quant: str) -> str:
    q = quant.lower()
    if q in GGUF_TYPES:
        return q
    if q in K_QUANTS or q.endswith(("_k", "_k_m", "_k_s", "_k_l")):
        raise ChatsmithError(
            f"--quant {quant}: K-quants cannot be written by gguf-py (only de-quantised). Export --quant f16 and "
            f"run llama.cpp's `llama-quantize FILE.gguf OUT.gguf {quant.upper()}`, or choose one of "
            f"{', '.join(GGUF_TYPES)}")
    raise ChatsmithError(f"--quant {quant}: unknown type; choose one of {', '.join(GGUF_TYPES)}")


def permute_qk(w: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """Rows of a Q (or K) projection from HF's rotate-half RoPE order to llama.cpp's interleaved pairs:
    within each head, rows [0..d/2) and [d/2..d) become pairs (0, d/2), (1, d/2+1), ..."""
    heads = n_head_kv if n_head_kv is not None and n_head_kv != n_head else n_head
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _rope(config: Any) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config: Any) -> Any:
    """The per-frequency factors llama.cpp reads from `rope_freqs.weight` for Llama 3 RoPE scaling."""
    import torch

    p = _rope(config)
    dim = _head_dim(config)
    freqs = 1.0 / (p.get("rope_theta", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = p.get("factor", 8.0), p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old = p.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _write_hparams(w: Any, config: Any, arch: Arch, ftype: int) -> None:
    import gguf

    w.add_type(gguf.GGUFType.MODEL)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    rope = _rope(config)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if getattr(config, "head_dim", None) and config.head_dim != config.hidden_size // config.num_attention_heads:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    kind = rope.get("rope_type") or "default"
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):
        raise ChatsmithError(f"RoPE scaling '{kind}' is not written by chatsmith's GGUF export (default, linear, "
                             "yarn and llama3 are); export --to hf and use llama.cpp's converter")
    w.add_file_type(ftype)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(_head_dim(config))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(w: Any, v: Any, template: str) -> None:
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    w.add_token_types(v.types)
    if v.merges:
        w.add_token_merges(v.merges)
    for name, tid in v.special_ids.items():
        getattr(w, f"add_{name}_token_id")(tid)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    w.add_chat_template(template)


def tensor_type(name: str, n_dims: int, quant: str, output_role: bool) -> Any:
    """The GGML type one tensor gets in a file of type `quant` (see the module docstring)."""
    from gguf import GGMLQuantizationType as T

    if n_dims <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return T.F32
    target = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}[quant]
    if output_role and quant in ("q4_0", "q4_1"):
        target = T.Q8_0
    return target


def quantize_tensor(name: str, data: Any, quant: str, tied: bool) -> tuple[Any, Any]:
    """(bytes or array, GGML type) of one tensor under llama.cpp name `name` in a `quant` file."""
    import gguf
    import numpy as np

    qtype = tensor_type(name, data.ndim, quant, name == "output.weight" or (tied and name == "token_embd.weight"))
    try:
        return gguf.quants.quantize(np.ascontiguousarray(data), qtype), qtype
    except gguf.QuantError as e:
        log.warning("%s: %s, falling back to f16", name, e)
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "bf16": 32}


def gguf_tensors(model: Any, arch: Arch, quant: str, progress: bool = True):
    """(gguf name, data, ggml type) for every tensor, converted and quantised."""
    import gguf
    import torch
    from tqdm import tqdm

    config = model.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch.upper()), config.num_hidden_layers)
    state = model.state_dict()
    items = [(k, v) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")
             and not (tied and k == "lm_head.weight")]
    if _rope(config).get("rope_type") == "llama3":
        items.insert(0, ("rope_freqs.weight", llama3_rope_factors(config)))
    for hf_name, t in tqdm(items, desc=f"gguf {quant}", unit="tensor", disable=not progress):
        t = t.detach().to(torch.float32)
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_qk(t, n_head)
        elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_qk(t, n_head, n_kv)
        name = hf_name if hf_name == "rope_freqs.weight" else name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ChatsmithError(f"no llama.cpp name for the tensor {hf_name} of {type(model).__name__}; this model "
                                 "has parts chatsmith's GGUF export does not know. Export --to hf")
        out, qtype = quantize_tensor(name, t.numpy(), quant, tied)
        yield name, out, qtype


def write_gguf(src: ExportSource, path: Path, quant: str = "f16", *, pre_tokenizer: str | None = None,
               progress: bool = True) -> Path:
    """Write `src` to `path` as GGUF of type `quant` and return the path."""
    import gguf

    from chatsmith.export.vocab_meta import gguf_vocab

    quant = check_type(quant)
    config = src.model.config
    arch = check_architecture(config)
    eot_id = src.tokenizer.convert_tokens_to_ids(src.end_of_turn) if src.end_of_turn else None
    vocab_rows = src.model.get_input_embeddings().weight.shape[0]
    vocab = gguf_vocab(src.tokenizer, vocab_rows, eot_id, pre_override=pre_tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch.gguf_arch)
    try:
        w.add_name(_model_name(src))
        _write_hparams(w, config, arch, FILE_TYPES[quant])
        _write_vocab(w, vocab, src.template)
        for name, data, qtype in gguf_tensors(src.model, arch, quant, progress=progress):
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
    finally:
        w.close()
    tmp.replace(path)
    return path


def _model_name(src: ExportSource) -> str:
    p = Path(src.spec)
    name = p.name if p.name not in ("final", "adapter", "") else p.parent.name
    return name or src.spec
