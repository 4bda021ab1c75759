"""Ctrl-C (SIGINT) at the moments where raising KeyboardInterrupt wherever Python happens to be would harm.

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


def _sigint_is_ours() -> bool:
    """Only the main thread may set handlers; an ignored or custom SIGINT is not ours to change."""
    return threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler


@contextmanager
def _sigint_handled_by(handler: Callable) -> Iterator[None]:
    """`handler` answers SIGINT inside the block, where SIGINT is ours; Python's own handler is back after it."""
    if not _sigint_is_ours():
        yield
        return
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
    with _sigint_handled_by(lambda signum, frame: setattr(caught, "requested", True)):
        yield
    if caught:
        raise KeyboardInterrupt


@contextmanager
def stop_requested_by_interrupt() -> Iterator[StopRequest]:
    """Inside the block the first Ctrl-C sets the request instead of raising; a second one raises at once."""
    stop = StopRequest()

    def first(signum, frame) -> None:
        stop.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # an impatient second Ctrl-C still works

    with _sigint_handled_by(first):
        yield stop
