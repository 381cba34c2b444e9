"""Export a trained run for serving outside PyTorch: ONNX graphs and the item table.

    mlsa4rec export --run-dir runs/mamba4rec-beauty --format onnx      # -> runs/mamba4rec-beauty-onnx/

writes, into a new directory (never into the run directory, whose manifest lists everything in it)::

    encoder.onnx     item_seq (int64, B x L, right-padded), lengths (int64, B) -> user (float32, B x D):
                     the representation after each history, as ``model.forward`` computes it
    step.onnx        (models that stream: Mamba4Rec, GRU4Rec, the causal MLSA4Rec) item (int64, B) and
                     the state leaves state_0..state_{n-1} -> user (B x D) and new_state_0..: one event
                     per user, at a cost independent of the history's length, as ``model.step``
    item_table.npy   float32, (n_items + 1) x D; row 0 is padding. scores = user @ item_table.T, with
                     column 0 set to -inf, are the scores ``full_sort_scores`` gives. Stored once: a
                     graph whose item embedding is this very table (same bytes) reads it from here,
                     as ONNX external data (location item_table.npy, offset = the .npy header's
                     length), so the directory holds the table once, not three times
    items.json       the run's item map: tokens[i - 1] is the data file's id of model id i
    item_index.usearch (+ .json)  with ``ann='hnsw'`` (``--ann hnsw``): an approximate nearest-neighbour
                     index over the table's rows 1..n (``serving.ann``), for ``serve --ann hnsw
                     --ann-index DIR/item_index.usearch``; its .json says which table it indexes
    export.json      written last: the files with their SHA-256, every input and output with its
                     shape, the state's layout (shape, dtype and initial value of each leaf), the
                     run's model and settings, the versions that wrote it

Both graphs take a dynamic batch. The encoder's length is dynamic (1 to MAX_ITEM_LIST_LENGTH = L)
for padding-invariant models where torch.export keeps it so (SASRec, GRU4Rec, Mamba4Rec, the masked
MLSA4Rec), and fixed to L otherwise: for LightSANs and the faithful MLSA4Rec, whose output depends
on the padding (pad every history to L, as evaluation does), and for the causal MLSA4Rec, whose
chunked running pooling loops over the length in Python (padding to L changes nothing there; its
``step`` graph is the way to serve it). Histories longer than L must be cut to their last L items.
export.json says which, per graph.

The exporter is ``torch.onnx.export(dynamo=True)`` (``torch.export`` plus onnxscript): the
TorchScript one is deprecated and has no translation for ``logaddexp``/``logcumsumexp``, which the
causal LSA uses. Mamba's selective scan normally runs through a compiled numba kernel that cannot
be traced; while a graph is traced, the ops floor's ``traceable`` implementation (the same recurrence
written with ``torch``'s ``scan`` operator) is chosen with ``ops.use_implementation``: it becomes an
ONNX loop over the positions, so the length stays dynamic.

Every graph is checked against the PyTorch model with onnxruntime before the export is published
(when onnxruntime is installed). The export is built in a hidden sibling directory and renamed
into place when complete; ``overwrite`` replaces only a directory that an earlier export wrote
(its ``export.json`` lists every file in it), by the run directory's rules (``runs.directory``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

import mlsa4rec
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.fileio import current_umask, sha256_file
from mlsa4rec.models.base import gather_last
from mlsa4rec.ops import use_implementation
from mlsa4rec.runs.directory import ITEMS, WEIGHTS, Layout, check_output_dir, plain_name, publish_stage

log = logging.getLogger("mlsa4rec")

FORMATS = ("onnx",)
EXPORT_JSON = "export.json"
ENCODER, STEP, ITEM_TABLE = "encoder.onnx", "step.onnx", "item_table.npy"
ITEM_INDEX = "item_index.usearch"
INSTALL_HINT = "pip install 'mlsa4rec[onnx]'"
TOLERANCE = 1e-4  # the self-check's atol and rtol between onnxruntime and PyTorch
_KIND = "mlsa4rec export"
_VERSION = 1
_EXPORT_LOCK = threading.Lock()  # torch.export's state (reset before each graph) is process-wide: one trace at a time


def _q(path: Path) -> str:
    return repr(str(path))


# --- the public entry point --------------------------------------------------------------------

def default_output(run_dir: str | os.PathLike[str], format: str = "onnx") -> Path:
    """Where ``mlsa4rec export`` writes by default: the sibling ``RUN-onnx`` of the run directory."""
    run = Path(run_dir).expanduser().resolve()
    return run.parent / f"{run.name}-{format}"


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], format: str = "onnx",
               opset: int | None = None, overwrite: bool = False, check: bool = True,
               ann: str | None = None) -> list[Path]:
    """Export the finished run ``run_dir`` into the new directory ``out_dir``; returns the files
    written (``export.json`` last). ``opset`` is the ONNX opset (default: the exporter's);
    ``check`` runs each graph in onnxruntime (when installed) against the PyTorch model;
    ``ann='hnsw'`` also writes the approximate index ``item_index.usearch`` (``serving.ann``)."""
    if format not in FORMATS:
        raise MLSA4RecError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    versions = require_onnx()
    if ann not in (None, "hnsw"):
        raise MLSA4RecError(f"ann must be None or 'hnsw' (--ann hnsw), got {ann!r:.40}")
    if ann is not None:
        from mlsa4rec.serving.ann import require_usearch

        require_usearch("the item index (--ann hnsw)")
    if opset is not None:
        low, high = _opset_range()
        if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
            raise MLSA4RecError(f"opset must be a whole number from {low} to {high} (what torch {torch.__version__}'s "
                                f"ONNX exporter writes), got {opset!r}; leave it out for the exporter's default")
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise MLSA4RecError(f"run directory {_q(run)} does not exist; pass the --output-dir of a finished "
                            "`mlsa4rec train`")
    out = _resolve_output(run, Path(out_dir).expanduser())
    check_output_dir(out, overwrite=overwrite, layout=EXPORT)

    from mlsa4rec.serving.recommender import Recommender  # after the cheap checks: it loads torch models

    rec = Recommender.from_run(run, device="cpu")
    model = rec.model.float().eval()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        os.chmod(stage, 0o777 & ~current_umask())
    except OSError as exc:
        raise MLSA4RecError(f"cannot create the export directory {_q(out)}: {exc.strerror}; choose another "
                            "output directory") from None
    try:
        meta = _write_export(stage, rec, model, run, opset, check, versions, ann)
        publish_stage(stage, out, overwrite=overwrite, layout=EXPORT)  # checked again: it may have changed
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("exported %s (%s) to %s", rec.config.model, ", ".join(meta["files"]), out)
    return [out / name for name in meta["files"]] + [out / EXPORT_JSON]


def _opset_range() -> tuple[int, int]:
    """The opsets the dynamo exporter writes: below its translation table's it converts down and
    produced invalid graphs here (17); above its maximum it quietly wrote 18."""
    from torch.onnx import _constants

    return int(getattr(_constants, "TORCHLIB_OPSET", 18)), int(getattr(_constants, "ONNX_MAX_OPSET", 23))


def require_onnx() -> dict[str, str]:
    """The versions of the packages the ONNX export needs, or the error that names the extra."""
    found, missing = {}, []
    for name in ("onnx", "onnxscript"):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            missing.append(name)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MLSA4RecError(f"exporting to ONNX needs {' and '.join(missing)}, which {verb} not installed: "
                            f"{INSTALL_HINT}")
    return found


# --- the output directory ----------------------------------------------------------------------

def _resolve_output(run: Path, given: Path) -> Path:
    if given.is_symlink():
        raise MLSA4RecError(f"output {_q(given)} is a symbolic link; an export directory is created and replaced "
                            "whole, so pass a plain directory path")
    out, run_abs = given.resolve(), run.resolve()
    if out == run_abs or run_abs in out.parents:
        raise MLSA4RecError(f"output {_q(given)} is inside the run directory, whose manifest must list every file "
                            f"in it; choose a directory beside it, e.g. {_q(default_output(run))}")
    here = Path.cwd().resolve()
    if out == here or out in here.parents or out in run_abs.parents:
        raise MLSA4RecError(f"output {_q(given)} holds the working directory or the run; an export directory is "
                            "created and replaced whole, so name a new directory")
    return out


def read_export(path: Path) -> dict[str, Any] | None:
    """The ``export.json`` of ``path`` if it is an export written by mlsa4rec, else None."""
    try:
        meta = json.loads((path / EXPORT_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    files = meta.get("files")
    if meta.get("kind") != _KIND or not isinstance(files, dict) or not all(
            plain_name(n, EXPORT_JSON) for n in files):  # it steers deletion: no name may leave the directory
        return None
    return meta


# what --overwrite may replace, and how its refusals read (the rules are the run directory's)
EXPORT = Layout(listing=EXPORT_JSON, read=read_export,
                unlisted=lambda out: f"it has no {EXPORT_JSON} written by mlsa4rec export", noun="export",
                article="an", writer="mlsa4rec export", output="output", choose="output directory")


# --- writing the files -------------------------------------------------------------------------

def _write_export(stage: Path, rec, model: nn.Module, run: Path, opset: int | None, check: bool,
                  versions: dict[str, str], ann: str | None = None) -> dict[str, Any]:
    config = rec.config
    max_seq_length = config.train.max_seq_length
    table = np.ascontiguousarray(model.item_table().detach().float().cpu().numpy(), dtype="<f4")  # ONNX's byte order
    graphs: dict[str, Any] = {}
    graphs["encoder"] = _graph_or_skip("encoder", stage / ENCODER,
                                       lambda: _export_encoder(model, stage / ENCODER, max_seq_length, opset))
    if model.streams:
        graphs["step"] = _graph_or_skip("step", stage / STEP, lambda: _export_step(model, stage / STEP, opset))
    else:
        graphs["step"] = {"skipped": f"{config.model} re-encodes its history (model.streams is false); use the "
                                     "encoder"}
    if not any("file" in g for g in graphs.values()):
        raise RuntimeError(f"no graph of {config.model} could be exported to ONNX: "
                           + "; ".join(f"{k}: {g['skipped']}" for k, g in graphs.items()))
    np.save(stage / ITEM_TABLE, table, allow_pickle=False)
    offset = _npy_payload(stage / ITEM_TABLE, table)
    for graph in graphs.values():
        if "file" in graph:
            shared = _share_table(stage / graph["file"], table, offset)
            if shared:
                graph["external_data"] = {"file": ITEM_TABLE, "offset": offset, "length": table.nbytes,
                                          "initializers": shared}
    if check:  # the graphs as published: reading the shared table from item_table.npy
        for name, diff in _self_check(stage, model, graphs, max_seq_length, rec.items.n_items).items():
            graphs[name]["onnxruntime_max_abs_diff"] = diff
    index = None
    if ann is not None:
        from mlsa4rec.serving.ann import ItemIndex

        index = ItemIndex.build(torch.from_numpy(table))
        index.save(stage / ITEM_INDEX)
    if (run / ITEMS).is_file():  # the run's own file, byte for byte (from_run has checked it)
        shutil.copyfile(run / ITEMS, stage / ITEMS)
    else:  # a run written before items.json: the map rebuilt from its data
        (stage / ITEMS).write_text(json.dumps(rec.items.to_json()) + "\n", encoding="utf-8")

    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(stage.iterdir())}
    opsets = sorted({g["opset"] for g in graphs.values() if "opset" in g})
    meta = {
        "kind": _KIND, "version": _VERSION, "format": "onnx",
        "versions": {"mlsa4rec": mlsa4rec.__version__, "torch": torch.__version__, **versions},
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": opsets[0] if len(opsets) == 1 else opsets,
        "run": {"dir": str(run.resolve()), "model": config.model, "dataset": config.dataset,
                "weights_sha256": sha256_file(run / WEIGHTS) if (run / WEIGHTS).is_file() else None,
                "settings": {"MAX_ITEM_LIST_LENGTH": max_seq_length, **config.model_kwargs()}},
        "model": {"n_items": rec.items.n_items, "hidden_size": int(table.shape[1]), "max_length": max_seq_length,
                  "causal": bool(model.causal), "padding_invariant": bool(model.padding_invariant),
                  "streams": bool(model.streams)},
        "files": files,
        **graphs,
        "item_table": {"file": ITEM_TABLE, "dtype": "float32", "shape": list(table.shape), "padding_row": 0,
                       "scores": "user @ item_table.T, with column 0 (padding) set to -inf",
                       "read_by": [g["file"] for g in graphs.values() if "external_data" in g],
                       "note": "graphs listed in read_by take their item embedding from this file (ONNX external "
                               "data at the .npy header's end): keep it beside them"},
        "items": {"file": ITEMS, "note": "tokens[i - 1] is the data file's id of model id i; train_counts the "
                                         "training events of each item"},
        **({} if index is None else {"item_index": {
            "file": ITEM_INDEX, "info": f"{ITEM_INDEX}.json", **{k: index.info[k] for k in (
                "library", "version", "metric", "dtype", "connectivity", "expansion_add")},
            "note": "approximate nearest neighbours of a user vector among rows 1..n of the item table (inner "
                    f"product): mlsa4rec serve --ann hnsw --ann-index DIR/{ITEM_INDEX}"}}),
    }
    (stage / EXPORT_JSON).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    return meta


def _graph_or_skip(name: str, path: Path, export) -> dict[str, Any]:
    """Export one graph; a model the exporter cannot trace skips it, said in export.json and the log."""
    try:
        return export()
    except Exception as exc:  # torch.export / onnxscript failures: the graph is left out, with why
        for leftover in (path, path.with_name(path.name + ".data")):
            leftover.unlink(missing_ok=True)
        reason = _reason(exc)
        log.warning("export: the %s graph was left out: %s", name, reason)
        return {"skipped": reason}


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = exc.__cause__
    while cause is not None and not lines:
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        cause = cause.__cause__
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


# --- the graphs ---------------------------------------------------------------------------------

class _Encoder(nn.Module):
    """``forward`` of every model: the representation at each row's last real position. (The
    faithful MLSA4Rec's ``forward`` groups rows by length to skip padding, which does not trace;
    this is the same numbers, as its tests check.)"""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.model.forward_traces:
            return self.model(item_seq, lengths)
        return gather_last(self.model.encode(item_seq, lengths), lengths)


class _Step(nn.Module):
    """``model.step`` with the state flattened into its tensor leaves, in and out."""

    def __init__(self, model: nn.Module, spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, item: torch.Tensor, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        user, state = self.model.step(item, pytree.tree_unflatten(list(leaves), self.spec))
        return (user, *pytree.tree_leaves(state))


def _tensor_info(name: str, dtype: str, shape: list) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


def _export_encoder(model: nn.Module, path: Path, max_seq_length: int, opset: int | None) -> dict[str, Any]:
    invariant = bool(model.padding_invariant)
    # an example that is neither 0 nor 1 in a dynamic dimension (torch.export specialises those)
    item_seq = torch.zeros(2, max_seq_length, dtype=torch.long)
    item_seq[:, 0] = 1
    item_seq[0] = torch.arange(max_seq_length) % model.n_items + 1
    lengths = torch.tensor([max_seq_length, 1])
    batch = torch.export.Dim("batch", min=1)
    dims: list[dict[int, Any]] = [{0: batch}, {0: batch}]
    if invariant and max_seq_length > 1:
        dims[0][1] = torch.export.Dim("length", min=1, max=max_seq_length)
    opset_used, shapes = _onnx_export(_Encoder(model).eval(), (item_seq, lengths), path, ["item_seq", "lengths"],
                                      ["user"], dims, opset)
    _require_dynamic_batch(shapes, ["item_seq", "lengths"])
    dynamic = isinstance(shapes["item_seq"][1], str)
    if dynamic:
        length = (f"dynamic, 1 to {max_seq_length}: the last items of each history (at most {max_seq_length}), "
                  "right-padded with 0 to the longest in the batch")
    elif invariant:
        length = (f"fixed at {max_seq_length} (torch.export could not keep it dynamic for this model): right-pad "
                  f"every history with 0 to {max_seq_length} items; the padding does not change the output")
    else:
        length = (f"fixed at {max_seq_length}: right-pad every history with 0 to {max_seq_length} items, as evaluation "
                  "does (this model's output depends on the padding)")
    return {
        "file": path.name, "opset": opset_used,
        "inputs": [_tensor_info("item_seq", "int64", ["batch", "length" if dynamic else max_seq_length]),
                   _tensor_info("lengths", "int64", ["batch"])],
        "outputs": [_tensor_info("user", "float32", ["batch", _width(model)])],
        "length": length,
        "note": "item_seq holds model ids 1..n_items (items.json maps them) and 0 for padding; lengths[b] is the "
                "number of real items of row b (at least 1)",
    }


def _width(model: nn.Module) -> int:
    return int(model.item_table().shape[1])


def _leaf_fill(leaf: torch.Tensor) -> float | str | None:
    """The one value every element of an initial state leaf holds, or None. JSON has no infinities:
    those are the strings "-Infinity" and "Infinity" (which float() and JavaScript's Number() read)."""
    values = leaf.reshape(-1)
    if values.numel() == 0 or not bool((values == values[0]).all()):
        return None
    value = float(values[0])
    return value if np.isfinite(value) else ("-Infinity" if value < 0 else "Infinity")


def _export_step(model: nn.Module, path: Path, opset: int | None) -> dict[str, Any]:
    initial = model.initial_state(2)
    flat, spec = pytree.tree_flatten_with_path(initial)
    leaves = [leaf for _, leaf in flat]
    if not all(isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 for leaf in leaves):
        raise RuntimeError("the streaming state has a leaf that is not a batch-first tensor")
    names = [f"state_{i}" for i in range(len(leaves))]
    batch = torch.export.Dim("batch", min=1)
    items = torch.tensor([1, min(2, model.n_items)])
    opset_used, shapes = _onnx_export(_Step(model, spec).eval(), (items, *leaves), path, ["item", *names],
                                      ["user", *(f"new_{n}" for n in names)], [{0: batch}] * (1 + len(leaves)),
                                      opset)
    _require_dynamic_batch(shapes, ["item", *names])
    state = []
    for name, (key, leaf) in zip(names, flat):
        entry = {"name": name, "output": f"new_{name}", "path": pytree.keystr(key), "dtype": _dtype(leaf),
                 "shape": ["batch", *leaf.shape[1:]]}
        fill = _leaf_fill(leaf)
        if fill is None:
            raise RuntimeError(f"the initial state leaf {pytree.keystr(key)} is not one repeated value")
        entry["initial"] = fill
        state.append(entry)
    return {
        "file": path.name, "opset": opset_used,
        "inputs": [_tensor_info("item", "int64", ["batch"]),
                   *(_tensor_info(s["name"], s["dtype"], s["shape"]) for s in state)],
        "outputs": [_tensor_info("user", "float32", ["batch", _width(model)]),
                    *(_tensor_info(s["output"], s["dtype"], s["shape"]) for s in state)],
        "state": state,
        "stream_limit": getattr(model, "stream_limit", None),
        "note": ("start a user from the initial state (every leaf filled with its 'initial' value, for batch 1), "
                 "feed one model id per event and keep new_state_i as the next state_i; 'user' after an event "
                 "equals the encoder on the whole history up to it. A model with a stream_limit (learned "
                 "positions) takes at most that many events: past it, run the encoder on the last "
                 "MAX_ITEM_LIST_LENGTH events instead"),
    }


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _onnx_export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                 dims: list[dict[int, Any]], opset: int | None) -> tuple[int, dict[str, list[int | str]]]:
    """``torch.onnx.export`` with the dynamo exporter, quietly. ``dims`` gives each input's dynamic
    dimensions ({axis: torch.export.Dim}). Returns the graph's opset and its input shapes (a name
    for a dynamic dimension, a number for a fixed one).

    Where torch.export refuses a dynamic dimension, the exporter fixes it to the example's size
    (its "suggested fix") without a word: the caller checks the shapes returned."""
    import onnx

    # _Step's inputs after the first are its *leaves, which torch.export wants as one tuple
    dynamic_shapes = (dims[0], tuple(dims[1:])) if isinstance(module, _Step) else tuple(dims)
    with _EXPORT_LOCK, _quiet_exporter(), use_implementation("traceable"), torch.no_grad():
        # torch.export keeps traces between calls: after a graph with a fixed length, another with a
        # dynamic one came out fixed too. Each graph starts afresh.
        torch._dynamo.reset()
        program = torch.onnx.export(module, args, dynamo=True, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, opset_version=opset, external_data=False,
                                    verbose=False, optimize=True)
    _drop_unused_initializers(program.model)
    program.save(str(path), external_data=_too_big_for_one_file(module))
    graph = onnx.load(str(path), load_external_data=False)
    shapes = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in graph.graph.input}
    missing = [name for name in input_names if name not in shapes]
    if missing:
        raise RuntimeError(f"the exported graph lacks the input(s) {', '.join(missing)}")
    opset_used = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    return opset_used, shapes


