"""One progress display for every long loop: a tqdm bar on a terminal, log lines elsewhere.

``progress=None`` (the API default) means *auto*: nothing is shown for work that
finishes within ``delay`` seconds; past that, a bar appears on a terminal, and
when stderr is not a terminal (a log file, a batch job) one line is written at
most every ``interval`` seconds with done/total, rate and ETA::

    nethessian: diagonal 1,200/5,018 col (24%), 35.2 col/s, ETA 1m48s

``progress=True`` shows it from the start, ``progress=False`` never.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["Progress", "format_seconds"]

DELAY_S = 3.0  # auto mode: show nothing for work that finishes sooner
INTERVAL_S = 30.0  # non-terminal: at most one line this often


def format_seconds(s: float) -> str:
    """``95.0 -> '1m35s'``, ``3.2 -> '3.2s'``, ``7300 -> '2h01m'``.

    >>> format_seconds(95.0), format_seconds(3.24), format_seconds(7300)
    ('1m35s', '3.2s', '2h01m')
    """
    if s != s or s == float("inf"):
        return "?"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


class Progress:
    """Progress of ``total`` units of work; use as a context manager and call ``update(n)``.

    Args:
        total: units the work will take (products, columns, probes); may be
            raised later with ``set_total`` when an algorithm learns it will stop early.
        desc: what is being done ("dense columns", "lanczos").
        unit: the unit's name ("col", "matvec", "probe").
        enabled: ``None`` auto (after ``delay`` s), ``True`` always, ``False`` never.
        initial: units already done (a resumed checkpoint).
        stream: where to write (default ``sys.stderr``).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "matvec",
        enabled: Optional[bool] = None,
        initial: int = 0,
        stream=None,
        delay: float = DELAY_S,
        interval: float = INTERVAL_S,
    ):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self._start_n = int(initial)
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled is not False
        self.delay = 0.0 if enabled else float(delay)
        self.interval = float(interval)
        self._t0 = time.monotonic()
        self._last_line = -float("inf")
        self._bar = None
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if self.enabled and self._tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=self.n,
                desc=desc,
                unit=unit,
                file=self.stream,
                delay=self.delay,
                leave=False,
                dynamic_ncols=True,
            )

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_total(self, total: int) -> None:
        """Change what the work will take (e.g. an early stop is now certain)."""
        self.total = int(total)
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(int(n))
            return
        now = time.monotonic()
        elapsed = now - self._t0
        if elapsed >= self.delay and (now - self._last_line >= self.interval or self.n >= self.total):
            self._last_line = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        """One status line: done/total, percentage, rate and ETA."""
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        left = max(self.total - self.n, 0)
        eta = left / rate if rate > 0 else float("inf")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        return (
            f"nethessian: {self.desc} {self.n:,}/{self.total:,} {self.unit} ({pct:.0f}%), "
            f"{rate:.3g} {self.unit}/s, ETA {format_seconds(eta)}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
