"""Plain-tensor building blocks for the reference transcriptions in the model tests: each test
writes its model's equations with these, reading the weights of the modules it is given."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ln(mod, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with ``mod``'s weight and bias, eps 1e-12 as in every released model here."""
    return F.layer_norm(x, x.shape[-1:], mod.weight, mod.bias, 1e-12)


def lin(mod, x: torch.Tensor) -> torch.Tensor:
    return x @ mod.weight.T + mod.bias


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    e = torch.exp(x - x.max(dim=dim, keepdim=True).values)
    return e / e.sum(dim=dim, keepdim=True)
