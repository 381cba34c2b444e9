"""A pause asked for from outside: SIGTERM stops a run at its next step, at a checkpoint.

Runs in the background (``nohup mlsa4rec ... &``) ignore Ctrl-C's SIGINT, and ``kill PID`` sends
SIGTERM, whose default ends the process wherever it is: the work since the last checkpoint is lost
and a study's cell waits for another worker to find it dead. Under :func:`pause_on_sigterm` the
first SIGTERM instead makes the trainer pause exactly as a spent ``--time-budget`` does (checkpoint,
exit 75, the same command continues); a second SIGTERM ends the process at once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

_requested = False  # a plain flag: the handler only sets it (no lock, no I/O inside a signal handler)
SIGTERM_RECEIVED = "SIGTERM received"
BUDGET_SPENT = "the time budget ran out"


def requested() -> bool:
    """Whether a pause was asked for (SIGTERM under :func:`pause_on_sigterm`)."""
    return _requested


def why_paused() -> str:
    """What paused a run, for its message."""
    return SIGTERM_RECEIVED if _requested else BUDGET_SPENT


def _handler(signum, frame) -> None:
    global _requested
    _requested = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once


def _install(signum: int, handler) -> object | None:
    """Install ``handler`` for ``signum``; returns the handler before it, or None where nothing was
    installed: the signal ignored on entry (by whoever started this process) stays ignored, and
    outside the main thread signals cannot be handled."""
    previous = signal.getsignal(signum)
    if previous == signal.SIG_IGN:
        return None
    try:
        signal.signal(signum, handler)
    except ValueError:  # not the main thread
        return None
    return previous if previous is not None else signal.SIG_DFL


@contextmanager
def pause_on_sigterm() -> Iterator[None]:
    """Within this block the first SIGTERM asks the running training to pause at its next step;
    SIGTERM's handler is the one before the block again after it. A SIGTERM ignored on entry (by
    whoever started this process) stays ignored, and outside the main thread nothing changes."""
    global _requested
    _requested = False
    previous = _install(signal.SIGTERM, _handler)
    try:
        yield  # (outside the set-up's try: an error of the block is never taken for the set-up's)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _requested = False


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """A Ctrl-C (SIGINT) during this block takes effect when it ends: for short writes that must
    finish once begun (a second Ctrl-C while an interrupted tuning queues its trial's settings again
    would otherwise lose them). Outside the main thread, or with SIGINT ignored, nothing changes."""
    caught: list[int] = []
    previous = _install(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
            if caught:  # the Ctrl-C held back, as the handler before the block takes it
                signal.raise_signal(signal.SIGINT)
