"""What the benchmark scripts share: timing, the machine record, the command, and the report files.

The docs/results convention: the numbers live in a JSON file with the command that produced them
beside them, and the Markdown page is generated from that JSON, never edited by hand. So every
script records the machine the same way (``machine``), the command the same way (``command``),
times the same way (``repeat_timed``: warm-up calls, then repeats; report the median) and writes
through ``write_report`` (JSON, then the page; each file written to a temporary name and renamed,
so a killed run leaves the old file or the new one, never half of one).

Only the standard library is imported here: ``recbole_parity.py`` runs itself inside RecBole's own
venv, where mlsa4rec is not installed; torch and mlsa4rec are imported by the functions that need
them.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


# --- timing ---------------------------------------------------------------------------------------
def repeat_timed(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], object] | None = None,
                 budget_s: float | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (compilation, first
    allocations). ``sync`` runs after every call (``torch.cuda.synchronize``: a GPU call returns before
    its work ends). With ``budget_s``, no further call is started that the last one's time says would
    end past the budget (at least one call is timed)."""
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    times: list[float] = []
    stop = None if budget_s is None else time.perf_counter() + budget_s
    while len(times) < repeats and (stop is None or not times or time.perf_counter() + times[-1] < stop):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def median_ms(seconds: Sequence[float]) -> float:
    """The median of timed calls, in milliseconds (the median: one slow call on a shared machine moves it least)."""
    return 1000 * statistics.median(seconds)


def time_once(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()``'s result and its seconds, for work done once (a cold build has no repeat)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --- the machine and the command ------------------------------------------------------------------
def git_commit() -> str | None:
    """The checkout's commit, with '+dirty' when tracked files differ from it; None without git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else None
    except (OSError, subprocess.SubprocessError):  # no git, or a copy of the tree without .git
        return None


def gpu() -> dict[str, Any] | None:
    """The current CUDA device (name, memory, SMs, capability), or None where torch sees none."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count, "capability": f"{props.major}.{props.minor}"}


def machine(threads: int | None = None, commit: bool = True) -> dict[str, Any]:
    """What a number depends on besides the code: CPU model and cores, torch threads (``threads``,
    where the benchmark set them), torch and Python versions, the GPU if any and the commit
    (``commit=False`` where the report records its own, taken when the run started)."""
    import torch

    from mlsa4rec.runtime import cpu_model

    record: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count()}
    if threads is not None:
        record["threads"] = threads
    record.update(torch=torch.__version__, python=platform.python_version(), gpu=gpu())
    if commit:
        record["commit"] = git_commit()
    return record


def command(script: str, argv: Sequence[str] | None = None) -> str:
    """The shell command that reruns this benchmark from the repository root: ``python benchmarks/NAME.py ARGS``
    (``argv``: the arguments when ``main`` was called with them, else the process's)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *args])


# --- the data -------------------------------------------------------------------------------------
def load_or_exit(dataset: str, data_dir: str | Path | None, *args: Any, **kwargs: Any) -> Any:
    """``mlsa4rec.data.load_dataset``; where the file or the data directory is missing, the script ends
    with mlsa4rec's one-line message (it names the fix), not a traceback."""
    from mlsa4rec.data import load_dataset
    from mlsa4rec.errors import DataError

    try:
        return load_dataset(dataset, data_dir, *args, **kwargs)
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from None


# --- Markdown and the report files -----------------------------------------------------------------
def row(cells: Iterable[object]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(map(str, cells)) + " |"


def table(header: Sequence[str], rows: Iterable[Iterable[object]] = (), align: str = "") -> str:
    """A Markdown table (no trailing newline); ``align`` has one letter per column, ``l`` (the default
    for missing letters) or ``r`` for numbers."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(header), "l"))
    return "\n".join([row(header), rule, *(row(r) for r in rows)])


def write_json(path: str | Path, obj: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """``obj`` as indented JSON (``default`` for values JSON lacks), written atomically."""
    from mlsa4rec.fileio import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2, default=default) + "\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """``text`` written atomically."""
    from mlsa4rec.fileio import write_text_atomic

    write_text_atomic(path, text)
    return Path(path)


def write_report(stem: str | Path, report: dict[str, Any], markdown: str,
                 default: Callable[[Any], Any] | None = None) -> list[Path]:
    """``stem``.json (the numbers) and ``stem``.md (the page generated from them); returns both paths."""
    stem = Path(stem)
    return [write_json(stem.with_suffix(".json"), report, default), write_text(stem.with_suffix(".md"), markdown)]


def run_as_rank(child: Callable[[dict[str, Any]], None]) -> None:
    """If this process is one of ``torchrun_self``'s ranks (``SCRIPT --child JSON``), run ``child`` on
    the JSON and end the rank there, streams flushed, without the interpreter's finalization: that
    can tear the process group's C++ threads down and abort a finished rank ("terminate called
    without an active exception"), failing a good measurement now and then on a loaded machine, as
    ``mlsa4rec.runtime.exit_rank`` avoids for ``mlsa4rec train`` under torchrun (not imported here:
    ``sharded_table.py`` runs in an environment without mlsa4rec). Otherwise it returns."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def torchrun_self(script: str | Path, nproc: int, params: dict[str, Any], threads: int, timeout: float,
                  label: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script --child JSON(params)`` under ``torchrun --standalone`` with ``nproc`` ranks of
    ``threads`` threads each, and return what its rank 0 wrote to ``params['out']`` (JSON), with the
    command's wall-clock as ``wall_s``. A failed run stops the benchmark with its ``label`` and the
    end of its stderr."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), "--child", json.dumps(params)]
    t0 = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads)},
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        sys.exit(f"{label} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return {**json.loads(Path(params["out"]).read_text()), "wall_s": round(time.perf_counter() - t0, 1)}
