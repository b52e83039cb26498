"""MinHash signatures and LSH banding for near-duplicate detection (`chatsmith data dedupe --near`).

Broder 1997: for a random hash h, P[min h(A) = min h(B)] = J(A, B), the Jaccard similarity of the
shingle sets, so the fraction of equal entries in two signatures estimates J. The permutations are
multiply-shift hashes h_i(x) = ((a_i x + b_i) mod 2^64) >> 32 with odd a_i, drawn from a seeded
generator, applied to 64-bit shingle hashes with numpy: one (num_perm x shingles) array per text.

LSH (Leskovec, Rajaraman, Ullman, "Mining of Massive Datasets", section 3.4): cut the signature into
b bands of r rows; two texts are candidates when some band is equal, with probability
1 - (1 - J^r)^b. b and r are chosen, as datasketch does, to minimise the false positive and false
negative areas under that curve on either side of the threshold.

Written here rather than taken from datasketch: the banding must fit the streaming dedupe's
memory plan (8 bytes per band per kept record in sorted numpy arrays, see dedupe.py), the
shingle hashing is vectorised, and it is about eighty lines.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

_WORD = re.compile(r"\w+")
_MASK32 = np.uint64(0xFFFFFFFF)


def shingles(text: str, ngram: int = 3) -> np.ndarray:
    """64-bit hashes of the text's word n-grams (lower-cased); a text shorter than n words is one
    shingle. Empty text: an empty array."""
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    ids = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    n = min(ngram, len(ids))
    # Combine n consecutive word hashes: h = sum_k ids[i+k] * P^k (mod 2^64), P a large odd constant.
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * np.uint64(0x9E3779B97F4A7C15) + ids[k:len(ids) - n + 1 + k]
    return np.unique(h)


class MinHasher:
    """Signatures of `num_perm` 32-bit minima, the same for every run with the same seed."""

    def __init__(self, num_perm: int = 128, seed: int = 1, ngram: int = 3) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.ngram = ngram
        self.a = (rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1))[:, None]
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)[:, None]

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature (num_perm uint32 values; all 2^32-1 for an empty text)."""
        sh = shingles(text, self.ngram)
        if not len(sh):
            return np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        with np.errstate(over="ignore"):
            hashed = (self.a * sh[None, :] + self.b) >> np.uint64(32)
        return hashed.min(axis=1).astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of equal signature entries: an unbiased estimate of the Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def jaccard(text_a: str, text_b: str, ngram: int = 3) -> float:
    """The exact Jaccard similarity of two texts' shingle sets (what MinHash estimates)."""
    a, b = set(shingles(text_a, ngram).tolist()), set(shingles(text_b, ngram).tolist())
    return len(a & b) / len(a | b) if a or b else 1.0


def candidate_probability(j: float, bands: int, rows: int) -> float:
    """P[two texts of Jaccard j share a band] = 1 - (1 - j^r)^b."""
    return 1.0 - (1.0 - j**rows) ** bands


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted areas of false positives
    (j < threshold) and false negatives (j >= threshold) under the candidate curve."""
    grid_lo = np.linspace(0.0, threshold, 200)
    grid_hi = np.linspace(threshold, 1.0, 200)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - grid_lo**r) ** b, grid_lo)
            fn = np.trapezoid((1 - grid_hi**r) ** b, grid_hi)
            err = fp_weight * fp + (1 - fp_weight) * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def band_keys(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per band (band index mixed in, so equal rows in different bands differ)."""
    sig = signature[: bands * rows].astype(np.uint64).reshape(bands, rows)
    with np.errstate(over="ignore"):
        h = np.arange(bands, dtype=np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        for k in range(rows):
            h = (h ^ sig[:, k]) * np.uint64(0x100000001B3)
    return h
