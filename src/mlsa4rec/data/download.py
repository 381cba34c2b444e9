"""Fetch a file once into the cache, verifying its SHA-256 while it streams.

The file is written to a temporary name and renamed only after the checksum matches, so a cut
connection or a changed upstream file never leaves a file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mlsa4rec.errors import DataError
from mlsa4rec.fileio import atomic_path, sha256_file, write_text_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Download:
    """Where a dataset lives upstream and how to check it.

    ``sha256`` is the published checksum of the file at ``url``. Where no checksum is published
    it is None: the first download's checksum is then recorded beside the file and every later
    use is verified against that record (trust on first use), and a warning says so.
    """

    url: str
    sha256: str | None
    reader: str                 # name of the reader for the (extracted) file
    member: str | None = None   # path inside a zip archive, if the download is one


def _stream(url: str, dest: Path, expected: str | None, timeout: float) -> str:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(dest) as tmp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                                               disable=None, leave=False) as bar:
                while block := resp.read(1 << 20):
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
            got = digest.hexdigest()
            if expected is not None and got != expected.lower():
                raise DataError(
                    f"checksum mismatch for {url}: expected sha256 {expected}, got {got}. The download "
                    "is corrupt or the file changed upstream; nothing was kept. Retry, or place a good "
                    "copy in your data directory and pass --data-dir"
                )
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"could not download {url} ({reason}). Check the network, or download it yourself and "
            "point --data-dir (or MLSA4REC_DATA_DIR) at the folder holding it"
        ) from None
    return got


def fetch(source: Download, cache: Path, timeout: float = 60.0) -> Path:
    """Return a verified local copy of ``source`` (extracting ``member`` from a zip)."""
    folder = cache / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / Path(urllib.request.url2pathname(source.url.rsplit("/", 1)[-1]))
    record = dest.with_name(dest.name + ".sha256")
    expected = source.sha256 or (record.read_text().strip() if record.is_file() else None)
    if dest.is_file() and expected is not None and sha256_file(dest) != expected:
        log.warning("cached %s fails its checksum; downloading it again", dest)
        dest.unlink()
    if not dest.is_file():
        log.info("downloading %s", source.url)
        got = _stream(source.url, dest, expected, timeout)
        if source.sha256 is None and not record.is_file():
            write_text_atomic(record, got + "\n")
            log.warning(
                "%s has no published checksum; recorded sha256 %s on first download and will "
                "verify against it from now on", source.url, got,
            )
    if source.member is None:
        return dest
    extracted = folder / f"{dest.stem}-{Path(source.member).name}"
    if not extracted.is_file():
        try:
            with zipfile.ZipFile(dest) as zf, zf.open(source.member) as src, atomic_path(extracted) as tmp:
                with open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{dest} is not the expected archive ({exc}); delete it and retry") from None
    return extracted
