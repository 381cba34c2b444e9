"""Bring weights trained with the authors' RecBole code over to our models.

``from_recbole(state_dict, model)`` takes what the released MLSA4Rec or Mamba4Rec code saved
(the RecBole checkpoint dict, or its ``state_dict``) and returns a state dict that ``model``
loads with ``strict=True``, giving identical outputs. Item ids must be the same: our data
pipeline remaps them in RecBole's order (first appearance in the ``.inter`` file), so a model
trained by RecBole on the same file scores the same items.

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
from collections.abc import Mapping

import torch
from torch import nn

from mlsa4rec.errors import MLSA4RecError

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
