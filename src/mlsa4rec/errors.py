"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single ``error: ...`` line and a non-zero exit, with no traceback, so
every message must name the problem *and* the fix. Anything else that escapes is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable


class MLSA4RecError(Exception):
    """Bad input from a person: a file, a dataset name, a config key, a checkpoint."""


class ConfigError(MLSA4RecError):
    """An unknown configuration key or a value of the wrong type or range."""


class DataError(MLSA4RecError):
    """A missing, malformed or empty data file, or a dataset that filtering leaves empty."""


class BrokenModelError(MLSA4RecError):
    """The model or a state it was given produced unusable numbers (NaN, infinities): the run, not
    the request, is at fault (HTTP answers 500, not 422)."""


class PeerFailed(MLSA4RecError):
    """Raised on the other ranks of a distributed run when rank 0 failed at a step only it runs:
    rank 0 prints the message, so the command line shows it once."""


class TimeBudgetSpent(Exception):
    """A run stopped at its ``--time-budget`` right after a checkpoint: not a failure, a pause. The
    CLI exits 75 (EX_TEMPFAIL: try again) and the same command with ``--resume`` continues it."""


class RunStopped(Exception):
    """A hook of the run (``on_epoch``: a tuner pruning a trial) ended it for good: its stage is
    removed, checkpoint included, and the exception passes on to whoever set the hook."""


def check_choice(key: str, value: object, choices: Iterable[object], error: type[Exception] = ValueError) -> None:
    """Refuse ``value`` unless it is one of ``choices``, naming them all: ``key must be one of ...``."""
    choices = tuple(choices)
    if value not in choices:
        raise error(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
