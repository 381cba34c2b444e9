"""GRU4Rec (Hidasi et al., ICLR 2016) as in RecBole 1.2, with full-softmax CE.

    E = Drop(Emb(s));  H = GRU(E) (no biases);  h = Dense(H[len - 1]);  scores = h . Emb^T

The classic RNN baseline. A GRU reads left to right, so with right padding the real positions
never see the padding: causal and padding-invariant, trained with all-positions samples.
"""

from __future__ import annotations

import torch
from torch import nn

from mlsa4rec.layers import Dropout
from mlsa4rec.models import register
from mlsa4rec.models.base import SequentialRecommender


@register("gru4rec")
class GRU4Rec(SequentialRecommender):
    causal = True
    padding_invariant = True
    preferred_scheme = "all_positions"

    def __init__(self, n_items: int, max_seq_length: int, embedding_size: int, hidden_size: int, num_layers: int,
                 dropout_prob: float) -> None:
        super().__init__()
        for key, value in (("embedding_size", embedding_size), ("hidden_size", hidden_size),
                           ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        self.n_items, self.max_seq_length = n_items, max_seq_length
        self.item_embedding = nn.Embedding(n_items + 1, embedding_size, padding_idx=0)
        self.emb_dropout = Dropout(dropout_prob)
        self.gru_layers = nn.GRU(embedding_size, hidden_size, num_layers=num_layers, bias=False, batch_first=True)
        self.dense = nn.Linear(hidden_size, embedding_size)
        # RecBole's init: xavier-normal embedding, xavier-uniform first GRU layer, default Dense
        nn.init.xavier_normal_(self.item_embedding.weight)
        nn.init.xavier_uniform_(self.gru_layers.weight_hh_l0)
        nn.init.xavier_uniform_(self.gru_layers.weight_ih_l0)

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru_layers(self.emb_dropout(self.item_embedding(item_seq)))
        return self.dense(out)
