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


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where it cannot be read."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None  # field 22 of proc(5), the 20th after the name


def identity() -> dict[str, Any]:
    """This process, as a trial records it."""
    return {"machine": _machine(), "pid": os.getpid(), "started": _started(os.getpid())}


def gone(worker: Any) -> bool:
    """True only when ``worker`` (an :func:`identity`) ran on this machine and its process has
    ended; False when it may still run, or ran elsewhere (its heartbeat tells)."""
    if not isinstance(worker, dict) or type(worker.get("pid")) is not int or worker["pid"] <= 0:  # not a bool
        return False
    if worker.get("machine") != _machine():
        return False
    pid = worker["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):  # alive, another user's (or not ours to ask): not known dead
        return False
    recorded = worker.get("started")
    return recorded is not None and _started(pid) not in (None, recorded)  # the PID was reused


def mark(trial) -> None:
    """Record on ``trial`` that this process runs it."""
    trial.set_user_attr(WORKER_ATTR, identity())


def fail_dead_workers(opt_study) -> int:
    """Fail the running trials whose worker died on this machine and run the storage's stale-trial
    callback on them (it queues each again), as Optuna does for a stale heartbeat; returns how many."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = opt_study._storage
    failed = []
    for trial in opt_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not gone(trial.user_attrs.get(WORKER_ATTR)):
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
