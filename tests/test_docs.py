"""Every command block of README.md and docs/*.md runs as written, top to bottom (issue 23).

The fenced blocks labelled ``bash``, ``sh``, ``shell``, ``console`` or ``python`` of each document
run in order in one temporary working directory, so a run trained by an earlier block is the one a
later block reads. docs/results/ is not read (its blocks are records of runs, not instructions), and
unlabelled blocks (diagrams) are not commands.

* A shell block runs as one script under ``bash -euo pipefail``, in its own process group, which is
  killed when the block ends, so a server started with ``&`` never outlives its block (even when
  the block fails). Its output goes to a file, not a pipe, so a leftover server cannot hold the
  test up.
* A python block runs in a fresh ``python`` after the document's earlier python blocks (their
  output discarded), in one namespace: a later block may use what an earlier one defined, as a
  reader following the page would.
* A block whose preceding non-empty line is ``*(not run by the docs test: REASON)*`` is not run;
  ``test_marked_block_is_skipped`` reports it with ``pytest.skip`` (document, line, the block's
  first line, REASON). Blocks that need a GPU, several machines, RecBole's environment, hours of
  training or installing packages carry the marker.
* A block that fails (any command exiting non-zero) fails its document's test with the block's
  text as run and its output.

The environment: ``configs/`` in the working directory is a symbolic link to the repository's,
the interpreter's directory (``.venv/bin``: ``mlsa4rec``, ``torchrun``, ``python``) is first on
PATH, ``MLSA4REC_CACHE_DIR`` is a folder of the test's, ``MLSA4REC_DATA_DIR`` is unset,
``OMP_NUM_THREADS`` is 1 unless set, and localhost bypasses any proxy.

The commands are the documents' own; only these substitutions are made, and nothing else:

=====================================  ==========================================================
in the document                        in the test
=====================================  ==========================================================
``../shared/data`` (the datasets)      a tiny synthetic data directory with shared/data's layout
                                       (``ml-1m/ml-1m.seq.txt.gz``, ``beauty/Beauty.txt.gz``,
                                       ``video_games/Video_Games.5core.txt.gz``): 300 users each,
                                       walking 30 items in steps of one (``successor_sequences``),
                                       with the ids the documents use (Beauty and Video Games
                                       items 1..30; ML-1M's 30 items include 1193, 661 and 914)
``/data`` as a path (an example dir)   the same synthetic data directory
``mlsa4rec train ...`` (also under     the same command with ``--set epochs=2`` appended
``torchrun -m`` / ``python -m``)
``--port 8000``, ``:8000``             a free port
=====================================  ==========================================================

The whole file takes 2.5 to 3.5 minutes on a 2-core machine shared with other work (148 s and 200 s
measured); docs/usage.md's three trainings, comparison and ONNX export are about half of it.
"""

from __future__ import annotations

import gzip
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import successor_sequences

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # not docs/results/: records
SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py"}
MARKER = re.compile(r"^\*\(not run by the docs test: (?P<reason>.+)\)\*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<label>[^`\s]*)\s*$")
BLOCK_TIMEOUT_S = 900

N_USERS, N_ITEMS = 300, 30
# item ids each registered dataset's synthetic file uses: the documents' example ids must be among them
ML_1M_ITEMS = [1193, 661, 914, 3408, 2355, 1197, 1287, 2804, 594, 919, 595, 938, 2398, 2918, 1035,
               2791, 2687, 2018, 3105, 2797, 2321, 720, 1270, 527, 2340, 48, 1097, 1721, 1545, 745]
DATASET_FILES = {
    "ml-1m/ml-1m.seq.txt.gz": ML_1M_ITEMS,
    "beauty/Beauty.txt.gz": list(range(1, N_ITEMS + 1)),
    "video_games/Video_Games.5core.txt.gz": list(range(1, N_ITEMS + 1)),
}