def _npy_payload(path: Path, table: np.ndarray) -> int:
    """Where the raw little-endian C-order float32 bytes of the .npy file ``path`` begin (its header's length)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran or dtype != np.dtype("<f4") or tuple(shape) != table.shape or \
            path.stat().st_size - offset != table.nbytes:
        raise RuntimeError(f"{path.name} is not the raw float32 table its header should describe")
    return offset


def _graph_initializers(graph: Any) -> Iterator[Any]:
    """The initializers of ``graph`` and of every subgraph (a Scan's, a Loop's body)."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graph_initializers(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _graph_initializers(sub)


def _share_table(path: Path, table: np.ndarray, offset: int) -> list[str]:
    """Point every initializer of the graph ``path`` whose bytes are the item table's (compared, not
    guessed from names: BERT4Rec's embedding has a mask row and no bias column, so it keeps its own)
    at ``item_table.npy`` as ONNX external data, and rewrite the graph without them. A graph over
    2 GB (its weights in ``path.data``, ``_too_big_for_one_file``) is written back the same way,
    its ``.data`` without the table. Returns the names of the initializers now shared."""
    import onnx
    from onnx.external_data_helper import set_external_data

    data = path.with_name(path.name + ".data")
    split = data.exists()
    proto = onnx.load(str(path), load_external_data=True)
    raw, dims = memoryview(table).cast("B"), list(table.shape)
    shared = []
    for tensor in _graph_initializers(proto.graph):
        if tensor.data_type == onnx.TensorProto.FLOAT and list(tensor.dims) == dims and \
                tensor.HasField("raw_data") and raw == tensor.raw_data:
            set_external_data(tensor, ITEM_TABLE, offset=offset, length=table.nbytes)
            tensor.ClearField("raw_data")
            shared.append(tensor.name)
    if not shared:
        return []
    if split:  # the other weights are in memory now: written again, into a new .data file
        data.unlink()
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return shared


