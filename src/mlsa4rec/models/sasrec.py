"""SASRec (Kang & McAuley, ICDM 2018) as configured in RecBole 1.2, with full-softmax CE.

    E   = Drop(LN(Emb(s) + PosEmb(0..L-1)))                 learned absolute positions
    H_l = FFN(MHA_causal(H_{l-1}))                          post-LN layers, GELU FFN
    h   = H_n[len - 1];  scores = h . Emb^T                 tied item table

Right padding plus a causal mask means real positions never attend to padding, so masking the
padded keys (as RecBole also does) would change nothing at the positions we read: the model is
causal and padding-invariant, and trains with the all-positions scheme.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mlsa4rec.layers import Dropout, TransformerLayer
from mlsa4rec.models import register
from mlsa4rec.models.base import SequentialRecommender, TransformerConfig, normal_init
from mlsa4rec.settings import setting


@dataclass(frozen=True)
class SASRecConfig(TransformerConfig):
    """RecBole 1.2's SASRec defaults (recbole/properties/model/SASRec.yaml)."""

    attn_dropout_prob: float = setting(0.5, "dropout on the attention weights")
    # causal, so it trains with the all-positions scheme; a step holds train_batch_size user
    # windows of up to L targets each, so the step is far below RecBole's 2048 prefix samples to
    # keep as many optimiser steps per epoch
    train_defaults = {"train_scheme": "all_positions", "train_batch_size": 128}


@register("sasrec")
class SASRec(SequentialRecommender):
    causal = True
    padding_invariant = True
    preferred_scheme = "all_positions"
    config_class = SASRecConfig

    def __init__(self, n_items: int, max_seq_length: int, config: SASRecConfig) -> None:
        super().__init__()
        c = self.config = config
        self.n_items = n_items
        self.max_seq_length = max_seq_length
        self.item_embedding = nn.Embedding(n_items + 1, c.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_seq_length, c.hidden_size)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(
            TransformerLayer(c.hidden_size, c.n_heads, c.inner_size, c.hidden_dropout_prob, c.attn_dropout_prob,
                             c.hidden_act, c.layer_norm_eps)
            for _ in range(c.n_layers)
        )
        # RecBole's init: N(0, 0.02) for Linear/Embedding weights, zero biases, LN = (1, 0).
        self.apply(lambda module: normal_init(module, c.initializer_range))

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.check_length(item_seq)
        positions = torch.arange(item_seq.shape[1], device=item_seq.device)
        h = self.dropout(self.layer_norm(self.item_embedding(item_seq) + self.position_embedding(positions)))
        for layer in self.layers:
            h = layer(h, causal=True)
        return h
