"""Exporting a run to ONNX: onnxruntime gives the PyTorch model's numbers (encoder and streaming
step), export.json describes the files, an existing directory is never clobbered, the CLI, and the
one-line error when the onnx extra is missing.

The export tests need the onnx extra (onnx, onnxscript, onnxruntime) and skip, with that reason,
without it; the scan and missing-package tests run either way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import tiny_run
from torch.utils import _pytree as pytree

import mlsa4rec
from mlsa4rec.cli import main
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.fileio import sha256_file
from mlsa4rec.ops import resolve_impl, selective_scan, selective_scan_reference, use_implementation
from mlsa4rec.serving import Recommender
from mlsa4rec.serving import export as export_module
from mlsa4rec.serving.export import export_run

MODELS = {"sasrec": "sasrec", "gru4rec": "gru4rec", "mamba4rec": "mamba4rec", "mlsa4rec": "mlsa4rec-causal",
          "bert4rec": "bert4rec", "linrec": "linrec", "performer": "performer", "lrurec": "lrurec"}
STREAMING = ["gru4rec", "mamba4rec", "mlsa4rec", "linrec", "performer", "lrurec"]
TOLERANCE = 1e-4
NEEDS_EXTRA = "the onnx extra is not installed (pip install 'mlsa4rec[onnx]')"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _require_extra():
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name, reason=NEEDS_EXTRA)
    return pytest.importorskip("onnxruntime", reason=NEEDS_EXTRA)


@pytest.fixture(scope="module")
def runs() -> dict[str, Path]:
    """One tiny run per model (the causal MLSA4Rec, the one that streams) on string item tokens."""
    _require_extra()
    return {name: tiny_run(key) for name, key in MODELS.items()}


@pytest.fixture(scope="module")
def exports(runs: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out, root = {}, tmp_path_factory.mktemp("exports")
        for name, run in runs.items():
            out[name] = root / name
            export_run(run, out[name])
        return out
    finally:
        torch.set_num_threads(before)


def _session(path: Path):
    ort = _require_extra()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _meta(export: Path) -> dict:
    return json.loads((export / "export.json").read_text())


def _encoder_input(meta: dict, histories: list[list[int]]) -> dict[str, np.ndarray]:
    """The encoder's input as export.json says: trimmed to the longest history, or padded to L."""
    width = meta["encoder"]["inputs"][0]["shape"][1]
    width = max(map(len, histories)) if width == "length" else width
    seq = np.zeros((len(histories), width), dtype=np.int64)
    for row, history in enumerate(histories):
        seq[row, :len(history)] = history
    return {"item_seq": seq, "lengths": np.array([len(h) for h in histories], dtype=np.int64)}


def _initial_state(meta: dict, batch: int) -> dict[str, np.ndarray]:
    return {s["name"]: np.full([batch, *s["shape"][1:]], float(s["initial"]), dtype=s["dtype"])
            for s in meta["step"]["state"]}


def _assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    finite = np.isfinite(expected)
    assert np.array_equal(got[~finite], expected[~finite])  # an empty running log-sum is -inf in both
    assert np.abs(got[finite] - expected[finite]).max(initial=0.0) <= TOLERANCE


# --- no extra needed ---------------------------------------------------------------------------------

