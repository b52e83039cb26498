"""Token ids -> text, one token at a time, with stop strings: the one detokenizer of chatsmith.

The engine keeps one `TextStream` per request, so the chat, the server, evaluation and RL rollouts
all see the same text for the same tokens. Two things make incremental text hard:

- A character whose UTF-8 bytes are split over several tokens (emoji, CJK with byte-level BPE)
  cannot be shown until its last byte arrives; tokenizers' `DecodeStream` holds such bytes back
  (and handles the leading-space rules of SentencePiece-style decoders). A slow tokenizer without
  a Rust backend falls back to decoding the whole answer and emitting the new suffix, holding a
  trailing U+FFFD back.
- A stop string may be split over several tokens, and a token may run past it: text that could be
  the start of a stop string is held back until it cannot be, and generation's text ends where the
  first stop string begins (the stop string itself is never emitted, as in OpenAI's API).

The pieces returned by `push` and `finish` always join to `text`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """Incremental detokenisation of one generated sequence; see the module docstring."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.stop_string: str | None = None   # the stop string that ended the text, once one has
        self._decoded = ""                     # everything decoded so far (may run past a stop string)
        self._sent = 0                         # characters of _decoded already returned
        self._longest = max((len(s) for s in self.stop), default=0)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend
        self._stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    @property
    def stopped(self) -> bool:
        """Whether a stop string has appeared (the text is final)."""
        return self.stop_string is not None

    @property
    def text(self) -> str:
        """The text so far: up to the first stop string, including what is still held back."""
        return self._decoded if self.stop_string is None else self._decoded[: self._cut]

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to show (possibly "")."""
        if self.stop_string is not None:
            return ""
        self.ids.append(int(token_id))
        before = len(self._decoded)
        if self._stream is not None:
            piece = self._stream.step(self._backend, int(token_id))
            if piece:
                self._decoded += piece
        else:
            full = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens,
                                         clean_up_tokenization_spaces=False).rstrip("\ufffd")
            if full.startswith(self._decoded):   # a decoder that rewrites earlier text: show only what is new
                self._decoded = full
        if self.stop and len(self._decoded) > before:
            # A stop string that ends in the new text starts at most `longest - 1` characters earlier.
            start = max(0, before - self._longest + 1)
            hits = [(i, s) for s in self.stop if (i := self._decoded.find(s, start)) >= 0]
            if hits:
                self._cut, self.stop_string = min(hits)
                return self._emit(self._cut)
        return self._emit(len(self._decoded) - self._held_back())

    def finish(self) -> str:
        """The text still held back, once generation has ended (a character that never completed
        is shown as U+FFFD)."""
        if self.stop_string is None:
            full = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens,
                                         clean_up_tokenization_spaces=False)
            if full.startswith(self._decoded):   # bytes of an unfinished character, now final
                self._decoded = full
            return self._emit(len(self._decoded))
        return self._emit(self._cut)

    def _held_back(self) -> int:
        """Characters at the end of the text that could still become the start of a stop string."""
        for k in range(min(self._longest - 1, len(self._decoded) - self._sent), 0, -1):
            tail = self._decoded[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _emit(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        out, self._sent = self._decoded[self._sent: upto], upto
        return out
