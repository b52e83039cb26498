"""Load models and tokenizers from any model argument (see registry.py).

GGUF files (the embedded model included) are converted once to a cached safetensors directory:
a GGUF load de-quantises every tensor (slow) and a GGUF-loaded model refuses `save_pretrained`,
so we rebuild the model from its config, copy the weights in, and save a normal HF directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError, ModelNotFoundError
from chatsmith.models.registry import (
    ALIASES,
    ResolvedModel,
    cache_dir,
    embedded_gguf_path,
    gguf_cache_key,
    resolve_model,
)

log = logging.getLogger(__name__)

TINY_VERSION = "v2"
CONVERTER_VERSION = "v2"   # bump when convert_gguf changes, so stale caches are rebuilt


def _atomic_build(target: Path, build: Any) -> Path:
    """Build a directory under a temporary name and rename it into place (safe against crashes
    and against two processes converting at once: the loser discards its copy)."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _eot_generation_config(model: Any, tokenizer: Any) -> None:
    """Make generation stop at the chat template's end-of-turn token as well as at EOS."""
    from chatsmith.data.template import stop_token_ids

    ids = sorted(stop_token_ids(tokenizer))
    gc = model.generation_config
    gc.eos_token_id = ids[0] if len(ids) == 1 else ids
    if gc.pad_token_id is None:
        gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> safetensors HF directory (weights de-quantised to fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.name_or_path = ""
    # The weights are de-quantised now; a leftover gguf quantization_config would make
    # transformers treat the model as quantized and refuse to save it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), assign=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    _eot_generation_config(fresh, tok)
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def embedded_cache_target(gguf: Path) -> Path:
    """Where the embedded model's safetensors conversion of `gguf` lives (whether built yet or not)."""
    return cache_dir() / "models" / f"smollm2-135m-{gguf_cache_key(gguf)}-{CONVERTER_VERSION}"


def embedded_dir() -> Path:
    """The embedded model as a safetensors directory (converted from its GGUF once, then cached)."""
    gguf = embedded_gguf_path()
    target = embedded_cache_target(gguf)
    if not (target / "config.json").is_file():
        log.warning("converting the embedded model to safetensors once (cached in %s)", target)
    return _atomic_build(target, lambda tmp: convert_gguf(gguf, tmp))


def tiny_random_dir() -> Path:
    """A seeded 2-layer Llama with the embedded model's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = cache_dir() / "models" / f"tiny-random-llama-{TINY_VERSION}"

    def build(tmp: Path) -> None:
        _quiet_transformers()
        tok = AutoTokenizer.from_pretrained(str(embedded_dir()))
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        _eot_generation_config(model, tok)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_build(target, build)


def local_path(resolved: ResolvedModel) -> str:
    """A directory (or hub id) that `from_pretrained` can load."""
    if resolved.kind == "alias":
        return str(embedded_dir() if resolved.path == "smollm2-135m" else tiny_random_dir())
    if resolved.kind == "gguf":
        gguf = Path(resolved.path)
        target = cache_dir() / "models" / f"{gguf_cache_key(gguf)}-{CONVERTER_VERSION}"
        return str(_atomic_build(target, lambda tmp: convert_gguf(gguf, tmp)))
    if resolved.kind == "adapter" and (resolved.path in ALIASES or resolved.path.endswith(".gguf")):
        # An adapter trained on an alias or a GGUF names that as its base (run/adapter/ does).
        return local_path(resolve_model(resolved.path))
    return resolved.path


def _hub_error(spec: str, err: Exception) -> ModelNotFoundError:
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return ModelNotFoundError(
        f"could not load '{spec}' from the Hugging Face hub ({reason}). If this machine is offline, "
        f"download it where there is a network (`hf download {spec} --local-dir DIR`), copy DIR here "
        "and pass the directory as the model")


def load_tokenizer(spec: str | ResolvedModel, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model argument (an adapter's own when it has one); EOS doubles as pad when there is
    none."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    path = local_path(resolved)
    # An adapter directory may carry its own tokenizer (e.g. with added template tokens).
    src = resolved.adapter if resolved.adapter and Path(resolved.adapter, "tokenizer_config.json").is_file() else path
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if resolved.kind == "hub":
            raise _hub_error(resolved.spec, e) from None
        raise ModelNotFoundError(f"could not load a tokenizer from {src}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    _family_template(tok, path, resolved.spec)
    return tok


def _family_template(tokenizer: Any, path: str, spec: str) -> None:
    """A local checkpoint without a chat template gets its family's fallback (models/families.py)."""
    import json

    from chatsmith.models.families import apply_fallback_template

    config = Path(path) / "config.json"
    if getattr(tokenizer, "chat_template", None) or not config.is_file():
        return
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        return
    apply_fallback_template(tokenizer, kind, where=spec)


def _is_encoder_decoder(path: str) -> bool:
    """Whether the checkpoint at `path` is an encoder-decoder (T5, mT5), read from its config.json."""
    import json

    config = Path(path) / "config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text()).get("is_encoder_decoder"))
    except (OSError, ValueError):
        return False


def default_dtype(device: str | None = None) -> Any:
    """bf16 on a GPU that supports it, else fp32."""
    import torch

    if device and device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(
    spec: str | ResolvedModel,
    *,
    dtype: Any = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    merge_adapter: bool = True,
    allow_pickle: bool = False,
) -> tuple[Any, Any]:
    """Load (model, tokenizer). Weights come only from safetensors/GGUF unless allow_pickle is set,
    and no remote code runs unless trust_remote_code is set.

    quantization: None or "4bit" (QLoRA; needs bitsandbytes on a supported device).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    _quiet_transformers()
    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    path = local_path(resolved)
    # T5/mT5: `chatsmith sft` trains them (models/seq2seq.py), the engine runs them (infer/seq2seq.py).
    auto = AutoModelForSeq2SeqLM if _is_encoder_decoder(path) else AutoModelForCausalLM
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {
        "dtype": dtype or default_dtype(device),
        "trust_remote_code": trust_remote_code,
        "use_safetensors": None if allow_pickle else True,
    }
    if quantization == "4bit":
        kwargs["quantization_config"] = qlora_config(kwargs["dtype"])
        kwargs["device_map"] = {"": device or "cuda:0"}
    elif quantization is not None:
        raise ChatsmithError(f"unknown quantization '{quantization}'; use 4bit")
    try:
        model = auto.from_pretrained(path, **kwargs)
    except OSError as e:
        if resolved.kind == "hub":
            raise _hub_error(resolved.spec, e) from None
        if "safetensors" in str(e) and not allow_pickle:
            raise ModelNotFoundError(
                f"{path} has no safetensors weights. chatsmith loads only safetensors/GGUF because pickled "
                ".bin files can run code when loaded. If you trust this model, convert it once and pass the "
                "new directory: python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer "
                f"as T; M.from_pretrained('{path}', use_safetensors=False).save_pretrained('{path}-safe'); "
                f"T.from_pretrained('{path}').save_pretrained('{path}-safe')\"") from None
        raise ModelNotFoundError(f"could not load a model from {path}: {e}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ChatsmithError(f"{resolved.spec} needs its own model code; pass --trust-remote-code "
                                 "if you trust its authors") from None
        raise
    if resolved.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, resolved.adapter)
        # LoRA/DoRA merge into the weights; prompt/prefix tuning and LLaMA-Adapter stay wrapped.
        if merge_adapter and quantization is None and model.peft_config[model.active_adapter].peft_type.value in ("LORA",):
            model = model.merge_and_unload()
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    new_rows = Path(path) / "chatsmith_vocab.json"
    if resolved.kind != "hub" and new_rows.is_file():
        # `chatsmith vocab extend` added these rows; adapter methods train them (models/adapters.py).
        import json

        model.chatsmith_new_token_ids = json.loads(new_rows.read_text()).get("new_token_ids") or None
    if device and quantization is None:
        model.to(device)
    model.eval()
    torch.set_grad_enabled(True)
    return model, tokenizer


def qlora_config(compute_dtype: Any) -> Any:
    """4-bit NF4 with double quantisation (the QLoRA paper's recipe)."""
    import torch

    if not torch.cuda.is_available():
        raise ChatsmithError(
            "QLoRA needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on this device. "
            "Use --method lora here (same adapters, full-precision base), or run on a GPU machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ChatsmithError("QLoRA needs bitsandbytes: pip install 'chatsmith[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)
