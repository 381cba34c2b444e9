"""SASRec (Kang & McAuley, ICDM 2018) as configured in RecBole 1.2, with full-softmax CE.

    E   = Drop(LN(Emb(s) + PosEmb(0..L-1)))                 learned absolute positions
    H_l = FFN(MHA_causal(H_{l-1}))                          post-LN layers, GELU FFN
    h   = H_n[len - 1];  scores = h . Emb^T                 tied item table

Right padding plus a causal mask means real positions never attend to padding, so masking the
padded keys (as RecBole also does) would change nothing at the positions we read: the model is
causal and padding-invariant, and trains with the all-positions scheme.
"""

from __future__ import annotations

import torch
from torch import nn

from mlsa4rec.layers import Dropout, TransformerLayer
from mlsa4rec.models import register
from mlsa4rec.models.base import SequentialRecommender, normal_init


@register("sasrec")
class SASRec(SequentialRecommender):
    causal = True
    padding_invariant = True
    preferred_scheme = "all_positions"

    def __init__(
        self,
        n_items: int,
        max_seq_length: int,
        hidden_size: int,
        n_layers: int,
        n_heads: int,
        inner_size: int,
        hidden_dropout_prob: float,
        attn_dropout_prob: float,
        hidden_act: str,
        layer_norm_eps: float,
        initializer_range: float,
    ) -> None:
        super().__init__()
        for key, value in (("hidden_size", hidden_size), ("n_layers", n_layers), ("n_heads", n_heads),
                           ("inner_size", inner_size), ("max_seq_length", max_seq_length)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by n_heads ({n_heads})")
        self.n_items = n_items
        self.max_seq_length = max_seq_length
        self.item_embedding = nn.Embedding(n_items + 1, hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_seq_length, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = Dropout(hidden_dropout_prob)
        self.layers = nn.ModuleList(
            TransformerLayer(hidden_size, n_heads, inner_size, hidden_dropout_prob, attn_dropout_prob,
                             hidden_act, layer_norm_eps)
            for _ in range(n_layers)
        )
        self.initializer_range = initializer_range
        # RecBole's init: N(0, 0.02) for Linear/Embedding weights, zero biases, LN = (1, 0).
        self.apply(lambda module: normal_init(module, initializer_range))

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.check_length(item_seq)
        positions = torch.arange(item_seq.shape[1], device=item_seq.device)
        h = self.dropout(self.layer_norm(self.item_embedding(item_seq) + self.position_embedding(positions)))
        for layer in self.layers:
            h = layer(h, causal=True)
        return h
