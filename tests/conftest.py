"""Shared fixtures: synthetic data writers, an isolated cache, and the real-data location."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the Triton scan runs through Triton's interpreter on CPU tensors. The interpreter is
# chosen when a kernel is defined (``@triton.jit`` reads TRITON_INTERPRET), i.e. when
# ``mlsa4rec.ops._triton_scan`` is first imported, so it is set here, before any test module can
# import it; torch reads it only for Inductor's GPU kernels. An explicit TRITON_INTERPRET=0 is kept
# (the Triton tests then skip on CPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every test run gets its own dataset/download cache, never the user's ~/.cache.
os.environ["MLSA4REC_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlsa4rec-test-cache-")
os.environ.pop("MLSA4REC_DATA_DIR", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MLSA4REC_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """The real datasets beside the repo; skip (with the reason shown by -ra) when absent."""
    if not (SHARED_DATA / "ml-1m" / "ml-1m.seq.txt.gz").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (set MLSA4REC_SHARED_DATA to its folder)")
    return SHARED_DATA


def successor_sequences(
    n_users: int, n_items: int, seed: int = 0, min_len: int = 6, max_len: int = 14
) -> list[list[int]]:
    """Users walk through items in steps of +1 (mod n_items) from a random start: a pattern any
    sequential model can learn, so training must drive HR@1 close to 1."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        start = int(rng.integers(n_items))
        length = int(rng.integers(min_len, max_len + 1))
        seqs.append([(start + k) % n_items + 1 for k in range(length)])
    return seqs


def write_user_lines(path: Path, seqs: list[list[int]]) -> Path:
    path.write_text("".join(f"{u + 1} " + " ".join(map(str, s)) + "\n" for u, s in enumerate(seqs)))
    return path


@pytest.fixture
def successor_file(tmp_path: Path) -> Path:
    return write_user_lines(tmp_path / "succ.txt", successor_sequences(300, 30, seed=1))


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run the test with one torch thread, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

class BrokenStream(io.StringIO):
    """A standard output that fails after ``after`` characters: a closed pipe, a full or failing disk."""

    def __init__(self, exc: OSError, after: int) -> None:
        super().__init__()
        self.exc, self.after = exc, after

    def write(self, text: str) -> int:
        if self.tell() + len(text) > self.after:
            raise self.exc
        return super().write(text)

    def flush(self) -> None:
        if self.tell() > self.after:
            raise self.exc


def one_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI on ``argv``: it must exit 2 with exactly one ``error:`` line, no traceback, holding
    every one of ``needles``; returns that line."""
    from mlsa4rec.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