@dataclass(frozen=True)
class Block:
    doc: str      # path relative to the repository
    line: int     # line of the opening fence
    label: str
    text: str
    skip_reason: str | None

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """The command blocks of one document (labelled shell or python), in order."""
    doc = path.relative_to(REPO).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, label = i, opening["label"].lower()
        i += 1
        body = []
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{doc}:{start + 1}: a fenced block that is never closed")
        i += 1  # the closing fence
        if label not in SHELL | PYTHON:
            continue
        before = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        marker = MARKER.match(before)
        indent = len(opening["indent"])
        text = "\n".join(line[indent:] if line[:indent].isspace() else line for line in body) + "\n"
        blocks.append(Block(doc, start + 1, label, text, marker["reason"] if marker else None))
    return blocks


ALL_BLOCKS = {path.relative_to(REPO).as_posix(): blocks_of(path) for path in DOCS}
RUN_DOCS = [doc for doc, blocks in ALL_BLOCKS.items() if any(b.skip_reason is None for b in blocks)]
MARKED = [b for blocks in ALL_BLOCKS.values() for b in blocks if b.skip_reason is not None]


# ---------------------------------------------------------------- substitutions

TRAIN = re.compile(r"\bmlsa4rec\s+train\b")
TRAIN_SIZE = "--set epochs=2"


def _end_of_command(line: str, start: int) -> int:
    """Where the command running from ``start`` in ``line`` ends: at an unquoted comment, pipe,
    ``&``, ``;`` or redirection, else at the end of the line (trailing blanks excluded)."""
    quote = None
    i = start
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif c in "|&;<>" or (c == "#" and (i == 0 or line[i - 1].isspace())):
            end = i - 1 if c in "<>" and i > 0 and line[i - 1].isdigit() else i  # 2>&1
            return len(line[:end].rstrip())
        i += 1
    return len(line.rstrip())


def size_train_commands(script: str) -> str:
    """Append ``--set epochs=2`` to every ``mlsa4rec train`` command (continuation lines followed)."""
    lines = script.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        first = i
        while lines[i].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
        group = lines[first:i + 1]
        i += 1
        match = None
        for line in group:
            match = TRAIN.search(line)
            if match:
                break
        if match:
            last = group[-1]
            start = match.end() if len(group) == 1 else 0
            end = _end_of_command(last, start)
            rest = last[end:]
            group[-1] = f"{last[:end]} {TRAIN_SIZE}" + (rest if not rest or rest[0].isspace() else " " + rest)
        out.extend(group)
    return "\n".join(out)


def substitute(block: Block, data_dir: Path, port: int) -> str:
    text = block.text.replace("../shared/data", str(data_dir))
    text = re.sub(r"(?<=\s)/data(?=[\s/]|$)", str(data_dir), text)
    if block.label in SHELL:
        text = re.sub(r"(?<=--port )8000\b|(?<=:)8000\b", str(port), text)
        text = size_train_commands(text)
    return text


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny stand-in for ../shared/data: every registered dataset, 300 users over 30 items."""
    root = tmp_path_factory.mktemp("shared-data")
    for seed, (relative, items) in enumerate(DATASET_FILES.items()):
        seqs = successor_sequences(N_USERS, N_ITEMS, seed=seed)
        path = root / relative
        path.parent.mkdir(parents=True)
        with gzip.open(path, "wt") as f:
            f.writelines(f"{u + 1} " + " ".join(str(items[i - 1]) for i in seq) + "\n" for u, seq in enumerate(seqs))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def doc_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLSA4REC_DATA_DIR", None)
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the in-process tests only
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLSA4REC_CACHE_DIR"] = str(tmp / "cache")
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


PYTHON_DRIVER = """\
import contextlib, io, sys
namespace = {"__name__": "__main__"}
*earlier, last = sys.argv[1:]
for path in earlier:  # the document's earlier python blocks, already checked: their output is noise
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(open(path).read(), path, "exec"), namespace)
exec(compile(open(last).read(), last, "exec"), namespace)
"""


def run_in_group(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> int:
    """Run ``argv`` in a new process group, output to ``log``; kill the whole group at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return -1
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a server started with & dies with its block
            except ProcessLookupError:
                pass
            proc.wait()


