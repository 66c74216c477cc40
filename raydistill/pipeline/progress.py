"""What the user sees while a command works: progress lines on stderr (``--json`` keeps stdout for its object).

:func:`log` writes one ``[raydistill]`` line. :func:`watch` follows a long stage from the driver (the teacher
pass, training) by polling the run's counters actor, where the Ray tasks and Train workers doing the work
record their progress: on a terminal it draws a tqdm bar with the count, rate, elapsed time and ETA; in a log
(no terminal) it writes a line every ``LOG_EVERY_S`` seconds with the same figures.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

LOG_PREFIX: contextvars.ContextVar[str] = contextvars.ContextVar("raydistill_log_prefix", default="")
"""Put before every ``log`` line of the current thread (the demo's arms run side by side: ``[baseline] ``)."""
#: Seconds between two progress lines when stderr is not a terminal.
LOG_EVERY_S = 30.0


def log(message: str) -> None:
    """Write ``[raydistill] <prefix><message>`` to stderr.

    Written to the stream rather than printed: in a Ray Train worker ``print`` is patched to tee the line *and*
    hand it to Train's logger, so every printed progress line reached the driver twice.
    """
    sys.stderr.write(f"[raydistill] {LOG_PREFIX.get()}{message}\n")
    sys.stderr.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def progress_line(label: str, done: int, total: int | None, elapsed: float, extra: str = "",
                  rate: float | None = None) -> str:
    """``label: 40/300 (13%), 0:25 elapsed, 1.6/s, ETA 2:42, extra``.

    ``rate`` (items per second) defaults to ``done / elapsed``; pass the steady rate (:class:`SteadyRate`) when
    the elapsed time includes a start-up, or ``0`` when there is none yet: then no rate and no ETA are shown.
    """
    if rate is None:
        rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"{done:,}/{total:,} ({100 * done / total:.0f}%)" if total else f"{done:,}", f"{_duration(elapsed)} elapsed"]
    if rate:
        parts.append(f"{rate:,.1f}/s")
        if total and done < total:
            parts.append(f"ETA {_duration((total - done) / rate)}")
    return f"{label}: " + ", ".join(parts) + (f", {extra}" if extra else "")


class SteadyRate:
    """The rate since the first item was done: the start-up before it (workers starting, a model loading) would
    make an ETA taken from ``done / elapsed`` hours long at the first line. ``0`` until a second count is seen."""

    def __init__(self) -> None:
        self._first: tuple[float, int] | None = None

    def __call__(self, done: int, now: float) -> float:
        if self._first is None:
            if done > 0:
                self._first = (now, done)
            return 0.0
        t0, d0 = self._first
        return (done - d0) / (now - t0) if done > d0 and now > t0 else 0.0


@contextlib.contextmanager
def watch(label: str, total: int | None, poll: Callable[[], tuple[int, str]], interval: float = 1.0) -> Iterator[None]:
    """Show the progress of the work done inside the ``with`` block, from ``poll() -> (done, extra text)``.

    Polling never fails the work: a failed poll is skipped.
    """
    stop = threading.Event()
    start = time.monotonic()
    tty = sys.stderr.isatty()
    bar = None
    if tty:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"[raydistill] {LOG_PREFIX.get()}{label}", file=sys.stderr, leave=True,
                   dynamic_ncols=True)
    prefix = LOG_PREFIX.get()
    steady = SteadyRate()

    def follow() -> None:
        LOG_PREFIX.set(prefix)
        last_line = start
        while not stop.wait(interval):
            try:
                done, extra = poll()
            except Exception:  # noqa: BLE001 - progress is a view; the work goes on
                continue
            if bar is not None:
                bar.n = done
                bar.set_postfix_str(extra, refresh=False)
                bar.refresh()
                continue
            rate = steady(done, time.monotonic())  # every poll, so the first count is seen when it happens
            if time.monotonic() - last_line >= LOG_EVERY_S:
                last_line = time.monotonic()
                log(progress_line(label, done, total, last_line - start, extra, rate=rate))

    thread = threading.Thread(target=follow, name=f"raydistill-progress-{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            done, extra = poll()
        except Exception:  # noqa: BLE001
            done, extra = (bar.n if bar is not None else 0), ""
        if bar is not None:
            bar.n = done
            bar.set_postfix_str(extra, refresh=False)
            bar.close()
        else:
            log(progress_line(label, done, total, time.monotonic() - start, extra))  # the whole stage's rate


def counted(counters: Any, key: str, extra: Callable[[dict[str, Any]], str] | None = None, since: int = 0
            ) -> Callable[[], tuple[int, str]]:
    """A ``poll`` for :func:`watch`: one of the counters actor's totals less ``since`` (and text made from all
    of them)."""
    def poll() -> tuple[int, str]:
        totals = counters.get()
        return int(totals.get(key, 0)) - since, extra(totals) if extra else ""
    return poll


RECALL_COLUMNS = {"i2t_r1": "I2T@1", "i2t_r5": "I2T@5", "i2t_r10": "I2T@10", "t2i_r1": "T2I@1", "t2i_r5": "T2I@5",
                  "t2i_r10": "T2I@10", "rsum": "RSUM"}


def recall_header(name_width: int = 26, extra: str = "") -> str:
    """The header of the terminal's recall tables (``run``, ``eval``, ``demo``)."""
    return f"{'model':<{name_width}}" + "".join(f"{h:>7}" for h in RECALL_COLUMNS.values()) + extra


def recall_line(name: str, metrics: dict[str, float] | None, name_width: int = 26, extra: str = "") -> str:
    """One model's row under :func:`recall_header`: recall in percent, ``-`` when it was not measured."""
    if not metrics:
        return f"{name:<{name_width}}{'-':>7}"
    return f"{name:<{name_width}}" + "".join(f"{metrics[k]:7.1f}" for k in RECALL_COLUMNS) + extra
