"""Progress reporting for long numerical-gradient runs: tqdm when installed, else one stderr line."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, Tuple

# A run whose first call predicts more than this many seconds shows progress unless told not to.
AUTO_SECONDS = 3.0


class Progress:
    """Counts calls to fn. enabled=None decides after the first call from its duration."""

    def __init__(self, total: int, enabled: Optional[bool], desc: str) -> None:
        self.total = total
        self.enabled = enabled
        self.desc = desc
        self.done = 0
        self._start = time.perf_counter()
        self._bar: Any = None
        self._last_print = 0.0
        self._paced: Optional[Tuple[float, int]] = None  # (time, calls done) at the first chunk an executor handed back

    @classmethod
    def for_run(cls, total: int, enabled: Optional[bool], method: str, structure: str) -> "Progress":
        """The bar of one numerical_grad run (its calls to fn)."""
        return cls(total, enabled, f"regrad numerical_grad ({method}, {structure})")

    def update(self, n: int = 1, *, mapped: bool = False) -> None:
        """n more calls done; mapped: a chunk of them that an executor handed back (see _decide)."""
        self.done += n
        if self.enabled is None:
            self.enabled = self._decide(mapped)
        if self.enabled:
            self._show(n)

    def _decide(self, mapped: bool) -> Optional[bool]:
        """Whether the run is predicted past AUTO_SECONDS (None: not decided yet). The first chunk an executor
        hands back carries its start-up (a fresh process pool's workers) and arrives with the chunks its other
        workers ran meanwhile: timed from the start, it predicted a 0.1 s run on 16 forked workers at 4 s and
        showed a bar. So the pace is timed from that chunk on, and each later one shows the bar once the rest
        of the run is predicted past AUTO_SECONDS."""
        now = time.perf_counter()
        if mapped and self._paced is None:
            self._paced = (now, self.done)
            return None
        if self._paced is None:
            expected = (now - self._start) / max(self.done, 1) * self.total
            return expected > AUTO_SECONDS and self.done < self.total
        since, done = self._paced
        rest = (now - since) / max(self.done - done, 1) * (self.total - self.done)
        return True if rest > AUTO_SECONDS else None

    def _show(self, n: int) -> None:
        if self._bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                self._bar = False
            else:
                self._bar = tqdm(total=self.total, desc=self.desc, unit="call", initial=self.done - n)
        if self._bar is False:
            now = time.perf_counter()
            if now - self._last_print >= 0.5 or self.done >= self.total:
                self._last_print = now
                sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total} calls")
                if self.done >= self.total:
                    sys.stderr.write("\n")
                sys.stderr.flush()
        else:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None and self._bar is not False:
            self._bar.close()
        elif self._bar is False and self.done < self.total:
            sys.stderr.write("\n")
        self._bar = None
