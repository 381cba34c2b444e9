"""Mamba4Rec (Liu et al., arXiv 2403.03900) as in its authors' code, on our Mamba block.

    H0 = LN(Drop(Emb(s)))                                       no positional embedding
    each layer:  M = Mamba(X)
                 M = LN(Drop(M))          if num_layers == 1    (the released code: no residual)
                 M = LN(Drop(M) + X)      otherwise
                 X = LN(Drop(W2(Drop(GELU(W1 M)))) + M)         FFN, inner size 4D
    h  = X[len - 1];  scores = h . Emb^T                        tied item table

Parameter names follow the released code (``mamba_layers.{i}.mamba.*``, ``.LayerNorm``,
``.ffn.w_1/w_2/LayerNorm``), so its state dicts load as they are. Mamba is causal, so with right
padding the real positions never see the padding: the model is causal and padding-invariant and
trains with all-positions samples (one pass per user window instead of one per prefix).

Being causal, it also streams: ``step`` applies the same equations to one event, each Mamba block
advancing its state in O(1). The state is one ``MambaState`` per layer (``layers/mamba.py``):
the last K convolution inputs, B x d_inner x K, and the SSM state, B x d_inner x N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlsa4rec.layers import Dropout, Mamba, MambaState
from mlsa4rec.models import register
from mlsa4rec.models.base import SequentialRecommender, normal_init


class Mamba4RecFeedForward(nn.Module):
    """Mamba4Rec's FFN: GELU, dropout inside and after, residual, LayerNorm."""

    def __init__(self, d_model: int, inner_size: int, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.dropout = Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.w_2(self.dropout(F.gelu(self.w_1(x))))) + x)


class MambaLayer(nn.Module):
    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dropout: float, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.mamba = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.dropout = Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = Mamba4RecFeedForward(d_model, 4 * d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.mamba(x))
        return self.ffn(self.LayerNorm(h + x if self.residual else h))

    def step(self, x_t: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """``forward`` at one position: x_t (B x D) and the Mamba state -> (B x D, new state)."""
        h, state = self.mamba.step(x_t, state)
        h = self.dropout(h)
        return self.ffn(self.LayerNorm(h + x_t if self.residual else h)), state


@register("mamba4rec")
class Mamba4Rec(SequentialRecommender):
    causal = True
    padding_invariant = True
    preferred_scheme = "all_positions"
    streams = True

    def __init__(self, n_items: int, max_seq_length: int, hidden_size: int, num_layers: int, dropout_prob: float,
                 d_state: int, d_conv: int, expand: int, initializer_range: float = 0.02) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.n_items = n_items
        self.max_seq_length = max_seq_length
        self.initializer_range = initializer_range
        self.item_embedding = nn.Embedding(n_items + 1, hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = Dropout(dropout_prob)
        self.mamba_layers = nn.ModuleList(
            MambaLayer(hidden_size, d_state, d_conv, expand, dropout_prob, residual=num_layers > 1)
            for _ in range(num_layers)
        )
        # The released init: N(0, 0.02) Linear/Embedding weights, every Linear bias 0 (dt_proj's
        # too, so Delta starts at softplus(0) = ln 2), LayerNorm (1, 0); conv1d, A_log, D untouched.
        self.apply(lambda module: normal_init(module, initializer_range))

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.LayerNorm(self.dropout(self.item_embedding(item_seq)))
        for layer in self.mamba_layers:
            h = layer(h)
        return h

    # --- streaming: ``encode`` one event at a time ----------------------------------------------
    def initial_state(self, batch: int, device: torch.device | str | None = None) -> list[MambaState]:
        """The state of an empty history for ``batch`` users: one ``MambaState`` per layer."""
        return [layer.mamba.initial_state(batch, device=device) for layer in self.mamba_layers]

    def step(self, items: torch.Tensor, state: list[MambaState]) -> tuple[torch.Tensor, list[MambaState]]:
        """Feed one item per user (B ids); returns the B x D representation after it and the new state.

        ``encode`` at one position: H0 = LN(Drop(Emb(s_t))), then each layer's ``step``.
        """
        h = self.LayerNorm(self.dropout(self.item_embedding(items)))
        new_state = []
        for layer, s in zip(self.mamba_layers, state, strict=True):
            h, s = layer.step(h, s)
            new_state.append(s)
        return h, new_state
