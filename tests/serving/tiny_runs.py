"""Tiny trained runs shared by the serving tests, trained once per test process (a few seconds).

The data is an .inter file whose item tokens are strings ("i1" .. "i30"), as users' files often
are, with the successor pattern of ``conftest.successor_sequences``, so the models learn something.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from conftest import successor_sequences
from mlsa4rec.training.run import train

TINY = {"hidden_size": 16, "epochs": 2, "MAX_ITEM_LIST_LENGTH": 8, "train_batch_size": 64, "seed": 5}
RUNS = {  # name: (model, settings)
    "sasrec": ("sasrec", {**TINY, "inner_size": 16, "n_layers": 1, "n_heads": 1, "learning_rate": 0.01}),
    "gru4rec": ("gru4rec", TINY),
    "mamba4rec": ("mamba4rec", {**TINY, "epochs": 1}),
    "mlsa4rec": ("mlsa4rec", {**TINY, "epochs": 1, "train_batch_size": 256}),  # faithful: pads to L
    "mlsa4rec-causal": ("mlsa4rec", {**TINY, "epochs": 1, "train_batch_size": 256, "variant": "causal"}),
    "linrec": ("linrec", {**TINY, "epochs": 1, "inner_size": 16, "n_layers": 1, "n_heads": 1}),  # streams up to L
    "performer": ("performer", {**TINY, "epochs": 1, "inner_size": 16, "n_layers": 1, "n_heads": 1}),
    "lrurec": ("lrurec", {**TINY, "epochs": 1, "num_layers": 1}),
    "bert4rec": ("bert4rec", {**TINY, "epochs": 1, "inner_size": 16, "n_layers": 1, "n_heads": 1,
                              "mask_ratio": 0.25}),  # cloze; its mask is appended inside the encoder
}


def write_shop(path: Path, users: int = 200) -> Path:
    rows = [f"u{u}\ti{item}\t{100 * u + t}" for u, s in enumerate(successor_sequences(users, 30, seed=4))
            for t, item in enumerate(s)]
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    return path


@functools.cache
def tiny_run(name: str) -> Path:
    """The run directory of ``RUNS[name]``, trained on first use with one torch thread."""
    data = _root() / "shop.inter"
    if not data.exists():
        write_shop(data)
    model, settings = RUNS[name]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Path(train(model, str(data), _root() / name, overrides=settings)["run_dir"])
    finally:
        torch.set_num_threads(before)


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="mlsa4rec-serving-runs-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root
