"""Dataset registry: data-directory resolution and checksum-verified downloads (no network)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from mlsa4rec.data import load_dataset, resolve
from mlsa4rec.data.download import Download, fetch
from mlsa4rec.data.registry import REGISTRY, DatasetSpec, locate
from mlsa4rec.errors import DataError

LINES = b"".join(b"%d 1 2 3 4 5\n" % u for u in range(1, 7))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_data_dir_flag_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = REGISTRY["amazon-beauty"]
    for d in ("flag", "env"):
        (tmp_path / d / "beauty").mkdir(parents=True)
        (tmp_path / d / "beauty" / "Beauty.txt.gz").write_bytes(gzip.compress(LINES))
    monkeypatch.setenv("MLSA4REC_DATA_DIR", str(tmp_path / "env"))
    _, path, fmt, got = resolve("amazon-beauty", tmp_path / "flag")
    assert path == tmp_path / "flag" / spec.local_path and fmt == "user-lines" and got is spec
    _, path, _, _ = resolve("amazon-beauty")
    assert path == tmp_path / "env" / spec.local_path


def test_missing_file_in_data_dir_names_both_fixes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not in data directory.*download it from https://files.grouplens"):
        resolve("ml-1m", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        resolve("ml-1m", tmp_path / "nope")


def test_unknown_dataset_suggests(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Did you mean 'ml-1m'"):
        resolve("ml-1n")


def test_fetch_file_url_zip_member(tmp_path: Path) -> None:
    archive = tmp_path / "src" / "ml.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml/ratings.dat", "1::10::5::100\n")
    source = Download(archive.as_uri(), sha(archive.read_bytes()), reader="ratings-dat", member="ml/ratings.dat")
    out = fetch(source, tmp_path / "cache")
    assert out.read_text() == "1::10::5::100\n"
    assert fetch(source, tmp_path / "cache") == out  # cached: no second download needed
    archive.unlink()
    assert fetch(source, tmp_path / "cache") == out


def test_checksum_mismatch_keeps_nothing(tmp_path: Path) -> None:
    src = tmp_path / "data.txt"
    src.write_bytes(LINES)
    source = Download(src.as_uri(), "0" * 64, reader="user-lines")
    with pytest.raises(DataError, match="checksum mismatch.*nothing was kept"):
        fetch(source, tmp_path / "cache")
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_unreachable_url(tmp_path: Path) -> None:
    source = Download((tmp_path / "absent.txt").as_uri(), None, reader="user-lines")
    with pytest.raises(DataError, match="could not download"):
        fetch(source, tmp_path / "cache")


def test_no_published_checksum_is_trusted_on_first_use(tmp_path: Path) -> None:
    src = tmp_path / "data.txt"
    src.write_bytes(LINES)
    source = Download(src.as_uri(), None, reader="user-lines")
    out = fetch(source, tmp_path / "cache")
    record = out.with_name(out.name + ".sha256")
    assert record.read_text().strip() == sha(LINES)
    out.write_bytes(b"tampered")            # a later use re-verifies and re-downloads
    assert fetch(source, tmp_path / "cache").read_bytes() == LINES


@pytest.fixture
def http_server(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_over_http_then_load(tmp_path: Path, http_server, monkeypatch: pytest.MonkeyPatch) -> None:
    root, base = http_server
    (root / "toy.txt.gz").write_bytes(gzip.compress(LINES))
    good = Download(f"{base}/toy.txt.gz", sha((root / "toy.txt.gz").read_bytes()), reader="user-lines")
    spec = DatasetSpec("toy", "toy/toy.txt.gz", "user-lines", good, (6, 5, 30), "synthetic")
    path, fmt = locate(spec, None, tmp_path / "cache")
    assert fmt == "user-lines" and path.read_bytes() == (root / "toy.txt.gz").read_bytes()
    monkeypatch.setitem(REGISTRY, "toy", spec)
    monkeypatch.setenv("MLSA4REC_CACHE_DIR", str(tmp_path / "cache"))
    data = load_dataset("toy")
    assert (data.n_users, data.n_items, data.n_interactions) == (6, 5, 30)
    bad = Download(f"{base}/toy.txt.gz", "f" * 64, reader="user-lines")
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch(bad, tmp_path / "cache2")
    with pytest.raises(DataError, match="could not download"):
        fetch(Download(f"{base}/missing.gz", None, reader="user-lines"), tmp_path / "cache3")
