"""The named datasets: where each sits in a data directory, and where it comes from upstream.

A data directory has the layout of the project's ``shared/data`` folder. It is taken from
``--data-dir``, else from ``$MLSA4REC_DATA_DIR``. With neither, the official file is downloaded
once into the cache (``$MLSA4REC_CACHE_DIR`` or ``~/.cache/mlsa4rec``). Adding a dataset is one
entry here.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from mlsa4rec.data.download import Download, fetch
from mlsa4rec.errors import DataError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    local_path: str                  # relative to a data directory
    reader: str                      # reader of the local file
    download: Download               # official source for users without the local file
    expected: tuple[int, int, int]   # users, items, interactions after the default 5-core
    about: str


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "ml-1m", "ml-1m/ml-1m.seq.txt.gz", "user-lines",
            Download(
                "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
                "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
                reader="ratings-dat", member="ml-1m/ratings.dat",
            ),
            (6040, 3416, 999611),
            "MovieLens-1M (GroupLens; research use, no redistribution; cite Harper & Konstan 2015)",
        ),
        DatasetSpec(
            "amazon-beauty", "beauty/Beauty.txt.gz", "user-lines",
            Download(
                "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Beauty_5.json.gz",
                None, reader="amazon-json",
            ),
            (22363, 12101, 198502),
            "Amazon Beauty 2014, 5-core (McAuley et al.; cite He & McAuley WWW 2016)",
        ),
        DatasetSpec(
            "amazon-video-games", "video_games/Video_Games.5core.txt.gz", "user-lines",
            Download(
                "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Video_Games_5.json.gz",
                None, reader="amazon-json",
            ),
            (24303, 10672, 231780),
            "Amazon Video Games 2014, 5-core (McAuley et al.; cite He & McAuley WWW 2016)",
        ),
    ]
}


def data_dir_from(arg: str | os.PathLike[str] | None) -> Path | None:
    """``--data-dir`` if given, else ``$MLSA4REC_DATA_DIR``, else None."""
    if arg:
        return Path(arg)
    env = os.environ.get("MLSA4REC_DATA_DIR")
    return Path(env) if env else None


def get_spec(name: str) -> DatasetSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DataError(
        f"unknown dataset {name!r}: not a registered name ({', '.join(REGISTRY)}) nor an existing "
        f"file.{hint}"
    )


def locate(spec: DatasetSpec, data_dir: Path | None, cache: Path) -> tuple[Path, str]:
    """The file to read for ``spec`` and its reader: the data directory's copy, else a download."""
    if data_dir is not None:
        path = data_dir / spec.local_path
        if path.is_file():
            return path, spec.reader
        if not data_dir.is_dir():
            raise DataError(f"data directory {str(data_dir)!r} does not exist; fix --data-dir or MLSA4REC_DATA_DIR")
        raise DataError(
            f"{spec.name}: {spec.local_path} is not in data directory {str(data_dir)!r}. Put the file "
            f"there, or drop --data-dir and unset MLSA4REC_DATA_DIR to download it from {spec.download.url}"
        )
    return fetch(spec.download, cache), spec.download.reader
