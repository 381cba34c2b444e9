"""Stand-ins for a block an ablation removes, so that a model's equations keep one path.

Each takes the removed block's place with the same call and streaming interface and contributes
nothing: ``NoMamba`` adds zeros to its residual (M = H0 once its LayerNorm is an identity),
``NoLSA`` returns a vector with no features, which concatenation then leaves out, and ``Ungated``
passes the gated branch through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class NoMamba(nn.Module):
    """The ablation interaction_mamba=false: the block adds nothing, so M = H0 (with LN1 an identity)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def initial_state(self, batch: int) -> tuple:
        return ()

    def step(self, x_t: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        return torch.zeros_like(x_t), ()


class NoLSA(nn.Module):
    """The ablation use_lsa=false: A has no features, so [A ; G] = G = M and W2 is D x D."""

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return x[..., :0]

    def initial_state(self, batch: int) -> tuple:
        return ()

    def step(self, x_t: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        return x_t[..., :0], ()


class Ungated(nn.Module):
    """The ablation gate_act=none (and any model without the LSA): G = M, whatever A is."""

    def forward(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return m
