"""GRU4Rec (Hidasi et al., ICLR 2016) as in RecBole 1.2, with full-softmax CE.

    E = Drop(Emb(s));  H = GRU(E) (no biases);  h = Dense(H[len - 1]);  scores = h . Emb^T

The classic RNN baseline. A GRU reads left to right, so with right padding the real positions
never see the padding: causal and padding-invariant, trained with all-positions samples.

It streams: ``step`` advances the GRU by one event, h_t = GRU(Drop(Emb(s_t)), h_{t-1}), and
returns Dense(h_t). The state is the hidden state of every GRU layer, stored batch-first
(B x num_layers x H, where ``nn.GRU`` takes num_layers x B x H) like every streaming state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mlsa4rec.layers import Dropout
from mlsa4rec.models.base import SequentialRecommender
from mlsa4rec.models.registry import register
from mlsa4rec.settings import ModelConfig, setting


@dataclass(frozen=True)
class GRU4RecConfig(ModelConfig):
    """RecBole 1.2's GRU4Rec defaults (recbole/properties/model/GRU4Rec.yaml)."""

    embedding_size: int = setting(64, "item embedding width (the scores' width too)")
    hidden_size: int = setting(128, "GRU state width")
    num_layers: int = setting(1, "stacked GRU layers")
    dropout_prob: float = setting(0.3, "dropout on the item embeddings")
    # causal, so all-positions windows (as Mamba4Rec)
    train_defaults = {"train_scheme": "all_positions", "train_batch_size": 256}

    def check(self) -> None:
        self.at_least(1, "embedding_size", "hidden_size", "num_layers")


@register("gru4rec")
class GRU4Rec(SequentialRecommender):
    causal = True
    padding_invariant = True
    preferred_scheme = "all_positions"
    streams = True
    config_class = GRU4RecConfig

    def __init__(self, n_items: int, max_seq_length: int, config: GRU4RecConfig) -> None:
        super().__init__()
        c = self.config = config
        self.n_items = n_items
        self.max_seq_length = max_seq_length
        self.item_embedding = nn.Embedding(n_items + 1, c.embedding_size, padding_idx=0)
        self.emb_dropout = Dropout(c.dropout_prob)
        self.gru_layers = nn.GRU(c.embedding_size, c.hidden_size, num_layers=c.num_layers, bias=False, batch_first=True)
        self.dense = nn.Linear(c.hidden_size, c.embedding_size)
        # RecBole's init: xavier-normal embedding, xavier-uniform first GRU layer, default Dense
        nn.init.xavier_normal_(self.item_embedding.weight)
        nn.init.xavier_uniform_(self.gru_layers.weight_hh_l0)
        nn.init.xavier_uniform_(self.gru_layers.weight_ih_l0)

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru_layers(self.emb_dropout(self.item_embedding(item_seq)))
        return self.dense(out)

    # --- streaming: ``encode`` one event at a time ----------------------------------------------
    def initial_state(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The state of an empty history for ``batch`` users: zeros, B x num_layers x H."""
        w = self.gru_layers.weight_hh_l0
        return w.new_zeros(batch, self.gru_layers.num_layers, self.gru_layers.hidden_size, device=device)

    def step(self, items: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one item per user (B ids); returns the B x D representation after it and the new state."""
        if state.shape[0] != items.shape[0]:
            raise ValueError(f"the state holds {state.shape[0]} sequences but the input has {items.shape[0]}; "
                             "build it with initial_state(batch) for this batch")
        x = self.emb_dropout(self.item_embedding(items))
        out, hidden = self.gru_layers(x[:, None], state.transpose(0, 1).contiguous())
        return self.dense(out[:, 0]), hidden.transpose(0, 1).contiguous()
