"""What a user sees while long work runs: bars in a terminal, log lines anywhere else, never both.

Long loops (decode, training batches, embeddings, rerank grids) go through `track`: with
`bars=True` it is a tqdm bar; with `bars=False` (orchestrators: the Prefect flows pass
`progress=False`) it writes a line on the `geoloc.progress` logger every `interval_s` seconds and
one when the loop ends, which is what a flow run's log page can show; `bars=None` picks bars
when stderr is a terminal. Epoch lines and a run's start/end lines go to the same logger.

`geoloc.progress` logs at INFO by default, so those lines show wherever logging reaches (the
CLI, `make demo`, Prefect flow-run logs) without turning on every other INFO message; silence
them with `logging.getLogger("geoloc.progress").setLevel(logging.WARNING)`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

PROGRESS_LOGGER = "geoloc.progress"
progress_log = logging.getLogger(PROGRESS_LOGGER)
if progress_log.level == logging.NOTSET:
    progress_log.setLevel(logging.INFO)

EpochCallback = Callable[[int, dict[str, Any]], None]
"""Called after each epoch with its number (1-based) and metrics: live MLflow, Optuna pruning."""

INTERVAL_S = 30.0
"""Seconds between two log lines of one running loop (log-line mode)."""


def use_bars(bars: bool | None) -> bool:
    """Bars or log lines: `None` means bars when stderr is a terminal."""
    if bars is not None:
        return bars
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def format_duration(seconds: float | None) -> str:
    """`8.2 s`, `3 min 05 s`, `1 h 02 min`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        m, s = divmod(int(round(seconds)), 60)
        return f"{m} min {s:02d} s"
    h, m = divmod(int(round(seconds)) // 60, 60)
    return f"{h} h {m:02d} min"


class LoggedProgress:
    """tqdm's small API (iterate, `update`, `set_postfix`, `close`, `with`) as log lines."""

    def __init__(
        self,
        iterable: Iterable[Any] | None,
        desc: str,
        total: int | None,
        unit: str,
        initial: int,
        summary: bool,
        interval_s: float,
    ) -> None:
        self.iterable = iterable
        self.desc, self.unit, self.summary, self.interval_s = desc, unit, summary, interval_s
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.initial = total, initial, initial
        self.start = self.last = time.perf_counter()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LoggedProgress without an iterable is not iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LoggedProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval_s:
            self.last = now
            progress_log.info("%s: %s", self.desc, self._status(now))

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the caller's own log lines carry what a bar's postfix would show."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.summary:
            elapsed = time.perf_counter() - self.start
            progress_log.info("%s: %s %s in %s", self.desc, f"{self.n:,}", self.unit,
                              format_duration(elapsed))  # fmt: skip

    def _status(self, now: float) -> str:
        elapsed = now - self.start
        done = self.n - self.initial
        if not self.total:
            return f"{self.n:,} {self.unit}, {format_duration(elapsed)}"
        left = self.total - self.n
        eta = elapsed / done * left if done > 0 else None
        return (
            f"{self.n:,}/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%), "
            f"{format_duration(elapsed)}, ETA {format_duration(eta)}"
        )


def track(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    bars: bool | None = None,
    leave: bool = False,
    initial: int = 0,
    summary: bool = True,
    interval_s: float = INTERVAL_S,
) -> Any:
    """A tqdm bar (`bars`) or its log-line twin; `summary=False` skips the closing line (for
    loops whose caller logs its own result, like an epoch's batches)."""
    if use_bars(bars):
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, initial=initial)
    return LoggedProgress(iterable, desc, total, unit, initial, summary, interval_s)
