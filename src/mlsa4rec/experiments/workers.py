"""Which process runs a trial, so that a worker killed on this machine is known dead at once.

Optuna's heartbeats find a dead worker only after three missed beats (3 minutes by default), and
any worker sharing the storage may be the dead one. Until then its trial stays "running": a worker
started again at once would take the next cell first and leave the killed one behind, and `study
status` would report a cell no process trains. Each trial therefore records its worker's identity;
a worker on the same machine (same host name, boot and PID namespace) can tell from the process
table that the process is gone (or its PID reused: the start time differs) and hand the trial back
exactly as a stale heartbeat would. Workers on other machines are left to the heartbeats.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

WORKER_ATTR = "worker"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _machine() -> str:
    """This machine as its processes see it: host name, boot and PID namespace (Linux), so that a
    container sharing the host name (or a machine rebooted since) never reads another's PIDs."""
    boot = _read("/proc/sys/kernel/random/boot_id") or "?"
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}|{boot}|{namespace}"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (Linux; proc(5) field 3 on), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].decode("ascii", "replace").split()  # the name may hold anything
    return fields if len(fields) > 19 else None


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where it cannot be read."""
    fields = _stat(pid)
    return None if fields is None else fields[19]  # field 22 of proc(5)


def identity(trial_id: int | None = None) -> dict[str, Any]:
    """This process, as a trial records it (with the trial's own id: a copy of the attribute on
    another trial, such as Optuna's retry of a stale one, names no worker of that trial)."""
    return {"machine": _machine(), "pid": os.getpid(), "started": _started(os.getpid()), "trial": trial_id}


def gone(worker: Any, trial_id: int | None = None) -> bool:
    """True only when ``worker`` (an :func:`identity`) ran on this machine and its process has
    ended (or is a zombie); False when it may still run, or ran elsewhere (its heartbeat tells).
    With ``trial_id``, only a worker recorded by that very trial counts."""
    if not isinstance(worker, dict) or type(worker.get("pid")) is not int or worker["pid"] <= 0:  # not a bool
        return False
    if worker.get("machine") != _machine() or (trial_id is not None and worker.get("trial") != trial_id):
        return False
    pid = worker["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):  # alive, another user's (or not ours to ask): not known dead
        return False
    fields = _stat(pid)
    if fields is None:
        return False
    recorded = worker.get("started")
    return fields[0] == "Z" or (recorded is not None and fields[19] != recorded)  # a zombie, or the PID reused


def mark(trial) -> None:
    """Record on ``trial`` that this process runs it."""
    trial.set_user_attr(WORKER_ATTR, identity(trial._trial_id))


def told_after_takeover(exc: BaseException | None) -> ValueError | None:
    """The ``ValueError: Cannot tell a FAIL trial`` of Optuna's tell of a trial that another worker
    took for dead (a stale heartbeat) and failed, in ``exc`` or its context (Optuna 5 raises an
    AssertionError of its own logging over it when the objective had returned a value)."""
    while exc is not None:
        if isinstance(exc, ValueError) and str(exc).startswith("Cannot tell a"):
            return exc
        exc = exc.__context__
    return None


def fail_dead_workers(opt_study) -> int:
    """Fail the running trials whose worker died on this machine and run the storage's stale-trial
    callback on them (it queues each again), as Optuna does for a stale heartbeat; returns how many."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = opt_study._storage
    failed = []
    for trial in opt_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not gone(trial.user_attrs.get(WORKER_ATTR), trial._trial_id):
            continue
        fresh = storage.get_trial(trial._trial_id)  # read again: as little time as can be between check and act
        if fresh.state != TrialState.RUNNING or not gone(fresh.user_attrs.get(WORKER_ATTR), trial._trial_id):
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial._trial_id)
        except UpdateFinishedTrialError:  # another worker handed it back first
            pass
    callback = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    for trial_id in failed:
        if callback is not None:
            callback(opt_study, storage.get_trial(trial_id))
    return len(failed)
