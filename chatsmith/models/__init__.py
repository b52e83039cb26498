"""Models: resolve a model argument, load/save HF directories, GGUF files, the embedded default,
and wrap them with adapters (LoRA, DoRA, QLoRA, prompt/prefix tuning, LLaMA-Adapter)."""

from chatsmith.models.loading import load_model, load_tokenizer
from chatsmith.models.registry import ALIASES, ResolvedModel, resolve_model

__all__ = ["ALIASES", "ResolvedModel", "resolve_model", "load_model", "load_tokenizer"]
