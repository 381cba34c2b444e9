"""BERT4Rec (Sun et al., CIKM 2019) as in RecBole 1.2.1, with full-softmax CE.

    E   = Drop(LN(Emb(s) + PosEmb(0..L-1)))                 s may hold the mask token [M]
    H_l = FFN(MHA_bidirectional(H_{l-1}))                   post-LN layers, keys at padding masked
    O   = LN(GELU(W_o H_n + b_o))                           the output head
    scores_t = O_t . Emb[1..N]^T + bias                     tied item table plus a bias per item

Training is the cloze task (``train_scheme: cloze``, ``data/sampling.py``): items of each training
history are replaced by [M] and predicted from both sides. Prediction appends [M] after the history
and scores the items at its position, so the last L - 1 items are read when the history is L long.

The bias is folded into the item table so that every consumer scores with one product: the user
vector carries a constant 1 as its last feature and ``item_table`` has the bias as its last column,
so ``[O_t, 1] . [Emb_i, bias_i] = O_t . Emb_i + bias_i``. The mask token has a row of ``Emb`` (the
last, ``n_items + 1``) but is never scored.

Departures from RecBole 1.2.1 (``recbole/model/sequential_recommender/bert4rec.py``):

* at prediction RecBole writes [M] after the history in a tensor one wider and then drops its first
  column (``reconstruct_test_data``), which drops the oldest item of *every* history, also those
  short enough for [M] to fit. Here only a history of L items loses its oldest; set
  ``recbole_eval_shift: true`` for RecBole's behaviour.
* the loss classes are the real items 1..N as for every model here; RecBole's CE also has a
  column for the padding id, which is never a target.
* keys past each row's length get -inf before the softmax, where RecBole adds -10000 at padding
  ids: the same after rounding, and ids past the length are ignored whatever they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlsa4rec.layers import Dropout, TransformerLayer
from mlsa4rec.models.base import SequentialRecommender, gather_last, normal_init
from mlsa4rec.models.registry import register
from mlsa4rec.models.sasrec import SelfAttentionConfig
from mlsa4rec.settings import setting


@dataclass(frozen=True)
class BERT4RecConfig(SelfAttentionConfig):
    """RecBole 1.2's BERT4Rec defaults (recbole/properties/model/BERT4Rec.yaml): SASRec's keys plus the cloze task's."""

    hidden_dropout_prob: float = setting(0.2, "dropout on the embeddings, after the attention's output projection "
                                              "and the FFN")
    attn_dropout_prob: float = setting(0.2, "dropout on the attention weights")
    mask_ratio: float = setting(0.2, "cloze: each history item is masked with this probability; the last "
                                     "int(mask_ratio * L) masked positions of a sample are its targets")
    ft_ratio: float = setting(0.5, "cloze: the share of batches whose only mask is the last history item")
    recbole_eval_shift: bool = setting(False, "true: drop every history's oldest item at prediction, as RecBole "
                                              "1.2.1 does")
    # cloze training on RecBole's prefix-sample histories, 2048 per step
    train_defaults = {"train_scheme": "cloze", "train_batch_size": 2048}

    def check(self) -> None:
        super().check()
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0 <= self.ft_ratio <= 1:
            raise ValueError(f"ft_ratio must be in [0, 1], got {self.ft_ratio}")


@register("bert4rec")
class BERT4Rec(SequentialRecommender):
    causal = False
    padding_invariant = True      # right padding, and keys at padding are masked
    preferred_scheme = "cloze"
    cloze = True

    config_class = BERT4RecConfig

    def __init__(self, n_items: int, max_seq_length: int, config: BERT4RecConfig) -> None:
        super().__init__()
        c = self.config = config
        if int(c.mask_ratio * max_seq_length) < 1:
            raise ValueError(f"mask_ratio must be in (0, 1) with mask_ratio * MAX_ITEM_LIST_LENGTH >= 1 (the "
                             f"targets kept per sample); got {c.mask_ratio} with L = {max_seq_length}")
        self.n_items = n_items
        self.max_seq_length = max_seq_length
        self.mask_token = n_items + 1
        self.mask_ratio = c.mask_ratio
        self.ft_ratio = c.ft_ratio
        self.recbole_eval_shift = c.recbole_eval_shift
        self.item_embedding = nn.Embedding(n_items + 2, c.hidden_size, padding_idx=0)  # last row: [M]
        self.position_embedding = nn.Embedding(max_seq_length, c.hidden_size)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(
            TransformerLayer(c.hidden_size, c.n_heads, c.inner_size, c.hidden_dropout_prob, c.attn_dropout_prob,
                             c.hidden_act, c.layer_norm_eps)
            for _ in range(c.n_layers)
        )
        self.output_dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.output_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.output_bias = nn.Parameter(torch.zeros(n_items + 1))
        self.apply(lambda module: normal_init(module, c.initializer_range))

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """B x L x (D + 1): O at every position, with the constant 1 that meets the bias column."""
        self.check_length(item_seq)
        positions = torch.arange(item_seq.shape[1], device=item_seq.device)
        h = self.dropout(self.layer_norm(self.item_embedding(item_seq) + self.position_embedding(positions)))
        keys = (positions[None, :] < lengths[:, None])[:, None, None, :]          # B x 1 x 1 x L: real keys
        for layer in self.layers:
            h = layer(h, causal=False, mask=keys)
        out = self.output_norm(F.gelu(self.output_dense(h)))                      # B x L x D
        return torch.cat([out, out.new_ones(out.shape[:-1] + (1,))], dim=-1)

    def forward(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """B x (D + 1): the output at a mask token appended after each history."""
        seq, lengths = self.append_mask(item_seq, lengths)
        return gather_last(self.encode(seq, lengths), lengths)

    def append_mask(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each history followed by [M], at most L wide: a history that would not fit (or every
        history, with ``recbole_eval_shift``) loses its oldest item."""
        batch, width = item_seq.shape
        padded = torch.cat([item_seq, item_seq.new_zeros(batch, 1)], dim=1)               # B x (W + 1)
        padded[torch.arange(batch, device=item_seq.device), lengths] = self.mask_token
        if self.recbole_eval_shift:
            shift = torch.ones_like(lengths)
        else:
            shift = (lengths + 1 > self.max_seq_length).long()
        new_width = min(width + 1, self.max_seq_length) if not self.recbole_eval_shift else width
        index = (torch.arange(new_width, device=item_seq.device)[None, :] + shift[:, None]).clamp(max=width)
        return padded.gather(1, index), lengths + 1 - shift

    def item_table(self) -> torch.Tensor:
        """(n_items + 1) x (D + 1): the item embeddings (without [M]) and the bias as last column."""
        return torch.cat([self.item_embedding.weight[:self.n_items + 1], self.output_bias[:, None]], dim=1)
