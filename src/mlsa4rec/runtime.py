"""The runtime floor, below everything that runs a model: the devices this machine has (and the
one a setting names), the seed of every generator, process-level tuning for CPU training (applied
by the CLI; a library import changes nothing) and the machine facts every benchmark records.

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
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mlsa4rec.errors import ConfigError

if TYPE_CHECKING:
    import torch

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


# --- devices and seeds: every floor that runs a model asks here (torch is imported only here, so
# that the CLI starts, and tunes the allocator, before anything heavy is loaded) ------------------

def exit_rank(code: int) -> None:
    """End a torchrun rank whose work is done with ``code``, skipping the interpreter's finalization
    (and its atexit handlers), where torch.distributed's C++ threads may abort the process after the
    run is safely published (see ``mlsa4rec.__main__``). Everything written so far is flushed first."""
    logging.shutdown()  # flushes and closes every handler (train.log's is closed by then already)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it anyway
            pass
    os._exit(code)


def available_devices() -> list[str]:
    """The device names this machine can run on: cpu, then cuda and cuda:N per GPU, then mps."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def check_device(name: object, flag: str = "--set device=") -> None:
    """Refuse a device name this machine cannot use, naming the ones it can. ``flag`` is how the
    user gave it: ``"--device "`` on the command line, ``"--set device="`` for a run's setting."""
    import torch

    usable = available_devices()
    if name == "auto" or name in usable:
        return
    shown = f"{flag}{name}" if isinstance(name, str) and name.strip() and " " not in name else f"{flag}{name!r}"
    if isinstance(name, str) and re.fullmatch(r"cuda(:\d+)?", name):
        why = ("CUDA is not available here (no GPU, or a PyTorch built without CUDA)" if not torch.cuda.is_available()
               else f"this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    elif isinstance(name, str) and name.lower() in usable:
        why = "device names are lower case"
    else:
        why = "it is not a device this machine has"
    raise ConfigError(f"{shown} cannot be used: {why}; use {flag}auto (the best device here) or one of the devices "
                      f"this machine has: {', '.join(usable)}")


def resolve_device(name: str, flag: str = "--set device=") -> torch.device:
    """The device of a single-process run (``auto``: CUDA if there is one); a device this
    machine lacks is one clear error (see ``check_device``)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name, flag)
    return torch.device(name)


def set_seed(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (a run's initialisation, dropout and sampling)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reset_peak_rss() -> bool:
    """Start a new window for ``peak_rss_bytes`` (Linux: writing 5 to /proc/self/clear_refs resets the
    process's high-water mark), so that each epoch, and each run of a process that trains several
    (a study's worker), reports its own peak. False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory since ``reset_peak_rss`` (Linux's VmHWM), else since the
    process started (``ru_maxrss``); None where neither exists (Windows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
