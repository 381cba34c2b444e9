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


class RedisServer:
    """A redis-server process of the tests' own on a free loopback port (killed and started again by
    the tests that need Redis to go away and come back)."""

    def __init__(self, binary: str) -> None:
        import socket

        self.binary = binary
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self) -> None:
        import subprocess
        import time

        import redis

        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--protected-mode", "yes"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real Redis for the session-store tests: ``redis-server`` from the PATH (Debian's package;
    .ci/run installs it), skipped with the reason shown by -ra where it is missing."""
    import shutil

    pytest.importorskip("redis", reason="the redis client is not installed (pip install 'mlsa4rec[redis]')")
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server); the Redis session store "
                    "is untested here")
    server = RedisServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()
