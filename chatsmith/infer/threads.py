"""How many threads the engine's steps use: all of torch's, or one, chosen by measuring them.

A step split over N threads waits, at each of its matmuls, for the slowest thread. On a machine that
other processes keep busy, the OS deschedules one of them now and then and every matmul of the step
waits a time slice for it: measured here (2 vCPUs, another process computing on 2 threads), int4
decode fell to 5.7-25 tokens/s on 2 threads and ran 72-79 on 1. On a quiet machine 2 threads are
faster. Which is better changes while a server runs, so `ThreadGovernor` keeps measuring:

- the engine times each decode step's forward pass (it already does, for its fairness budget) and
  reports it with the number of rows;
- every `interval` decode steps the governor probes: `window` steps on the other setting, then
  `window` on the current one, and keeps whichever has the lower median (the other only when it is
  at least `margin` faster). A probe is abandoned when the batch changes size during it;
- the first probe comes after `2 * window` steps; a step `spike` times slower than the current
  setting's recent median calls one at once (load arriving); a probe whose first two steps on the
  other setting are both slower than every recent step on the current one ends there; a probe that
  confirms the choice doubles the interval, up to `max_interval`, and a switch starts again from the
  shortest. On a quiet machine the probes cost a few slower steps in `max_interval`.

The numbers do not depend on the choice: the native int8 and int4 steps give each output row to one
thread with one order of sums, so an answer is the same bits on 1 thread or N (tested). Steps of
other precisions (fp32 BLAS) may round differently with another count; the engine governs only the
native step.

`applied()` sets the count for one step and restores the caller's afterwards, so a step run in the
caller's thread (`Engine.generate`, the terminal chat) leaves its thread count as it was.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import deque
from collections.abc import Iterator


class ThreadGovernor:
    """Chooses between `threads` and 1 thread for an engine's steps from their measured times."""

    def __init__(self, threads: int, *, window: int = 5, interval: int = 64, max_interval: int = 1024,
                 margin: float = 0.85, spike: float = 3.0) -> None:
        self.full = max(1, int(threads))
        self.current = self.full
        self.window, self.base_interval, self.max_interval = window, interval, max_interval
        self.margin, self.spike = margin, spike
        self.interval = interval
        self.until_probe = 2 * window     # the first probe early: the machine's state is unknown
        self.phase = "run"                 # "run", or probing: "other" then "again"
        self.probe_rows = 0
        self.times: dict[str, list[float]] = {"other": [], "again": []}
        self.recent: deque[float] = deque(maxlen=2 * window)
        self.switches = 0
        self.probes = 0

    @property
    def active(self) -> bool:
        """Whether there is a choice to make (more than one thread to start from)."""
        return self.full > 1

    def other(self) -> int:
        return 1 if self.current != 1 else self.full

    def threads(self) -> int:
        """The thread count for the next step."""
        return self.other() if self.phase == "other" else self.current

    @contextlib.contextmanager
    def applied(self) -> Iterator[int]:
        """Within the block, torch computes on `threads()` threads in this thread; the count before
        is restored after."""
        import torch

        before, want = torch.get_num_threads(), self.threads()
        if want != before:
            torch.set_num_threads(want)
        try:
            yield want
        finally:
            if want != before:
                torch.set_num_threads(before)

    def record(self, seconds: float, rows: int) -> None:
        """One decode step's forward pass took `seconds` for `rows` sequences, on `threads()` threads."""
        if not self.active:
            return
        if self.phase != "run":
            if rows != self.probe_rows:   # another batch: the two halves would not compare
                self._end_probe(switch=False, confirmed=False)
                return
            self.times[self.phase].append(seconds)
            other = self.times["other"]
            if self.phase == "other" and len(other) >= 2 and self.recent and min(other) > max(self.recent):
                # Clearly slower than every recent step of the current choice: no need for the rest.
                self._end_probe(switch=False, confirmed=True)
                return
            if len(self.times[self.phase]) >= self.window:
                if self.phase == "other":
                    self.phase = "again"
                else:
                    other, again = (statistics.median(self.times[k]) for k in ("other", "again"))
                    self._end_probe(switch=other < self.margin * again, confirmed=True)
            return
        spiked = len(self.recent) == self.recent.maxlen and seconds > self.spike * statistics.median(self.recent)
        self.recent.append(seconds)
        self.until_probe -= 1
        if self.until_probe <= 0 or spiked:
            self.phase, self.probe_rows = "other", rows
            self.times = {"other": [], "again": []}
            self.probes += 1

    def _end_probe(self, switch: bool, confirmed: bool) -> None:
        if switch:
            self.current = self.other()
            self.switches += 1
            self.interval = self.base_interval
        elif confirmed:
            self.interval = min(2 * self.interval, self.max_interval)
        self.phase = "run"
        self.until_probe = self.interval
        self.recent.clear()
