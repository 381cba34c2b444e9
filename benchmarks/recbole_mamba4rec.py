"""Mamba4Rec as a RecBole 1.2.1 model, for the parity oracle (``recbole_parity.py --model mamba4rec``).

RecBole has no Mamba4Rec; its authors ship one model file that plugs into RecBole and builds its
block from mamba-ssm, whose kernels need CUDA. This file restates that model from its paper and
released description, independently of ``mlsa4rec.models.mamba4rec``, as a RecBole
``SequentialRecommender`` driven by RecBole's own data, sampler, trainer and evaluator. The one
piece taken from us is the Mamba block (``mlsa4rec.layers.Mamba``: mamba-ssm's parameters and
equations, tested against its reference scan), standing in for ``mamba_ssm.Mamba``:

    H0 = LN(Drop(Emb(s)))                          no positional embedding
    layer: M = LN(Drop(Mamba(X)))                  one layer: no residual (as released)
           M = LN(Drop(Mamba(X)) + X)              more layers
           X = LN(Drop(W2 Drop(GELU(W1 M))) + M)   FFN, inner 4D
    h = X[len - 1];  logits = h . Emb^T            CE over all items

Init as released: N(0, 0.02) for every Linear and Embedding weight (the Mamba block's too), every
Linear bias zero (dt_proj's included), LayerNorm (1, 0).

``Mamba4Rec`` (the RecBole model) exists where ``recbole`` imports: in RecBole's venv, whose worker
puts ``src/`` on the path. ``Mamba4RecNetwork`` needs only torch, so the project's tests check that
it computes what ``mlsa4rec.models.Mamba4Rec`` computes from the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

from mlsa4rec.layers import Mamba


class FeedForward(nn.Module):
    def __init__(self, d_model: int, inner_size: int, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.activation(self.w_1(x)))
        return self.LayerNorm(self.dropout(self.w_2(h)) + x)


class MambaLayer(nn.Module):
    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dropout: float,
                 num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.mamba = Mamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.mamba(x))
        h = self.LayerNorm(h if self.num_layers == 1 else h + x)
        return self.ffn(h)


class Mamba4RecNetwork(nn.Module):
    """Item ids (B x L) -> hidden states (B x L x D); the released modules, names and init."""

    def __init__(self, n_items: int, hidden_size: int, num_layers: int, dropout_prob: float, d_state: int,
                 d_conv: int, expand: int, initializer_range: float) -> None:
        super().__init__()
        self.initializer_range = initializer_range
        self.item_embedding = nn.Embedding(n_items, hidden_size, padding_idx=0)  # row 0: padding
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout_prob)
        self.mamba_layers = nn.ModuleList(
            MambaLayer(hidden_size, d_state, d_conv, expand, dropout_prob, num_layers) for _ in range(num_layers))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        h = self.LayerNorm(self.dropout(self.item_embedding(item_seq)))  # B x L x D
        for layer in self.mamba_layers:
            h = layer(h)
        return h


try:
    from recbole.model.abstract_recommender import SequentialRecommender
except ImportError:  # the project's venv: the network above is tested against ours without RecBole
    SequentialRecommender = None

if SequentialRecommender is not None:

    class Mamba4Rec(SequentialRecommender):
        """The network under RecBole's interface: CE over all items with the tied item table."""

        def __init__(self, config, dataset) -> None:
            super().__init__(config, dataset)
            if config["loss_type"] != "CE":
                raise ValueError("this Mamba4Rec trains with the full softmax (loss_type CE) only")
            self.net = Mamba4RecNetwork(self.n_items, config["hidden_size"], config["num_layers"],
                                        config["dropout_prob"], config["d_state"], config["d_conv"],
                                        config["expand"], config["initializer_range"])
            self.loss_fct = nn.CrossEntropyLoss()

        def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
            return self.gather_indexes(self.net(item_seq), item_seq_len - 1)  # B x D

        def calculate_loss(self, interaction) -> torch.Tensor:
            h = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
            return self.loss_fct(h @ self.net.item_embedding.weight.T, interaction[self.POS_ITEM_ID])

        def predict(self, interaction) -> torch.Tensor:
            h = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
            return (h * self.net.item_embedding(interaction[self.ITEM_ID])).sum(-1)

        def full_sort_predict(self, interaction) -> torch.Tensor:
            h = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
            return h @ self.net.item_embedding.weight.T
