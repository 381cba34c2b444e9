"""RecBole interop: its atomic data files in both directions, and the weights its released models save.

Data. ``export_recbole(data, out_dir)`` writes our processed dataset as RecBole's atomic file
``out_dir/NAME/NAME.inter`` (RecBole's layout: ``data_path=out_dir``, ``dataset=NAME``), so that
RecBole trains on exactly our users, items and sequences. Each user's events are written in our
chronological order with ``timestamp`` = the event's position in the user's sequence (1..n): there
are no ties for RecBole's sort to break. Users appear in our user order; tokens are kept as they
are, and ids are remapped on reading by either library. ``import_recbole(path)`` reads RecBole
atomic data (only ``.inter``: the ``.user`` and ``.item`` feature files have no counterpart here)
through the package's own ``.inter`` reader, with our filtering and leave-one-out split. An export
read back with the same filters gives the same users, per-user sequences and split targets
(``same_sequences``).

Weights. ``from_recbole(state_dict, model)`` takes what the released MLSA4Rec or Mamba4Rec code
saved (the RecBole checkpoint dict, or its ``state_dict``) and returns a state dict that ``model``
loads with ``strict=True``, giving identical outputs. Item ids must be the same: our data pipeline
remaps them in RecBole's order (first appearance in the ``.inter`` file), so a model trained by
RecBole on the same file scores the same items. ``mlsa4rec.convert`` re-exports it (its first
home).

Released MLSA4Rec names and ours (``models/mlsa4rec.py``; ``i`` = interaction layer)::

    item_embedding.*, LayerNorm.*                   the same
    models.i.mambas.0.*                             interaction_layers.i.mamba.*
    models.i.LayerNorm1/2/3.*                       interaction_layers.i.LayerNorm1/2/3.*
    models.i.mlp1.*  (gate, on the LSA output)      interaction_layers.i.gate.*
    models.i.mlp2.*  (fusion, 2D -> D)              interaction_layers.i.fuse.*
    models.i.mlp3.*  (skip from H0)                 interaction_layers.i.skip.*
    models.i.trm_encoder.{query,key,value,attpooling_key,attpooling_value,LayerNorm}.*
                                                    interaction_layers.i.lsa.<same>.*
    mamba_layers.j.mamba.*, mamba_layers.j.LayerNorm.*   the same
    dropped (built but never used by the released forward pass): a spare ``mamba.*`` block,
    LightSANs' position branch ``trm_encoder.pos_*`` and output projection ``trm_encoder.dense.*``,
    ``position_embedding.*`` and any feed-forward block.

Mamba4Rec's released names are ours already; they are checked and passed through.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlsa4rec.data import DEFAULT_INTERVAL, SequenceData, detect_format, load_dataset
from mlsa4rec.errors import DataError, MLSA4RecError
from mlsa4rec.fileio import write_text_atomic

__all__ = [
    "INTER_HEADER", "RELEASED_MLSA4REC_SETTINGS", "ConversionError", "export_recbole", "from_recbole",
    "import_recbole", "inter_lines", "inter_path", "same_sequences", "token_sequences",
]

# --- atomic data files ----------------------------------------------------------------------------
INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"


def inter_path(data_path: str | Path, name: str) -> Path:
    """Where RecBole looks for dataset ``name`` under ``data_path``: ``data_path/NAME/NAME.inter``."""
    return Path(data_path) / name / f"{name}.inter"


def _checked_tokens(values: Iterable[object], what: str) -> list[str]:
    """Tokens as text, refusing one that would break the tab-separated format (read back as other data)."""
    tokens = [str(t) for t in values]
    for t in tokens:
        if not t or any(c in t for c in "\t\r\n"):
            raise ValueError(f"{what} token {t!r} cannot be written to a tab-separated atomic file")
    return tokens


def inter_lines(data: SequenceData) -> list[str]:
    """The lines of the RecBole atomic ``.inter`` file of ``data``: header, then every user's events
    in our order (users in our user order), timestamp = position 1..n."""
    users = _checked_tokens(data.user_tokens, "user")
    items = _checked_tokens(data.item_tokens[1:], "item")  # index 0 is the padding placeholder
    lines = [INTER_HEADER]
    offsets, ids = data.offsets, np.asarray(data.items)
    for u, user in enumerate(users):
        seq = ids[offsets[u]:offsets[u + 1]]
        lines.extend(f"{user}\t{items[i - 1]}\t{pos}" for pos, i in enumerate(seq.tolist(), start=1))
    return lines


def export_recbole(data: SequenceData, out_dir: str | Path, name: str | None = None) -> Path:
    """Write ``data`` as ``out_dir/NAME/NAME.inter`` (NAME: ``name``, else the dataset's); returns the file.

    Written to a temporary file and renamed, so a crash never leaves a half file for RecBole to read.
    Read back with the same filters, it gives the same users, per-user sequences and leave-one-out
    targets (tokens are kept, ids are remapped on reading)."""
    path = inter_path(out_dir, name or data.name)
    write_text_atomic(path, "\n".join(inter_lines(data)) + "\n")
    return path


def import_recbole(
    path: str | Path,
    name: str | None = None,
    user_inter_num_interval: str = DEFAULT_INTERVAL,
    item_inter_num_interval: str = DEFAULT_INTERVAL,
    use_cache: bool = True,
    duplicate_events: str = "drop",
) -> SequenceData:
    """RecBole atomic data as our dataset (deduplicated, filtered, remapped, sorted by time).

    ``path`` is a ``.inter`` file, RecBole's dataset folder (``.../NAME`` holding ``NAME.inter``),
    or RecBole's ``data_path`` when ``name`` (its ``dataset``) is given. The filters are RecBole's
    settings of the same names; the defaults are the protocol's 5-core filter, as ``load_dataset``'s.
    """
    folder = Path(path)
    if name is not None:
        file = inter_path(folder, name)
    elif folder.is_dir():
        file = folder / f"{folder.name}.inter"
    else:
        file = folder
    if detect_format(file) != "inter":
        raise DataError(f"{str(file)!r} is not a RecBole atomic .inter file; pass a .inter file, RecBole's dataset "
                        "folder, or its data_path with the dataset name")
    return load_dataset(str(file), None, user_inter_num_interval, item_inter_num_interval, use_cache,
                        duplicate_events)


def token_sequences(data: SequenceData) -> list[list[str]]:
    """Every user's sequence as item tokens (comparable across id remappings)."""
    items = [str(t) for t in data.item_tokens]
    return [[items[i] for i in data.items[data.offsets[u]:data.offsets[u + 1]].tolist()] for u in range(data.n_users)]


def same_sequences(a: SequenceData, b: SequenceData) -> bool:
    """Same users in the same order with the same token sequences (hence the same splits)."""
    return ([str(t) for t in a.user_tokens] == [str(t) for t in b.user_tokens]
            and token_sequences(a) == token_sequences(b))


# --- weights --------------------------------------------------------------------------------------
_MLSA4REC_RULES = [  # (released pattern, our name); the first match wins
    (r"models\.(\d+)\.mambas\.0\.(.+)", r"interaction_layers.\1.mamba.\2"),
    (r"models\.(\d+)\.(LayerNorm[123])\.(.+)", r"interaction_layers.\1.\2.\3"),
    (r"models\.(\d+)\.mlp1\.(?:0\.)?(weight|bias)", r"interaction_layers.\1.gate.\2"),
    (r"models\.(\d+)\.mlp2\.(?:0\.)?(weight|bias)", r"interaction_layers.\1.fuse.\2"),
    (r"models\.(\d+)\.mlp3\.(?:0\.)?(weight|bias)", r"interaction_layers.\1.skip.\2"),
    (r"models\.(\d+)\.trm_encoder\.((?:query|key|value|attpooling_key|attpooling_value|LayerNorm)\..+)",
     r"interaction_layers.\1.lsa.\2"),
    (r"(item_embedding|LayerNorm|mamba_layers\.\d+\.(?:mamba|LayerNorm))\.(.+)", r"\1.\2"),
]
_UNUSED = re.compile(
    r"(?:^|\.)(?:mamba\.|trm_encoder\.pos_|trm_encoder\.dense\.|position_embedding\.|feed_forward\.|ffn\.)"
)


class ConversionError(MLSA4RecError):
    """A state dict that does not fit the model it should be loaded into."""


def _released_names(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        return state_dict["state_dict"]  # a whole RecBole checkpoint
    return state_dict


def _rename_mlsa4rec(name: str) -> str | None:
    """Our name for a released one; None for a weight the released forward pass never uses."""
    if name.startswith("mamba_layers.") and ".mamba." in name:
        pass  # a normalization layer's own block, not the spare one
    elif _UNUSED.search(name):
        return None
    for pattern, target in _MLSA4REC_RULES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    return name  # unknown: reported by the key check below


# settings of our MLSA4Rec that change its outputs without changing any parameter shape: they must
# be the released ones for the converted weights to give the released outputs
RELEASED_MLSA4REC_SETTINGS = {"variant": "faithful", "attn_softmax": "sequence", "gate_act": "gelu",
                              "use_lsa": True, "lsa_input": "mamba", "interaction_mamba": True,
                              "layer_norm_eps": 1e-12}


def from_recbole(state_dict: Mapping[str, torch.Tensor], model: nn.Module, strict: bool = True
                 ) -> dict[str, torch.Tensor]:
    """A state dict for ``model`` (our ``mlsa4rec`` or ``mamba4rec``) from the authors' RecBole weights.

    Raises ``ConversionError`` naming every key or shape that does not fit and, with ``strict``,
    every MLSA4Rec setting that differs from the released model's (so the outputs would differ).
    ``strict=False`` loads the released weights into another configuration of the same shapes,
    e.g. the masked variant, to compare it with the faithful one.
    """
    name = getattr(type(model), "name", type(model).__name__)
    released = _released_names(state_dict)
    if set(released) == set(model.state_dict()):
        renamed = dict(released)  # already in our names
    elif name == "mlsa4rec":
        config = model.config
        settings = {k: config.softmax if k == "attn_softmax" else getattr(config, k)
                    for k in RELEASED_MLSA4REC_SETTINGS}
        differ = [f"{k}={settings[k]!r} (released: {v!r})" for k, v in RELEASED_MLSA4REC_SETTINGS.items()
                  if k in settings and settings[k] != v]
        if strict and differ:
            raise ConversionError("the model would not compute what the released MLSA4Rec computes: "
                                  + ", ".join(differ) + "; build it with the released settings (variant=faithful "
                                  "and the defaults), or pass strict=False to load the weights anyway")
        renamed = {}
        for key, tensor in released.items():
            ours = _rename_mlsa4rec(key)
            if ours is not None:
                renamed[ours] = tensor
    elif name == "mamba4rec":
        renamed = dict(released)
    else:
        raise ConversionError(f"from_recbole converts the released MLSA4Rec and Mamba4Rec weights; "
                              f"got a {name!r} model")
    expected = model.state_dict()
    unknown = sorted(set(renamed) - set(expected))
    missing = sorted(set(expected) - set(renamed))
    shapes = [f"{k}: {tuple(renamed[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
              for k in sorted(set(renamed) & set(expected)) if renamed[k].shape != expected[k].shape]
    problems = []
    if unknown:
        problems.append(f"weights the {name} model has no place for: {', '.join(unknown[:8])}"
                        + (f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""))
    if missing:
        problems.append(f"weights the model needs but the file lacks: {', '.join(missing[:8])}"
                        + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""))
    if shapes:
        problems.append("shapes differ (build the model with the released hyperparameters and the same "
                        "dataset, so that n_items matches): " + "; ".join(shapes[:4]))
    if problems:
        raise ConversionError(f"cannot convert these RecBole weights for {name}: " + ". ".join(problems))
    return {k: renamed[k].detach().clone().to(expected[k].dtype) for k in expected}
