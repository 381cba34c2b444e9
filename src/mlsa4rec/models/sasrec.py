"""SASRec (Kang & McAuley, ICDM 2018) as configured in RecBole 1.2, with full-softmax CE.

    E   = Drop(LN(Emb(s) + PosEmb(0..L-1)))                 learned absolute positions
    H_l = FFN(MHA_causal(H_{l-1}))                          post-LN layers, GELU FFN
    h   = H_n[len - 1];  scores = h . Emb^T                 tied item table
    (similarity = cosine:  scores = (h / |h|) . (Emb / |Emb|)^T / tau)

``similarity: cosine`` is the output head of the SASRec row in HSTU's public tables
(generative-recommenders, ``configs/*/sasrec-*-final.gin``: ``user_embedding_norm = l2_norm``,
``item_l2_norm``, ``temperature = 0.05``): both vectors are l2-normalised (eps 1e-6) and the
cosine is divided by a temperature. Every consumer of scores (the loss, evaluation, serving, the
ONNX export) reads ``encode``/``forward`` and ``item_table``, so the normalisation lives there.

Right padding plus a causal mask means real positions never attend to padding, so masking the
padded keys (as RecBole also does) would change nothing at the positions we read: the model is
causal and padding-invariant, and trains with the all-positions scheme.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlsa4rec.errors import check_choice
from mlsa4rec.layers import Dropout, TransformerLayer
from mlsa4rec.models.base import SequentialRecommender, TransformerConfig, normal_init
from mlsa4rec.models.registry import register
from mlsa4rec.settings import setting

SIMILARITIES = ("dot", "cosine")
L2_EPS = 1e-6  # HSTU's l2_norm_eps


@dataclass(frozen=True)
class SelfAttentionConfig(TransformerConfig):
    """RecBole 1.2's SASRec stack with its attention dropout; BERT4Rec and LightSANs build on it."""

    attn_dropout_prob: float = setting(0.5, "dropout on the attention weights")


@dataclass(frozen=True)
class SASRecConfig(SelfAttentionConfig):
    """RecBole 1.2's SASRec defaults (recbole/properties/model/SASRec.yaml), and its output head."""

    similarity: str = setting("dot", "score of a user vector and an item: dot (RecBole) | cosine (HSTU's SASRec: "
                                     "both l2-normalised, divided by temperature)")
    temperature: float = setting(1.0, "cosine scores are divided by it (HSTU's SASRec: 0.05); cosine only")
    # causal, so it trains with the all-positions scheme; a step holds train_batch_size user
    # windows of up to L targets each, so the step is far below RecBole's 2048 prefix samples to
    # keep as many optimiser steps per epoch
    train_defaults = {"train_scheme": "all_positions", "train_batch_size": 128}

    def check(self) -> None:
        super().check()
        check_choice("similarity", self.similarity, SIMILARITIES)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.similarity == "dot" and self.temperature != 1.0:
            raise ValueError("temperature applies to similarity: cosine only; set similarity=cosine or drop it")


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
        return F.normalize(h, dim=-1, eps=L2_EPS) if self.config.similarity == "cosine" else h

    def item_table(self) -> torch.Tensor:
        """(n_items + 1) x D output table: the input embedding, or for cosine its rows / |row| / tau."""
        if self.config.similarity == "dot":
            return self.item_embedding.weight
        return F.normalize(self.item_embedding.weight, dim=-1, eps=L2_EPS) / self.config.temperature
