"""Numbers with their uncertainty: proportions with Wilson intervals, win rates (ties count half)
with a normal interval, means with a t-free normal interval. All intervals are 95% by default.

Wilson (1927) rather than the plain normal ("Wald") interval for proportions: it stays inside [0, 1]
and keeps its coverage at the small n and extreme rates that evaluations of small models produce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054   # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval [low, high] from n observations."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        """{value, low, high, n} for JSON."""
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def wilson_interval(successes: int, n: int, z: float = Z95) -> Estimate:
    """The proportion successes/n with its Wilson score interval:
    (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n). n = 0 gives the uninformative [0, 1]."""
    if n <= 0:
        return Estimate(float("nan"), 0.0, 1.0, 0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


def mean_interval(values: Sequence[float], z: float = Z95, bounds: tuple[float, float] | None = None) -> Estimate:
    """The mean of `values` ± z·s/√n (s: the sample standard deviation), clipped to `bounds`."""
    n = len(values)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    m = sum(values) / n
    half = z * math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("inf")
    low, high = m - half, m + half
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return Estimate(m, low, high, n)


@dataclass(frozen=True)
class WinTieLoss:
    """Pairwise outcomes of model A against model B over the same questions."""

    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        """Decided comparisons (wins + ties + losses)."""
        return self.wins + self.ties + self.losses

    def win_rate(self, z: float = Z95) -> Estimate:
        """(wins + ties/2) / n with a normal interval over the per-question scores 1, 1/2, 0."""
        scores = [1.0] * self.wins + [0.5] * self.ties + [0.0] * self.losses
        return mean_interval(scores, z, bounds=(0.0, 1.0))

    def as_dict(self) -> dict[str, object]:
        """Counts, rates of each outcome and the win rate with its interval, for JSON."""
        n = max(self.n, 1)
        return {"wins": self.wins, "ties": self.ties, "losses": self.losses, "n": self.n,
                "win": self.wins / n, "tie": self.ties / n, "loss": self.losses / n,
                "win_rate": self.win_rate().as_dict()}


def win_tie_loss(a: Sequence[float], b: Sequence[float], tie_margin: float = 0.0) -> WinTieLoss:
    """Outcomes of paired scores: A wins where a - b > tie_margin, loses where b - a > tie_margin."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    wins = sum(x - y > tie_margin for x, y in zip(a, b))
    losses = sum(y - x > tie_margin for x, y in zip(a, b))
    return WinTieLoss(wins, len(a) - wins - losses, losses)
