"""Gate health: the values MLSA4Rec's gate takes over a split's users.

The interaction layer's gate is G = LN2(act(W1 A) * M): the LSA's output decides, per channel, how
much of the Mamba branch M passes (``models/mlsa4rec.py``). A gate that saturates (its
pre-activation far into the flat part of ``act``) passes no gradient and no longer adapts to the
user; one near 0 shuts the Mamba branch out. Reviewers of the paper asked which happens, so this
reads, for every user of a split, the gate at the position that scores the user's target (the last
item of the history, as evaluation feeds it), and summarises the values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mlsa4rec.data.dataset import SequenceData
from mlsa4rec.data.sampling import eval_batches

NEAR_ZERO = 0.05  # |act(W1 A)| below this: the gate shuts its channel of M
# where each activation is flat (slope under about 0.01), as (below, above) pre-activations: GELU only
# below (above it is the identity), the sigmoid on both sides
SATURATION = {"gelu": (-3.0, None), "sigmoid": (-4.6, 4.6)}
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
BINS = 60


def gate_values(model: torch.nn.Module, data: SequenceData, split: str, max_seq_length: int,
                batch_size: int = 1024, device: torch.device | str = "cpu") -> list[tuple[np.ndarray, np.ndarray]]:
    """For each interaction layer with a gate, ``(pre, gate)``: W1 A and act(W1 A) at each user's
    last history position, users x D each, the users in the order evaluation scores them (which
    does not matter to a distribution)."""
    layers = getattr(model, "interaction_layers", [])
    gates = [layer.gate for layer in layers if isinstance(layer.gate, torch.nn.Linear)]
    if not gates:
        raise ValueError("this model has no gate (not an MLSA4Rec, or an ablation without one)")
    seen: list[list[torch.Tensor]] = [[] for _ in gates]
    current: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def read(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            a = inputs[0]                                                    # B x L x D
            last = a[torch.arange(a.shape[0], device=a.device), current["lengths"] - 1]
            seen[index].append(F.linear(last, module.weight, module.bias).float().cpu())
        return read

    handles = [g.register_forward_pre_hook(hook(i)) for i, g in enumerate(gates)]
    was_training = model.training
    model.eval()
    trim = bool(getattr(model, "padding_invariant", False))
    try:
        with torch.no_grad():
            for batch in eval_batches(data, split, max_seq_length, batch_size, trim=trim):
                current["lengths"] = batch.lengths.to(device)
                model(batch.item_seq.to(device), current["lengths"])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for gate, parts in zip(gates, seen, strict=True):
        pre = torch.cat(parts)
        out.append((pre.numpy(), gate.act(pre).numpy()))
    return out


def gate_summary(pre: np.ndarray, gate: np.ndarray, act: str = "gelu", bins: np.ndarray | None = None
                 ) -> dict[str, Any]:
    """What a reader needs to judge a gate: its mean and spread, the share of values near 0, the
    share of pre-activations where ``act`` is flat (``SATURATION``: no gradient, the gate no longer
    adapts), quantiles, and a histogram (over ``bins`` edges if given, so that two gates can share
    them)."""
    low, high = SATURATION[act]
    values = gate.ravel().astype(np.float64)
    if bins is None:
        bins = np.linspace(values.min(), values.max(), BINS + 1)
    counts, edges = np.histogram(values, bins=bins)
    return {
        "values": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES), strict=True)},
        "near_zero": float(np.mean(np.abs(values) < NEAR_ZERO)),
        "saturated_low": float(np.mean(pre.ravel() < low)),
        "saturated_high": None if high is None else float(np.mean(pre.ravel() > high)),
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }
