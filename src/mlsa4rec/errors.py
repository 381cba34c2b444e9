"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single ``error: ...`` line and a non-zero exit, with no traceback, so
every message must name the problem *and* the fix. Anything else that escapes is a bug.
"""

from __future__ import annotations


class MLSA4RecError(Exception):
    """Bad input from a person: a file, a dataset name, a config key, a checkpoint."""


class ConfigError(MLSA4RecError):
    """An unknown configuration key or a value of the wrong type or range."""


class DataError(MLSA4RecError):
    """A missing, malformed or empty data file, or a dataset that filtering leaves empty."""


class PeerFailed(MLSA4RecError):
    """Raised on the other ranks of a distributed run when rank 0 failed at a step only it runs:
    rank 0 prints the message, so the command line shows it once."""
