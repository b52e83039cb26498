"""llama.cpp itself, through the xllamacpp binding (a prebuilt CPU wheel: `pip install xllamacpp`), for
checking an exported GGUF the way its users will run it. Optional: `available()` says whether it is
installed. The binding starts llama.cpp's own server on a loopback port; we talk to its native routes
(/tokenize, /completion) and its OpenAI chat route, which applies the GGUF's own chat template."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any


def available() -> bool:
    """Whether the xllamacpp binding is installed."""
    import importlib.util

    return importlib.util.find_spec("xllamacpp") is not None


class LlamaCpp:
    """One GGUF file loaded in llama.cpp (CPU). Use as a context manager."""

    def __init__(self, path: str | Path, n_ctx: int = 1024, threads: int | None = None) -> None:
        import xllamacpp as xlc

        p = xlc.CommonParams()
        p.model.path = str(path)
        p.n_ctx = n_ctx
        n = threads or max(1, min(4, os.cpu_count() or 1))
        p.cpuparams.n_threads = n
        p.cpuparams_batch.n_threads = n
        p.n_parallel = 1
        p.warmup = False
        p.verbosity = -1   # llama.cpp's log: errors only
        self._server = xlc.Server(p)
        self.url = self._server.listening_address

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._server = None   # the binding stops the server when it is collected

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids as llama.cpp's tokenizer (with the file's pre-tokenizer) gives them."""
        return list(self._post("/tokenize", {"content": text, "add_special": add_special,
                                             "parse_special": parse_special})["tokens"])

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """Up to `n` greedy token ids after `ids`, ending with the end-of-generation token when one comes
        (llama.cpp stops there, as a chat does)."""
        r = self._post("/completion", {"prompt": ids, "n_predict": n, "temperature": 0, "top_k": 1,
                                       "return_tokens": True, "cache_prompt": False, "samplers": ["top_k"]})
        return list(r["tokens"])

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 64) -> dict[str, Any]:
        """One greedy chat answer through llama.cpp's chat handler with the GGUF's own template:
        {'content', 'finish_reason'}."""
        r = self._server.handle_chat_completions({"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                                                  "top_k": 1})
        c = r["choices"][0]
        return {"content": c["message"]["content"], "finish_reason": c["finish_reason"]}

    def apply_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt llama.cpp renders from the GGUF's chat template (generation prompt added)."""
        return self._post("/apply-template", {"messages": messages})["prompt"]
