"""Ctrl-C (SIGINT; and SIGTERM while training) at the moments where raising KeyboardInterrupt wherever Python happens to be would harm.

Two needs: a few file renames that must finish together (defer the interrupt to the block's end),
and a training loop that should end at its next step and keep its best result (turn the first
Ctrl-C into a request the loop reads). The second cannot rely on catching KeyboardInterrupt: when
the signal lands while a generator is being finalised (a prefetching thread pool shutting down, for
one), Python prints "Exception ignored" and the interrupt is lost, so training went on.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _interrupt_signals() -> list[signal.Signals]:
    """The signals that mean Ctrl-C here and are ours to change: SIGINT, and SIGTERM inside
    termination_as_interrupt. Only the main thread may set handlers; an ignored or custom one is not ours."""
    if not _main_thread():
        return []
    return [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is signal.default_int_handler]


@contextmanager
def _interrupts_handled_by(handler: Callable) -> Iterator[None]:
    """`handler` answers Ctrl-C (and SIGTERM where it means the same) inside the block; Python's own handler is
    back after it."""
    signals = _interrupt_signals()
    for signum in signals:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum in signals:
            signal.signal(signum, signal.default_int_handler)


@contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM (`kill`, `timeout`, `docker stop`) ends the run as Ctrl-C does: a model is never
    left half moved into place, no staging folder stays behind, and fine-tuning keeps its best epoch so far."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class StopRequest:
    """Whether Ctrl-C asked the loop holding this to stop; true once it did."""

    def __init__(self) -> None:
        self.requested = False

    def __bool__(self) -> bool:
        return self.requested


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block until it ends, then raise it."""
    caught = StopRequest()
    with _interrupts_handled_by(lambda signum, frame: setattr(caught, "requested", True)):
        yield
    if caught:
        raise KeyboardInterrupt


@contextmanager
def stop_requested_by_interrupt() -> Iterator[StopRequest]:
    """Inside the block the first Ctrl-C sets the request instead of raising; a second one raises at once."""
    stop = StopRequest()

    def first(signum, frame) -> None:
        stop.requested = True
        signal.signal(signum, signal.default_int_handler)  # an impatient second Ctrl-C still works

    with _interrupts_handled_by(first):
        yield stop
