"""Process-level tuning for CPU training, applied by the CLI (a library import changes nothing),
and the machine facts every benchmark records.

glibc returns every freed block above the mmap threshold (128 KiB by default) to the kernel, so
each training step re-faults its large activations (the N x items logits alone are ~90 MB) page
by page. Raising the mmap and trim thresholds lets freed memory be reused across steps. Measured
on the 2-core machine (SASRec, ML-1M, L=200, 32 windows per step): about 50 -> 33 microseconds
per training target. Set ``MLSA4REC_DEFAULT_MALLOC=1`` to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Keep freed memory for reuse (glibc only); returns whether the settings were applied."""
    if os.environ.get("MLSA4REC_DEFAULT_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    log.debug("glibc malloc thresholds raised: %s", ok)
    return ok


def cpu_model() -> str:
    """The CPU's model name (machines of one kind differ: results name the CPU they came from)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or another launcher that sets RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's global rank from the environment (0 when not launched by torchrun). Torch-free,
    so the CLI can ask before it imports anything heavy."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0
