"""Write-then-rename helpers, so that a crash never leaves a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from mlsa4rec.errors import MLSA4RecError


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Write ``path`` through ``writer(tmp)``; on failure the old file (if any) is untouched and a
    full disk or a permission problem is one ``MLSA4RecError`` naming the file."""
    try:
        with atomic_path(path) as tmp:
            writer(tmp)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise MLSA4RecError(f"cannot write {str(path)!r}: {reason}; free disk space or fix the permissions, the "
                            "file was left as it was") from None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, yaml.safe_dump(obj, sort_keys=False))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
