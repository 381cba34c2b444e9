"""The allocator tuning is optional and never fails; a torchrun rank's exit code is the one its
command returned, whatever the interpreter's finalization does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlsa4rec.runtime import tune_allocator


def test_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSA4REC_DEFAULT_MALLOC", "1")
    assert tune_allocator() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_applies_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLSA4REC_DEFAULT_MALLOC", raising=False)
    assert isinstance(tune_allocator(), bool)


# a finalization that aborts the process, as torch.distributed's threads were seen to do after a published run
ABORT_AT_EXIT = ("import atexit, os, runpy, sys; atexit.register(os.abort); sys.argv = ['mlsa4rec', *sys.argv[1:]]; "
                 "runpy.run_module('mlsa4rec', run_name='__main__')")


@pytest.mark.parametrize("argv, code", [(["models"], 0), (["train", "--model", "nope", "--dataset", "x"], 2)])
def test_a_rank_exits_with_its_commands_code_and_its_output_flushed(argv: list[str], code: int) -> None:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1"}
    rank = subprocess.run([sys.executable, "-c", ABORT_AT_EXIT, *argv], capture_output=True, text=True, env=env,
                          timeout=120)
    assert rank.returncode == code, rank.stderr[-2000:]
    assert ("sasrec" in rank.stdout) if code == 0 else rank.stderr.startswith("error: ")
    # outside torchrun the interpreter ends as usual (the abort handler runs): the check above can fail
    plain = subprocess.run([sys.executable, "-c", ABORT_AT_EXIT, "models"], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, timeout=120)
    assert plain.returncode != 0 and "sasrec" in plain.stdout
