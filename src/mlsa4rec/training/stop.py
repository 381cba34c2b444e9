"""A pause asked for from outside: SIGTERM stops a run at its next step, at a checkpoint.

Runs in the background (``nohup mlsa4rec ... &``) ignore Ctrl-C's SIGINT, and ``kill PID`` sends
SIGTERM, whose default ends the process wherever it is: the work since the last checkpoint is lost
and a study's cell waits for another worker to find it dead. Under :func:`pause_on_sigterm` the
first SIGTERM instead makes the trainer pause exactly as a spent ``--time-budget`` does (checkpoint,
exit 75, the same command continues); a second SIGTERM ends the process at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("mlsa4rec")
_requested = threading.Event()


def requested() -> bool:
    """Whether a pause was asked for (SIGTERM under :func:`pause_on_sigterm`)."""
    return _requested.is_set()


def why_paused() -> str:
    """What paused a run, for its message."""
    return "SIGTERM received" if requested() else "the time budget ran out"


@contextmanager
def pause_on_sigterm() -> Iterator[None]:
    """Within this block the first SIGTERM asks the running training to pause at its next step; the
    handler is SIGTERM's default again after it (a second one ends the process) and after the block."""
    def handler(signum, frame) -> None:
        _requested.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        log.warning("SIGTERM: pausing at the next step, at a checkpoint (send it again to stop at once)")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    _requested.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested.clear()
