"""The ONNX export stores the item table once: encoder.onnx and step.onnx read their item embedding
from item_table.npy as ONNX external data (offset = the .npy header's length), so an export of a
large catalog weighs about one table, not three; onnxruntime still gives PyTorch's numbers, and
the graphs too big for one protobuf (weights in GRAPH.onnx.data) share it the same way.

The model is a GRU4Rec (it streams: both graphs) over 50,000 items x 64, untrained: the export
reads nothing of a run but its Recommender, given here directly (``Recommender.from_run`` patched).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import _require_extra  # the onnx extras, skipped with the same reason
from torch.utils import _pytree as pytree

from mlsa4rec.config import build_config
from mlsa4rec.data.itemmap import ItemMap
from mlsa4rec.fileio import sha256_file
from mlsa4rec.models import create
from mlsa4rec.serving import Recommender
from mlsa4rec.serving import export as export_module
from mlsa4rec.serving.export import export_run

N_ITEMS, WIDTH = 50_000, 64
TABLE_BYTES = (N_ITEMS + 1) * WIDTH * 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rec() -> Recommender:
    torch.manual_seed(0)
    settings = {"MAX_ITEM_LIST_LENGTH": 8, "embedding_size": WIDTH, "hidden_size": 32}
    model = create("gru4rec", N_ITEMS, **settings)
    items = ItemMap([f"x{i}" for i in range(1, N_ITEMS + 1)], np.ones(N_ITEMS, dtype=np.int64))
    return Recommender(model, build_config("gru4rec", overrides=settings), items, torch.device("cpu"))


def _export(rec: Recommender, out: Path, split: bool = False) -> Path:
    _require_extra()
    run = out.parent / "run"
    run.mkdir(exist_ok=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Recommender, "from_run", classmethod(lambda cls, *args, **kwargs: rec))
        if split:  # as a graph over 2 GB is written: its weights in GRAPH.onnx.data
            patch.setattr(export_module, "_too_big_for_one_file", lambda module: True)
        try:
            export_run(run, out)
        finally:
            torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def exported(rec: Recommender, tmp_path_factory) -> Path:
    return _export(rec, tmp_path_factory.mktemp("shared") / "export")


def _session(path: Path):
    ort = _require_extra()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _assert_parity(rec: Recommender, export: Path) -> None:
    """onnxruntime's encoder and step against PyTorch, and their top 10 against the Recommender's."""
    rng = np.random.default_rng(0)
    seq = rng.integers(1, N_ITEMS + 1, (4, 8))
    lengths = np.array([8, 3, 1, 5])
    seq[np.arange(8)[None, :] >= lengths[:, None]] = 0
    (user,) = _session(export / "encoder.onnx").run(["user"], {"item_seq": seq, "lengths": lengths})
    with torch.no_grad():
        expected = rec.model(torch.from_numpy(seq), torch.from_numpy(lengths)).numpy()
    assert np.abs(user - expected).max() <= 1e-4
    table = np.load(export / "item_table.npy")
    assert np.array_equal(table, rec.model.item_table().detach().numpy())
    scores = user @ table.T
    scores[:, 0] = -np.inf
    histories = [[f"x{i}" for i in row[:n]] for row, n in zip(seq.tolist(), lengths.tolist())]
    for row, answer in zip(scores, rec.recommend(histories, 10)):
        assert [r.item for r in answer] == [f"x{i}" for i in np.argsort(-row, kind="stable")[:10]]
    meta = json.loads((export / "export.json").read_text())
    step = _session(export / "step.onnx")
    state = rec.model.initial_state(2)
    feed = {s["name"]: np.full([2, *s["shape"][1:]], float(s["initial"]), dtype=s["dtype"])
            for s in meta["step"]["state"]}
    for items in rng.integers(1, N_ITEMS + 1, (3, 2)):
        got = step.run(None, {"item": items, **feed})
        with torch.no_grad():
            user, state = rec.model.step(torch.from_numpy(items), state)
        for a, b in zip(got, [user, *pytree.tree_leaves(state)]):
            assert np.abs(a - b.numpy()).max() <= 1e-4
        feed = dict(zip(feed, got[1:]))


def test_the_export_holds_the_table_once(rec: Recommender, exported: Path) -> None:
    import onnx

    sizes = {p.name: p.stat().st_size for p in exported.iterdir()}
    assert set(sizes) == {"encoder.onnx", "step.onnx", "item_table.npy", "items.json", "export.json"}
    assert TABLE_BYTES < sizes["item_table.npy"] <= TABLE_BYTES + 4096
    graphs = sizes["encoder.onnx"] + sizes["step.onnx"]
    assert graphs < 0.05 * TABLE_BYTES, sizes  # without the table (each held a copy of it before)
    total = sum(sizes.values()) - sizes["items.json"]  # the raw ids: another matter
    assert total < 1.1 * TABLE_BYTES, sizes
    meta = json.loads((exported / "export.json").read_text())
    header = sizes["item_table.npy"] - TABLE_BYTES
    for name, graph in (("encoder", "encoder.onnx"), ("step", "step.onnx")):
        shared = meta[name]["external_data"]
        assert shared == {"file": "item_table.npy", "offset": header, "length": TABLE_BYTES,
                          "initializers": shared["initializers"]} and len(shared["initializers"]) == 1
        proto = onnx.load(str(exported / graph), load_external_data=False)
        (tensor,) = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        info = {e.key: e.value for e in tensor.external_data}
        assert info == {"location": "item_table.npy", "offset": str(header), "length": str(TABLE_BYTES)}
        assert list(tensor.dims) == [N_ITEMS + 1, WIDTH] and not tensor.HasField("raw_data")
    assert meta["item_table"]["read_by"] == ["encoder.onnx", "step.onnx"]
    for name, entry in meta["files"].items():  # the checksums cover the shared file
        assert entry == {"bytes": sizes[name], "sha256": sha256_file(exported / name)}
    assert meta["encoder"]["onnxruntime_max_abs_diff"] <= 1e-4 and meta["step"]["onnxruntime_max_abs_diff"] <= 1e-4


def test_onnxruntime_reading_the_shared_table_gives_pytorchs_numbers(rec: Recommender, exported: Path) -> None:
    _assert_parity(rec, exported)


def test_a_graph_too_big_for_one_file_shares_the_table_too(rec: Recommender, tmp_path: Path) -> None:
    """Weights written beside the graph (GRAPH.onnx.data, as over 2 GB): the table leaves that file
    for item_table.npy and the rest stays there."""
    export = _export(rec, tmp_path / "export", split=True)
    sizes = {p.name: p.stat().st_size for p in export.iterdir()}
    assert {"encoder.onnx.data", "step.onnx.data"} <= set(sizes)
    assert sizes["encoder.onnx.data"] + sizes["step.onnx.data"] < 0.05 * TABLE_BYTES, sizes
    assert set(json.loads((export / "export.json").read_text())["files"]) == set(sizes) - {"export.json"}
    _assert_parity(rec, export)
