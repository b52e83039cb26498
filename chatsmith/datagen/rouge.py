"""ROUGE-L F1 between instructions, and a pool that finds whether a new instruction is too close
to any instruction already in it, fast enough for 50K instructions.

ROUGE-L (Lin 2004, section 3.1) with beta = 1: for token sequences a (reference) and b (candidate),
P = LCS(a, b) / |b|, R = LCS(a, b) / |a|, F1 = 2PR / (P + R) = 2 LCS / (|a| + |b|).

Tokens: lower-cased runs of letters and digits, as `rouge-score` makes them for ASCII text, so on
English the scores equal rouge-score's exactly; but letters of any script count (rouge-score keeps
only [a-z0-9], so a Chinese or Russian instruction scores 0 against everything), and CJK text, which
has no spaces, is one token per character. No stemming (Alpaca ran rouge-score without it).

The LCS is rapidfuzz's bit-parallel `LCSseq` on strings where each distinct token is one character,
exact and far faster than a Python dynamic program. The pool prefilters before computing any LCS:
LCS(a, b) <= |a ∩ b| (tokens in common, counted with multiplicity), so a pool entry can reach the
threshold only if 2 |a ∩ b| / (|a| + |b|) >= threshold; the overlaps with every pool entry come from
an inverted index (token -> entries holding it, with counts) in one numpy pass, and only the few
entries that pass are scored exactly.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

# Letters and digits of any script, except CJK ideographs and kana, which are one token each.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def rouge_tokens(text: str) -> list[str]:
    """The tokens ROUGE-L compares (see the module docstring)."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (rapidfuzz, exact)."""
    from rapidfuzz.distance import LCSseq

    return int(LCSseq.similarity(a, b))


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F1 of two texts (0 when either has no tokens)."""
    a, b = rouge_tokens(reference), rouge_tokens(candidate)
    if not a or not b:
        return 0.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


class _Growable:
    """An int array that grows by doubling (a posting list)."""

    __slots__ = ("data", "n")

    def __init__(self, dtype: type) -> None:
        self.data = np.empty(4, dtype=dtype)
        self.n = 0

    def append(self, value: int) -> None:
        if self.n == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        self.data[self.n] = value
        self.n += 1

    def view(self) -> np.ndarray:
        return self.data[: self.n]


class RougePool:
    """Instructions seen so far; `most_similar(text)` gives the highest ROUGE-L F1 against them.

    `threshold`: scores below it need not be exact (the prefilter skips entries that cannot reach
    it); anything at or above it is computed exactly, so `max_score(x) > threshold` decides the same
    as an all-pairs scan.
    """

    def __init__(self, threshold: float = 0.7, texts: Iterable[str] = ()) -> None:
        self.threshold = threshold
        self.texts: list[str] = []
        self._encoded: list[str] = []     # each entry's tokens as one char per distinct token
        self._lengths = _Growable(np.int32)
        self._vocab: dict[str, int] = {}
        self._postings: list[tuple[_Growable, _Growable]] = []   # token id -> (entry ids, counts)
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self.texts)

    def _ids(self, tokens: list[str], grow: bool) -> list[int]:
        out = []
        for t in tokens:
            i = self._vocab.get(t)
            if i is None:
                if not grow:
                    out.append(-1)
                    continue
                i = self._vocab[t] = len(self._vocab)
                self._postings.append((_Growable(np.int32), _Growable(np.int16)))
            out.append(i)
        return out

    @staticmethod
    def _encode(ids: list[int]) -> str:
        # One character per token id, skipping the surrogate range (not valid in a str for rapidfuzz).
        return "".join(chr(i + 0x100 if i + 0x100 < 0xD800 else i + 0x100 + 0x800) for i in ids)

    def add(self, text: str) -> None:
        """Add an instruction to the pool."""
        tokens = rouge_tokens(text)
        ids = self._ids(tokens, grow=True)
        entry = len(self.texts)
        self.texts.append(text)
        self._encoded.append(self._encode(ids))
        self._lengths.append(len(ids))
        for tok, count in Counter(ids).items():
            docs, counts = self._postings[tok]
            docs.append(entry)
            counts.append(min(count, 32767))

    def candidates(self, text: str) -> tuple[list[int], str, int]:
        """Pool entries that might reach the threshold (the prefilter), the encoded query and its length."""
        tokens = rouge_tokens(text)
        ids = self._ids(tokens, grow=False)
        n = len(ids)
        if not n or not self.texts:
            return [], "", n
        overlap = np.zeros(len(self.texts), dtype=np.int32)
        for tok, count in Counter(i for i in ids if i >= 0).items():
            docs, counts = self._postings[tok]
            overlap[docs.view()] += np.minimum(counts.view(), count)
        lengths = self._lengths.view()
        bound = 2.0 * overlap / (lengths + n)
        # The query's own unseen tokens get distinct characters that occur in no pool entry.
        unseen = iter(range(len(self._vocab), len(self._vocab) + n))
        encoded = self._encode([i if i >= 0 else next(unseen) for i in ids])
        return np.flatnonzero(bound >= self.threshold).tolist(), encoded, n

    def most_similar(self, text: str, top: int = 0) -> tuple[float, list[tuple[float, str]]]:
        """(the highest ROUGE-L F1 among entries that can reach the threshold, else 0.0; the `top`
        most similar such entries as (score, text), best first)."""
        from rapidfuzz.distance import LCSseq

        idx, encoded, n = self.candidates(text)
        best, scored = 0.0, []
        for i in idx:
            other = self._encoded[i]
            score = 2.0 * LCSseq.similarity(encoded, other) / (n + len(other))
            best = max(best, score)
            if top:
                scored.append((score, self.texts[i]))
        scored.sort(key=lambda s: -s[0])
        return best, scored[:top]

    def too_similar(self, text: str) -> bool:
        """Whether some entry's ROUGE-L F1 with `text` exceeds the threshold (Alpaca's `> 0.7`)."""
        return self.most_similar(text)[0] > self.threshold
