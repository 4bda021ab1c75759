"""Progress for people and for logs: a bar on a terminal, a plain line now and then anywhere else.

A bar redrawn with carriage returns turns a log file into fragments (`retrain train > log 2>&1`
gave a "Training head: 26%" between every line and a bar glued to the final result), so bars
are drawn only when stderr is a terminal. Elsewhere a stage says "Extracting features: 450/1877
img (24%)" at most every LINE_SECONDS. RETRAIN_PROGRESS=bars|lines overrides the choice,
RETRAIN_PROGRESS_SECONDS the interval.

A program in the same process (the web app's training worker) gets the same news as plain data
through `subscribed(callback)`: {"type": "progress", "stage", "done", "total", "unit"} as a stage
advances and {"type": "log", "message"} for each `say`, never by reading the text.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

from tqdm import tqdm

LINE_SECONDS = 10.0
EVENT_SECONDS = 0.25  # progress events at most this often per stage (and at its last step)
_subscribers: list[Callable[[dict], None]] = []


def _seconds(text: str) -> float:
    try:
        return max(0.0, float(text))
    except ValueError:  # unset or not a number: the default
        return LINE_SECONDS


@contextmanager
def subscribed(callback: Callable[[dict], None]) -> Iterator[None]:
    """Send progress and log events to `callback` while the block runs."""
    _subscribers.append(callback)
    try:
        yield
    finally:
        _subscribers.remove(callback)


def publish(event: dict) -> None:
    for callback in list(_subscribers):
        callback(event)


def bars_wanted() -> bool:
    mode = os.environ.get("RETRAIN_PROGRESS", "auto")
    return mode == "bars" or (mode != "lines" and sys.stderr.isatty())


class Lines:
    """tqdm's update/close/set_postfix, printed as a plain line at most every LINE_SECONDS."""

    def __init__(self, total: int | None, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n, self.postfix = total, desc, unit, 0, ""
        self.every = _seconds(os.environ.get("RETRAIN_PROGRESS_SECONDS", ""))
        self.last = self.published = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if _subscribers and (self.n == self.total or time.monotonic() - self.published >= EVENT_SECONDS):
            self.published = time.monotonic()
            publish({"type": "progress", "stage": self.desc, "done": self.n, "total": self.total, "unit": self.unit})
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
            print(f"{self.desc}: {self.n}/{self.total or '?'} {self.unit}{share}{self.postfix}", file=sys.stderr,
                  flush=True)

    def set_postfix(self, **values: str) -> None:
        self.postfix = "; " + ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class _Off(Lines):
    def update(self, n: int = 1) -> None:
        pass


def progress(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False,
             leave: bool = False) -> tqdm | Lines:
    """A progress reporter with tqdm's interface: a bar on a terminal, plain lines elsewhere, nothing if disabled."""
    if disable:
        return _Off(total, desc, unit)
    if bars_wanted() and not _subscribers:  # a subscriber needs the counts: plain lines, which report them
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr)
    return Lines(total, desc, unit)


def say(message: str) -> None:
    """A log line on stderr that does not break a progress bar being drawn; an event for subscribers."""
    publish({"type": "log", "message": message})
    if bars_wanted():
        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


class Stopwatch:
    """Wall seconds per named stage, added up over repeats, for metrics.json and doctor's report.

    after: called when each stage ends, inside its time (training hands freed heap back there).
    """

    def __init__(self, after: Callable[[], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.after = after

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.after:
            self.after()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