# ---------------------------------------------------------------- tests


def run_document(blocks: list[Block], data_dir: Path, tmp_path: Path) -> None:
    """Run the unmarked blocks in order in one working directory; fail at the first that fails."""
    work, scripts = tmp_path / "work", tmp_path / "blocks"
    work.mkdir()
    scripts.mkdir()
    (work / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    (scripts / "driver.py").write_text(PYTHON_DRIVER)
    env = doc_env(tmp_path)
    port = free_port()
    python_blocks: list[Path] = []
    for n, block in enumerate(blocks):
        if block.skip_reason is not None:
            continue  # reported by test_marked_block_is_skipped
        text = substitute(block, data_dir, port)
        stem = f"{re.sub(r'[^A-Za-z0-9]+', '_', block.doc)}_L{block.line}"
        script = scripts / f"{stem}{'.sh' if block.label in SHELL else '.py'}"
        script.write_text(text)
        if block.label in SHELL:
            argv = ["bash", "-euo", "pipefail", str(script)]
        else:
            argv = [sys.executable, str(scripts / "driver.py"), *map(str, python_blocks), str(script)]
            python_blocks.append(script)
        log = scripts / f"{stem}.log"
        rc = run_in_group(argv, work, env, log)
        if rc != 0:
            output = log.read_text(errors="replace")
            status = f"timed out after {BLOCK_TIMEOUT_S} s" if rc == -1 else f"exited {rc}"
            pytest.fail(
                f"{block.where} (block {n + 1} of {block.doc}) {status}.\n"
                f"--- the block as run ({'bash -euo pipefail' if block.label in SHELL else 'python'}):\n{text}\n"
                f"--- its output (last 8000 characters):\n{output[-8000:]}",
                pytrace=False,
            )


@pytest.mark.parametrize("doc", RUN_DOCS)
def test_doc_blocks_run_as_written(doc: str, data_dir: Path, tmp_path: Path) -> None:
    run_document(ALL_BLOCKS[doc], data_dir, tmp_path)


@pytest.mark.parametrize("block", MARKED, ids=[b.where for b in MARKED])
def test_marked_block_is_skipped(block: Block) -> None:
    pytest.skip(f"{block.where} `{block.first_line}`: {block.skip_reason}")


def test_the_documents_have_command_blocks() -> None:
    """The extraction finds the quickstart (a parser that found nothing would pass everything)."""
    assert "README.md" in RUN_DOCS and "docs/usage.md" in RUN_DOCS
    assert any("mlsa4rec serve" in b.text and b.skip_reason is None for b in ALL_BLOCKS["README.md"])


def test_markers_are_well_formed() -> None:
    """A marker names its reason and sits right above a command block; nothing else looks like one."""
    problems = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not line.strip().startswith("*(not run by the docs test"):
                continue  # prose may name the marker
            where = f"{path.relative_to(REPO).as_posix()}:{i + 1}"
            following = next((x.strip() for x in lines[i + 1:] if x.strip()), "")
            label = following[3:].strip().lower() if following.startswith("```") else None
            if not MARKER.match(line.strip()):
                problems.append(f"{where}: not of the form *(not run by the docs test: REASON)*")
            elif label not in SHELL | PYTHON:
                problems.append(f"{where}: a marker not followed by a shell or python block")
    assert not problems, "\n".join(problems)


def test_the_substitutions() -> None:
    block = Block("x.md", 1, "bash", (
        "mlsa4rec train --model m --dataset ml-1m --data-dir ../shared/data \\\n"
        "    --output-dir runs/x   # a comment\n"
        "torchrun --standalone -m mlsa4rec train --data-dir /data --output-dir runs/y\n"
        "mlsa4rec train --output-dir runs/z > log 2>&1 &\n"
        "mlsa4rec serve --run-dir runs/x --port 8000 &\n"
        "curl localhost:8000/health\n"
        "mlsa4rec recommend --run-dir runs/x --history '8000'\n"
    ), None)
    assert substitute(block, Path("/tmp/d"), 1234) == (
        "mlsa4rec train --model m --dataset ml-1m --data-dir /tmp/d \\\n"
        "    --output-dir runs/x --set epochs=2   # a comment\n"
        "torchrun --standalone -m mlsa4rec train --data-dir /tmp/d --output-dir runs/y --set epochs=2\n"
        "mlsa4rec train --output-dir runs/z --set epochs=2 > log 2>&1 &\n"
        "mlsa4rec serve --run-dir runs/x --port 1234 &\n"
        "curl localhost:1234/health\n"
        "mlsa4rec recommend --run-dir runs/x --history '8000'\n"
    )


def _optional_dependencies() -> set[str]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    with (REPO / "pyproject.toml").open("rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


def test_extras_named_in_the_docs_exist() -> None:
    """Every ``pip install '.[a,b]'`` / ``'mlsa4rec[a]'`` extra in the documents is in pyproject.toml."""
    extras = _optional_dependencies()
    named = {}
    for path in [*DOCS, REPO / "Makefile"]:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if "pip install" not in line:
                continue
            for group in re.findall(r"(?:\.|mlsa4rec)\[([A-Za-z0-9_,\- ]+)\]", line):
                for extra in group.split(","):
                    named.setdefault(extra.strip(), f"{path.relative_to(REPO).as_posix()}:{i + 1}")
    assert named, "no pip install with extras found: the pattern no longer matches the documents"
    unknown = {extra: where for extra, where in named.items() if extra not in extras}
    assert not unknown, f"extras not in pyproject.toml's optional-dependencies: {unknown}"


def test_a_failing_block_fails_with_its_text_and_output(tmp_path: Path) -> None:
    blocks = [Block("fake.md", 3, "bash", "echo first\n", None),
              Block("fake.md", 7, "bash", "echo 'it went wrong' >&2\nfalse\necho never\n", None),
              Block("fake.md", 12, "bash", "echo not reached > reached\n", None)]
    with pytest.raises(pytest.fail.Exception, match=r"(?s)fake.md:7 .*exited 1.*false.*it went wrong") as failed:
        run_document(blocks, tmp_path / "data", tmp_path)
    assert "never" not in str(failed.value).split("its output")[1]
    assert not (tmp_path / "work" / "reached").exists()


def test_python_blocks_share_the_documents_namespace(tmp_path: Path) -> None:
    blocks = [Block("fake.md", 1, "python", "x = 41\nprint('printed once')\n", None),
              Block("fake.md", 5, "bash", "true\n", "a marked block is not run"),
              Block("fake.md", 9, "python", "assert x + 1 == 42\n", None)]
    run_document(blocks, tmp_path / "data", tmp_path)
    logs = sorted((tmp_path / "blocks").glob("*.log"))
    assert [log.read_text() for log in logs] == ["printed once\n", ""]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="reads /proc")
def test_a_background_server_dies_with_its_failing_block(tmp_path: Path) -> None:
    script = tmp_path / "block.sh"
    script.write_text("sleep 600 &\necho $! > pid\nfalse\n")
    started = time.monotonic()
    rc = run_in_group(["bash", "-euo", "pipefail", str(script)], tmp_path, doc_env(tmp_path), tmp_path / "log")
    assert rc == 1 and time.monotonic() - started < 60
    proc = Path(f"/proc/{(tmp_path / 'pid').read_text().strip()}")
    deadline = time.monotonic() + 10
    while proc.exists() and "\nState:\tZ" not in proc.joinpath("status").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not proc.exists() or "\nState:\tZ" in proc.joinpath("status").read_text(), "the & process survived"