def test_the_export_scan_is_the_selective_scan() -> None:
    gen = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 5, 3, 7
    u, delta, z = (torch.randn(b, d, length, generator=gen) for _ in range(3))
    B, C = (torch.randn(b, n, length, generator=gen) for _ in range(2))
    A = -torch.rand(d, n, generator=gen) - 0.1
    D, bias = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    for kwargs in ({}, {"D": D, "z": z, "delta_bias": bias, "delta_softplus": True}):
        with use_implementation("traceable"):  # as export traces: whatever impl= the layer asks for
            assert resolve_impl("cpu", u.device) == "traceable"
            y, last = selective_scan(u, delta, A, B, C, return_last_state=True, impl="cpu", **kwargs)
        y_ref, last_ref = selective_scan_reference(u, delta, A, B, C, return_last_state=True, **kwargs)
        assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(last, last_ref, atol=1e-5)


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_a_missing_onnx_package_is_one_error_naming_the_extra(monkeypatch, capsys, tmp_path: Path,
                                                              missing: str) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    with pytest.raises(MLSA4RecError, match=r"exporting to ONNX needs .* not installed: pip install "
                                            r"'mlsa4rec\[onnx\]'$") as info:
        export_run(tmp_path / "run", tmp_path / "out")
    assert missing in str(info.value).split("needs ")[1].split(",")[0].split(" and ")  # onnxscript needs onnx
    assert main(["export", "--run-dir", str(tmp_path / "run"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: exporting to ONNX needs") and "pip install 'mlsa4rec[onnx]'" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_bad_arguments_are_refused_before_anything_is_loaded(tmp_path: Path) -> None:
    with pytest.raises(MLSA4RecError, match="unknown export format 'tflite'; choose one of onnx"):
        export_run(tmp_path, tmp_path / "out", format="tflite")
    _require_extra()
    for opset in (0, 17, 99, "20", True):  # below 18 the exporter wrote invalid graphs, above its maximum 18
        with pytest.raises(MLSA4RecError, match=r"opset must be a whole number from 18 to \d+"):
            export_run(tmp_path, tmp_path / "out", opset=opset)
    with pytest.raises(MLSA4RecError, match="does not exist; pass the --output-dir of a finished"):
        export_run(tmp_path / "nothing", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- parity with PyTorch -----------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(MODELS))
def test_the_encoder_gives_the_models_scores(runs: dict[str, Path], exports: dict[str, Path], model: str) -> None:
    """Random histories of every length from 1 to L: onnxruntime's user vectors equal forward's, and
    user @ item_table.T the scores serving computes."""
    meta, rec = _meta(exports[model]), Recommender.from_run(runs[model], device="cpu")
    session = _session(exports[model] / "encoder.onnx")
    table = np.load(exports[model] / "item_table.npy")
    rng = np.random.default_rng(0)
    length = meta["model"]["max_length"]
    for lengths in ([length, 1, 3, 5, 2], [1], [3, 2] if meta["encoder"]["inputs"][0]["shape"][1] == "length"
                    else [length, length]):
        histories = [rng.integers(1, rec.items.n_items + 1, n).tolist() for n in lengths]
        feed = _encoder_input(meta, histories)
        (user,) = session.run(["user"], feed)
        with torch.no_grad():
            expected = rec.model(torch.from_numpy(feed["item_seq"]), torch.from_numpy(feed["lengths"])).numpy()
        _assert_close(user, expected)
        scores = user @ table.T
        scores[:, 0] = -np.inf
        _assert_close(scores, rec.scores(histories).numpy())


@pytest.mark.parametrize("model", STREAMING)
def test_the_step_follows_the_models_stream(runs: dict[str, Path], exports: dict[str, Path], model: str) -> None:
    """From the initial state export.json describes, a few events per user with the state fed
    back: every output and state leaf equals model.step's, and the last user vector the encoder's."""
    meta, rec = _meta(exports[model]), Recommender.from_run(runs[model], device="cpu")
    session = _session(exports[model] / "step.onnx")
    batch = 3
    state = rec.model.initial_state(batch)
    feed_state = _initial_state(meta, batch)
    for leaf, name in zip(pytree.tree_leaves(state), feed_state):
        _assert_close(feed_state[name], leaf.numpy())
    rng = np.random.default_rng(1)
    events = rng.integers(1, rec.items.n_items + 1, (6, batch))
    outputs = [o.name for o in session.get_outputs()]
    assert outputs == ["user", *(s["output"] for s in meta["step"]["state"])]
    for items in events:
        got = session.run(None, {"item": items, **feed_state})
        with torch.no_grad():
            user, state = rec.model.step(torch.from_numpy(items), state)
        for a, b in zip(got, [user, *pytree.tree_leaves(state)]):
            _assert_close(a, b.numpy())
        feed_state = dict(zip(feed_state, got[1:]))
    encoder = _session(exports[model] / "encoder.onnx")
    (whole,) = encoder.run(["user"], _encoder_input(meta, events.T.tolist()))
    _assert_close(got[0], whole)


# --- the files -----------------------------------------------------------------------------------------

def test_export_json_describes_the_files(runs: dict[str, Path], exports: dict[str, Path]) -> None:
    for model, export in exports.items():
        meta, rec = _meta(export), Recommender.from_run(runs[model], device="cpu")
        assert meta["kind"] == "mlsa4rec export" and meta["versions"]["mlsa4rec"] == mlsa4rec.__version__
        assert meta["run"]["model"] == model and meta["run"]["settings"]["hidden_size"] == 16
        assert meta["run"]["weights_sha256"] == sha256_file(runs[model] / "model.safetensors")
        streams = model in STREAMING
        expected = {"encoder.onnx", "item_table.npy", "items.json"} | ({"step.onnx"} if streams else set())
        assert set(meta["files"]) == expected
        assert sorted(p.name for p in export.iterdir()) == sorted(expected | {"export.json"})
        for name, entry in meta["files"].items():
            assert entry["sha256"] == sha256_file(export / name) and entry["bytes"] == (export / name).stat().st_size
        assert (export / "items.json").read_bytes() == (runs[model] / "items.json").read_bytes()
        table = np.load(export / "item_table.npy")
        width = rec.model.item_table().shape[1]  # GRU4Rec's embedding_size, not its hidden_size
        assert table.dtype == np.float32 and table.shape == (rec.items.n_items + 1, width)
        assert meta["item_table"]["shape"] == list(table.shape)
        assert np.array_equal(table, rec.model.item_table().detach().numpy())
        assert [i["name"] for i in meta["encoder"]["inputs"]] == ["item_seq", "lengths"]
        assert meta["encoder"]["outputs"] == [{"name": "user", "dtype": "float32", "shape": ["batch", width]}]
        assert meta["encoder"]["onnxruntime_max_abs_diff"] <= TOLERANCE
        session = _session(export / "encoder.onnx")
        assert [i.name for i in session.get_inputs()] == ["item_seq", "lengths"]
        assert [i.shape for i in session.get_inputs()] == [i["shape"] for i in meta["encoder"]["inputs"]]
        if not streams:
            assert "streams is false" in meta["step"]["skipped"]
            continue
        leaves = pytree.tree_leaves(rec.model.initial_state(1))
        state = meta["step"]["state"]
        assert [s["name"] for s in state] == [f"state_{i}" for i in range(len(leaves))]
        assert [s["shape"] for s in state] == [["batch", *leaf.shape[1:]] for leaf in leaves]
        assert [i["name"] for i in meta["step"]["inputs"]] == ["item", *(s["name"] for s in state)]
        assert meta["step"]["onnxruntime_max_abs_diff"] <= TOLERANCE
    # what the length of each encoder ended up as: dynamic where torch.export keeps it so
    shapes = {model: _meta(export)["encoder"]["inputs"][0]["shape"] for model, export in exports.items()}
    assert shapes == {"mlsa4rec": ["batch", 8], **{m: ["batch", "length"] for m in MODELS if m != "mlsa4rec"}}
    causal = _meta(exports["mlsa4rec"])["step"]["state"]
    assert {s["initial"] for s in causal} == {0.0, "-Infinity"}  # the LSA's empty log-sums


def _unused_initializers(graph) -> list[str]:
    """Initializers of ``graph`` and its subgraphs that no node (of it or a subgraph) reads."""
    import onnx

    def subgraphs(g):
        for node in g.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield attribute.g
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    yield from attribute.graphs

    def read(g) -> set[str]:
        names = {o.name for o in g.output}
        for node in g.node:
            names.update(node.input)
        for sub in subgraphs(g):
            names |= read(sub)
        return names

    used = read(graph)
    return [i.name for i in graph.initializer if i.name not in used] + [
        name for sub in subgraphs(graph) for name in _unused_initializers(sub)]


def test_the_graphs_load_without_onnxruntime_warnings(exports: dict[str, Path], capfd) -> None:
    """No constant is left unused: onnxruntime warned "Removing initializer 'val_10_2'. It is not used by
    any node and should be removed from the model" on every load of the Mamba4Rec and causal MLSA4Rec
    encoders."""
    import onnx

    ort = _require_extra()
    capfd.readouterr()
    for model, export in exports.items():
        for graph in sorted(export.glob("*.onnx")):
            assert _unused_initializers(onnx.load(str(graph)).graph) == [], (model, graph.name)
            options = ort.SessionOptions()
            options.log_severity_level = 2  # warnings (onnxruntime's default)
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    err = capfd.readouterr().err
    assert "Removing initializer" not in err and "[W:onnxruntime" not in err, err


def test_an_existing_directory_is_never_clobbered(runs: dict[str, Path], exports: dict[str, Path],
                                                  tmp_path: Path) -> None:
    run = runs["sasrec"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(MLSA4RecError, match="already exists and is not empty; choose another output directory or "
                                            "pass --overwrite"):
        export_run(run, foreign)
    with pytest.raises(MLSA4RecError, match="only replaces an export written by mlsa4rec.*no export.json"):
        export_run(run, foreign, overwrite=True)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    for inside in (run, run / "onnx"):
        with pytest.raises(MLSA4RecError, match="inside the run directory"):
            export_run(run, inside)
    with pytest.raises(MLSA4RecError, match="not a directory"):
        export_run(run, foreign / "notes.txt")
    # an earlier export with a file it did not write is left alone, even with overwrite
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for path in exports["sasrec"].iterdir():
        (earlier / path.name).write_bytes(path.read_bytes())
    (earlier / "extra.bin").write_bytes(b"x")
    with pytest.raises(MLSA4RecError, match="it holds extra.bin, which mlsa4rec export did not write"):
        export_run(run, earlier, overwrite=True)
    assert (earlier / "extra.bin").exists() and not list(tmp_path.glob(".*"))


def test_a_failed_export_leaves_nothing_behind(runs: dict[str, Path], monkeypatch, tmp_path: Path) -> None:
    def fail(stage: Path, *args, **kwargs):
        (stage / "encoder.onnx").write_bytes(b"half")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(export_module, "_write_export", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_run(runs["sasrec"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_export(runs: dict[str, Path], capsys) -> None:
    """Default output beside the run, refusal to write over it, then --overwrite replacing it."""
    run = runs["sasrec"]
    beside = sorted(p.name for p in run.parent.iterdir())
    assert main(["export", "--run-dir", str(run), "--format", "onnx", "-q"]) == 0
    out = run.parent / "sasrec-onnx"
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / name) for name in ("encoder.onnx", "item_table.npy", "items.json", "export.json")]
    first = _meta(out)
    assert main(["export", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output directory") and "pass --overwrite" in err and err.count("\n") == 1
    assert main(["export", "--run-dir", str(run), "--output", str(out), "--overwrite", "-q"]) == 0
    capsys.readouterr()
    assert _meta(out)["files"] == first["files"]  # the same weights give the same files
    assert sorted(p.name for p in run.parent.iterdir()) == sorted([*beside, "sasrec-onnx"])
    assert main(["export", "--run-dir", str(run), "--format", "tflite", "--output", str(out.parent / "x")]) == 2
    assert "unknown export format 'tflite'" in capsys.readouterr().err


def test_the_item_table_is_stored_once_where_the_embedding_is_the_table(runs: dict[str, Path],
                                                                      exports: dict[str, Path]) -> None:
    """Every graph whose item embedding has the table's very bytes reads it from item_table.npy; a
    model whose output table is not its input embedding (BERT4Rec: a mask row and a bias column;
    LRURec: a bias column) keeps its own initializer."""
    import onnx

    for model, export in exports.items():
        rec = Recommender.from_run(runs[model], device="cpu")
        embedding = rec.model.item_embedding.weight.detach().numpy()
        table = rec.model.item_table().detach().numpy()
        same = embedding.shape == table.shape and np.array_equal(embedding, table)
        assert same == (model not in ("bert4rec", "lrurec")), model
        meta = _meta(export)
        graphs = [g for g in ("encoder", "step") if "file" in meta[g]]
        assert meta["item_table"]["read_by"] == ([meta[g]["file"] for g in graphs] if same else [])
        for name in graphs:
            proto = onnx.load(str(export / meta[name]["file"]), load_external_data=False)
            external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
            assert external == (meta[name]["external_data"]["initializers"] if same else []), (model, name)
            assert same == ("external_data" in meta[name])
