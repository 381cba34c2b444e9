"""A trial's worker identity: a process gone from this machine is known dead, anything else is not."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from mlsa4rec.experiments import workers


def ended_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_this_process_is_alive_and_an_ended_one_here_is_gone() -> None:
    me = workers.identity()
    assert not workers.gone(me)
    assert workers.gone({**me, "pid": ended_pid()})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process start times are read from /proc (Linux)")
def test_a_pid_reused_by_another_process_is_gone() -> None:
    me = workers.identity()
    assert me["started"] is not None
    assert workers.gone({**me, "started": str(int(me["started"]) + 1)})


@pytest.mark.parametrize("worker", [
    None, "pid 3", {}, {"pid": "3"}, {"pid": -1}, {"pid": 0}, {"pid": True},
    {"machine": "elsewhere|boot|pid:[1]", "pid": 1 << 22},  # another machine: its heartbeat tells
])
def test_a_worker_not_known_to_be_dead_here_is_not_gone(worker) -> None:
    if isinstance(worker, dict) and "machine" not in worker:
        worker = {**worker, "machine": workers.identity()["machine"]}
    assert not workers.gone(worker)


def test_another_machine_s_ended_pid_is_not_gone() -> None:
    me = workers.identity()
    assert not workers.gone({**me, "machine": me["machine"] + "-other", "pid": ended_pid()})


def test_a_worker_copied_onto_another_trial_names_no_worker_of_that_trial() -> None:
    """Optuna's retry of a stale trial copies its attributes: the copy must not make the new trial's
    (live) worker look dead to a worker beside it."""
    dead = {**workers.identity(7), "pid": ended_pid()}
    assert workers.gone(dead, 7) and workers.gone(dead)
    assert not workers.gone(dead, 8)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process states are read from /proc (Linux)")
def test_a_zombie_worker_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while workers._stat(child.pid)[0] != "Z":  # exited, not yet waited for
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert workers.gone({**workers.identity(), "pid": child.pid, "started": workers._started(child.pid)})
    finally:
        child.wait()
