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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlsa4rec.layers import Dropout, MambaResidual, MambaState
from mlsa4rec.models.base import SequentialRecommender, normal_init
from mlsa4rec.models.registry import register
from mlsa4rec.settings import ModelConfig, setting


@dataclass(frozen=True)
class Mamba4RecConfig(ModelConfig):
    """The authors' released config (config.yaml of the Mamba4Rec repository)."""

    hidden_size: int = setting(64, "D: item embedding and hidden width")
    num_layers: int = setting(1, "Mamba layers (one: no residual around the block, as released)")
    dropout_prob: float = setting(0.2, "dropout on the embeddings, Mamba's output and inside/after the FFN")
    d_state: int = setting(32, "N: SSM state size per channel")
    d_conv: int = setting(4, "K: causal convolution width")
    expand: int = setting(2, "E: d_inner = E * D")
    initializer_range: float = setting(0.02, "std of the N(0, std) init of Linear and Embedding weights")
    # L=50 is the Amazon setting (ML-1M: 200, see the presets). Causal, so it trains with
    # all-positions windows: 256 windows of a mean ~7 targets on Amazon are about as many targets
    # per step as the released 2048 prefix samples.
    train_defaults = {"MAX_ITEM_LIST_LENGTH": 50, "train_scheme": "all_positions", "train_batch_size": 256,
                      "stopping_step": 10}

    def check(self) -> None:
        self.at_least(1, "num_layers")


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


class MambaLayer(MambaResidual):
    """The Mamba block with dropout, residual (``residual``) and LayerNorm, then the FFN."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dropout: float, residual: bool) -> None:
        super().__init__(d_model, d_state, d_conv, expand, dropout, residual=residual)
        self.ffn = Mamba4RecFeedForward(d_model, 4 * d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(super().forward(x))

    def step(self, x_t: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """``forward`` at one position: x_t (B x D) and the Mamba state -> (B x D, new state)."""
        h, state = super().step(x_t, state)
        return self.ffn(h), state


@register("mamba4rec")
class Mamba4Rec(SequentialRecommender):
    causal = True
    padding_invariant = True
    preferred_scheme = "all_positions"
    streams = True
    config_class = Mamba4RecConfig

    def __init__(self, n_items: int, max_seq_length: int, config: Mamba4RecConfig) -> None:
        super().__init__()
        c = self.config = config
        self.n_items = n_items
        self.max_seq_length = max_seq_length
        self.item_embedding = nn.Embedding(n_items + 1, c.hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=1e-12)
        self.dropout = Dropout(c.dropout_prob)
        self.mamba_layers = nn.ModuleList(
            MambaLayer(c.hidden_size, c.d_state, c.d_conv, c.expand, c.dropout_prob, residual=c.num_layers > 1)
            for _ in range(c.num_layers)
        )
        # The released init: N(0, 0.02) Linear/Embedding weights, every Linear bias 0 (dt_proj's
        # too, so Delta starts at softplus(0) = ln 2), LayerNorm (1, 0); conv1d, A_log, D untouched.
        self.apply(lambda module: normal_init(module, c.initializer_range))

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