def _drop_unused_initializers(model: Any) -> None:
    """Remove the constants no node reads (the optimiser leaves one beside the Mamba scan):
    onnxruntime warns "Removing initializer ..." on every load of a graph that has them. The test
    checks subgraphs too, where none is left today."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)


def _require_dynamic_batch(shapes: dict[str, list[int | str]], names: list[str]) -> None:
    fixed = [name for name in names if not shapes[name] or not isinstance(shapes[name][0], str)]
    if fixed:
        raise RuntimeError(f"the exporter fixed the batch size of {', '.join(fixed)}")


def _too_big_for_one_file(module: nn.Module) -> bool:
    """A protobuf holds at most 2 GiB; beyond it the weights go to a ``.data`` file beside the graph."""
    return sum(p.numel() * p.element_size() for p in module.parameters()) > 1_800_000_000


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's warnings (torchvision not installed, deprecated pytree classes) are not the user's."""
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# --- the self-check -----------------------------------------------------------------------------

def _self_check(stage: Path, model: nn.Module, graphs: dict[str, Any], max_seq_length: int,
                n_items: int) -> dict[str, float]:
    """Run each exported graph in onnxruntime on random inputs and compare with PyTorch."""
    try:
        import onnxruntime
    except ImportError:
        log.warning("export: onnxruntime is not installed, so the graphs were not checked (%s)", INSTALL_HINT)
        return {}
    rng = torch.Generator().manual_seed(0)
    diffs: dict[str, float] = {}
    failed: dict[str, bool] = {}
    if "file" in graphs["encoder"]:
        session = _ort_session(onnxruntime, stage / ENCODER, graphs["encoder"]["opset"])
        dynamic = graphs["encoder"]["inputs"][0]["shape"][1] == "length"
        worst, close = 0.0, True
        for batch, width in ((3, max_seq_length), (1, max(1, max_seq_length // 2) if dynamic else max_seq_length)):
            lengths = torch.randint(1, width + 1, (batch,), generator=rng)
            lengths[0] = width
            seq = torch.randint(1, n_items + 1, (batch, width), generator=rng)
            seq[torch.arange(width)[None, :] >= lengths[:, None]] = 0
            with torch.no_grad():
                expected = model(seq, lengths).float().numpy()
            got = session.run(["user"], {"item_seq": seq.numpy(), "lengths": lengths.numpy()})[0]
            worst, close = max(worst, _max_diff(got, expected)), close and _close(got, expected)
        diffs["encoder"], failed["encoder"] = worst, not close
    if "file" in graphs.get("step", {}):
        session = _ort_session(onnxruntime, stage / STEP, graphs["step"]["opset"])
        names = [s["name"] for s in graphs["step"]["state"]]
        state = model.initial_state(2)
        feed_state = [leaf.numpy() for leaf in pytree.tree_leaves(state)]
        worst, close = 0.0, True
        for _ in range(3):
            items = torch.randint(1, n_items + 1, (2,), generator=rng)
            with torch.no_grad():
                user, state = model.step(items, state)
            got = session.run(None, {"item": items.numpy(), **dict(zip(names, feed_state))})
            feed_state = got[1:]
            for a, b in zip(got, [user, *pytree.tree_leaves(state)]):
                worst, close = max(worst, _max_diff(a, b.numpy())), close and _close(a, b.numpy())
        diffs["step"], failed["step"] = worst, not close
    for name, worst in diffs.items():
        if failed[name]:
            raise RuntimeError(f"the exported {name} graph differs from the PyTorch model in onnxruntime by up to "
                               f"{worst:.3g} (tolerance {TOLERANCE}); this is a bug in the export, please report it")
    return diffs


def _ort_session(onnxruntime, path: Path, opset: int):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # an opset or operator this onnxruntime does not have
        raise MLSA4RecError(f"onnxruntime {onnxruntime.__version__} cannot load the exported {path.name} (opset "
                            f"{opset}): {_reason(exc)}; upgrade onnxruntime or pass a lower --opset") from None


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """The largest absolute difference; equal infinities (an empty running log-sum) count as 0."""
    if a.shape != b.shape:
        return float("inf")
    with np.errstate(invalid="ignore"):
        return float(np.where(a == b, 0.0, np.abs(a - b)).max(initial=0.0))


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE))
