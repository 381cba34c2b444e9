"""The real-data path end to end: read shared/data, train briefly, evaluate (skips without data)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from mlsa4rec.data import load_dataset
from mlsa4rec.training.run import train

pytestmark = pytest.mark.realdata

REPO = Path(__file__).resolve().parents[1]


def test_ml1m_builds_fast_and_is_cached(shared_data: Path) -> None:
    t0 = time.perf_counter()
    data = load_dataset("ml-1m", shared_data, use_cache=False)
    built = time.perf_counter() - t0
    assert data.n_interactions == 999_611
    # generous bound (the build takes ~0.6 s here): catches a per-event Python loop, not noise
    assert built < 20, built
    assert len(data.train_targets()) == 981_491
    assert len(data.eval_targets("valid")) == len(data.eval_targets("test")) == 6040


def test_sasrec_one_epoch_on_beauty(shared_data: Path, tmp_path: Path) -> None:
    """The first epoch of the recorded run docs/results/sasrec-beauty.json (configs/sasrec-beauty.yaml,
    seed 2020), ~25 s. It reached valid NDCG@10 0.01358 there, and here (the same number to the last
    digit on the 2-core CPU) test HR@10 0.0207 / NDCG@10 0.0102. The floors sit 5 % under: a causal
    mask that lets each position see the next item in training (its target) reaches 0.0117 / 0.0175 /
    0.0083 after the same epoch, and fails them; so would a model that learns less per epoch."""
    recorded = json.loads((REPO / "docs" / "results" / "sasrec-beauty.json").read_text())
    assert recorded["config"]["seed"] == 2020 and recorded["config"]["train_batch_size"] == 128
    first_epoch = recorded["valid_curve"][0]
    assert first_epoch == pytest.approx(0.01358, abs=1e-5)
    results = train("sasrec", "amazon-beauty", tmp_path / "run", data_dir=shared_data,
                    config_files=[REPO / "configs" / "sasrec-beauty.yaml"], overrides={"epochs": 1})
    assert results["dataset"]["users"] == 22_363
    assert yaml.safe_load((Path(results["run_dir"]) / "config.yaml").read_text())["seed"] == 2020
    assert results["valid"]["ndcg@10"] > 0.95 * first_epoch, results["valid"]
    assert results["test"]["hit@10"] > 0.95 * 0.0207, results["test"]
    assert results["test"]["ndcg@10"] > 0.95 * 0.0102, results["test"]


@pytest.mark.parametrize("study_file", sorted(p.name for p in (REPO / "studies").glob("*.yaml")))
def test_the_committed_study_files_build_every_cell(shared_data: Path, study_file: str) -> None:
    """Every cell of every study we commit is built as training builds it (presets, files, settings
    the models accept) and its dataset found, so a study never fails at its hundredth cell."""
    from mlsa4rec.experiments.study import cell_config, load_study

    study = load_study(REPO / "studies" / study_file)  # checks every cell
    assert study.cells and all(cell_config(c, study).train.seed == c.seed for c in study.cells)


# the processed arrays (SHA-256 prefixes of items, offsets, item_tokens, user_tokens) and the fingerprint
# of each registered dataset, as every finished run and study cell was trained on them: a change to
# the pipeline that moves one would invalidate them all (measured on mlsa4rec d5077ad, before the
# Parquet reader and the columnar remap of issue 27)
PINNED = {
    "ml-1m": ("880f40becbafc147b97d", ("ec4f072adaf8", "1affaad0a299", "3e6b4de0dc7a", "0ca0c2dcbd2d")),
    "amazon-beauty": ("04307da72ddeae0879d2", ("59a51a49b63d", "ef592a8a143d", "b60bc5a51ea5", "6a8cb9802ba4")),
    "amazon-video-games": ("a43aee96350b52b6d6ea", ("10a0bb32e6f0", "6b9319b8f0be", "89bba1f48a9b", "3a2bdfe48af9")),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_registered_datasets_process_to_the_same_arrays(shared_data: Path, name: str) -> None:
    from mlsa4rec.data import REGISTRY
    from mlsa4rec.data.dataset import array_digest, load_sequences

    spec = REGISTRY[name]
    data = load_sequences(shared_data / spec.local_path, spec.reader, name, use_cache=False)
    digests = tuple(array_digest(getattr(data, a))[:12] for a in ("items", "offsets", "item_tokens", "user_tokens"))
    assert (data.fingerprint, digests) == PINNED[name]
