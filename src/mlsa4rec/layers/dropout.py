"""Dropout that draws its mask with ``torch.rand`` instead of ``bernoulli_``.

Same distribution as ``nn.Dropout`` (each element kept with probability 1 - p and scaled by
1 / (1 - p)), but on CPU ``bernoulli_`` is not vectorised: measured here it takes about 2.5x as
long as ``rand_like(x) >= p`` and was a quarter of a SASRec training step at L=200.
"""

from __future__ import annotations

import torch
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    return x * (torch.rand_like(x) >= p) * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """Drop-in for ``nn.Dropout`` (same ``p``, same state dict) with the faster mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, training=self.training)
