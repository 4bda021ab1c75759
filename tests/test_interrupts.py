"""Ctrl-C held until renames finish, and Ctrl-C turned into a stop request that no finaliser can swallow."""
from __future__ import annotations

import os
import signal

import pytest

from retrain.interrupts import interrupts_deferred, stop_requested_by_interrupt, termination_as_interrupt


@pytest.fixture(autouse=True)
def sigint_as_in_a_terminal():
    """Python's own Ctrl-C handler, as in a terminal: a shell's background job starts with SIGINT ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def sent_while_deferred(signum: int) -> list[str]:
    """Send `signum` inside interrupts_deferred; what the block did after it (held: the block runs to its end)."""
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signum)
            done.append("the renames after the signal still ran")
    return done


def test_ctrl_c_while_a_model_is_moved_into_place_waits_for_the_last_rename():
    assert sent_while_deferred(signal.SIGINT) and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_first_ctrl_c_becomes_a_request_and_the_second_raises():
    with stop_requested_by_interrupt() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_that_lands_in_a_generator_finaliser_is_not_lost():
    # What failed in CI: the signal arrived while a prefetching generator shut its thread pool down
    # during garbage collection; the KeyboardInterrupt raised there was printed and dropped.
    def prefetching():
        try:
            yield 1
            yield 2
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    with stop_requested_by_interrupt() as stop:
        batches = prefetching()
        next(batches)
        del batches  # finalised here, as a loop that breaks out of it leaves it
        assert stop.requested
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_nothing_is_changed():
    import threading

    seen = []

    def worker():
        with stop_requested_by_interrupt() as stop:
            seen.append((bool(stop), signal.getsignal(signal.SIGINT)))
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [(False, signal.default_int_handler)]


def test_sigterm_while_training_is_held_and_requested_as_ctrl_c_is():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with termination_as_interrupt():
        assert sent_while_deferred(signal.SIGTERM)
        with stop_requested_by_interrupt() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # outside a training command, SIGTERM is as it was


def test_a_sigterm_handler_set_by_someone_else_is_left_alone():
    def theirs(signum, frame):
        raise AssertionError("not called in this test")
    before = signal.signal(signal.SIGTERM, theirs)
    try:
        with termination_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is theirs
    finally:
        signal.signal(signal.SIGTERM, before)
