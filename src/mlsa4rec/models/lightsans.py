"""LightSANs (Fan et al., SIGIR 2021) as in RecBole 1.2: low-rank attention, decoupled positions.

    E   = Drop(LN(Emb(s)))                                  no position added to the items
    each layer:
        C_item = softmax_L(Q K~^T / sqrt(d_h)) V~           item-to-interest attention (layers/lsa.py)
        P^     = LN_p(PosEmb(0..L-1))
        C_pos  = softmax_L((P^ Wq_p)(P^ Wk_p)^T / (sqrt(2 d_h) sqrt(d_h))) V    decoupled positions,
                                                                           un-pooled V, shared by the batch
        H      = LN(Drop(Dense(C_item + C_pos)) + X)
        X      = LN(Drop(W2 GELU(W1 H)) + H)                FFN, inner size 4D
    h = X[len - 1];  scores = h . Emb^T

Both softmaxes run over the sequence axis with no mask, so, like the faithful MLSA4Rec, the model
is neither causal nor padding-invariant: it trains on prefix samples padded to L. Module names
follow RecBole's (``trm_encoder.layer.{i}.multi_head_attention.*``, ``.feed_forward.dense_1/2``),
except the feed-forward's LayerNorm, which is ``layer_norm`` here as in our SASRec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mlsa4rec.layers import Dropout
from mlsa4rec.layers.lsa import LowRankSelfAttention
from mlsa4rec.layers.transformer import FeedForward
from mlsa4rec.models.base import SequentialRecommender, normal_init
from mlsa4rec.models.registry import register
from mlsa4rec.models.sasrec import SelfAttentionConfig
from mlsa4rec.settings import setting


@dataclass(frozen=True)
class LightSANsConfig(SelfAttentionConfig):
    """RecBole 1.2's LightSANs defaults (recbole/properties/model/LightSANs.yaml): SASRec's plus P.
    Neither causal nor padding-invariant: prefix samples padded to L (train_scheme auto = prefix)."""

    k_interests: int = setting(5, "P, latent interests of the low-rank attention; about 0.1 * L is advised")
    train_defaults = {}


class LightMultiHeadAttention(LowRankSelfAttention):
    """The faithful LSA plus LightSANs' position branch and output projection."""

    def __init__(self, d_model: int, n_heads: int, k_interests: int, attn_dropout: float, hidden_dropout: float,
                 eps: float) -> None:
        super().__init__(d_model, n_heads, k_interests, attn_dropout, hidden_dropout, "faithful", "sequence", eps)
        self.pos_q_linear = nn.Linear(d_model, d_model)
        self.pos_k_linear = nn.Linear(d_model, d_model)
        self.pos_ln = nn.LayerNorm(d_model, eps=eps)
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, pos: torch.Tensor,  # type: ignore[override]
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """B x L x D; with ``rows`` (B) the output at position rows[b] of each sequence only, B x 1 x D."""
        d_h = x.shape[-1] // self.n_heads
        q, k, v = self.query(x), self.key(x), self.value(x)                           # B x L x D
        p = self.pos_ln(pos)                                                  # L x D
        q_p = self._heads(self.pos_q_linear(p)).transpose(0, 1) / math.sqrt(2 * d_h)   # H x L x d_h
        k_p = self._heads(self.pos_k_linear(p)).transpose(0, 1)
        pos_weights = (q_p @ k_p.transpose(-1, -2) / math.sqrt(d_h)).softmax(dim=-2)   # H x L x L
        if rows is not None:  # the rows read: B x H x 1 x L, and the residual there
            pos_weights = pos_weights[:, rows].transpose(0, 1).unsqueeze(2)
            x = x.gather(1, rows.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))
        pos_context = (pos_weights @ self._heads(v).transpose(1, 2)).transpose(1, 2).flatten(-2)
        return self.LayerNorm(self.dropout(self.dense(self.attend(q, k, v, rows=rows) + pos_context)) + x)


class LightTransformerLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, k_interests: int, inner_size: int, hidden_dropout: float,
                 attn_dropout: float, act: str, eps: float) -> None:
        super().__init__()
        self.multi_head_attention = LightMultiHeadAttention(d_model, n_heads, k_interests, attn_dropout,
                                                            hidden_dropout, eps)
        self.feed_forward = FeedForward(d_model, inner_size, hidden_dropout, act, eps)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.feed_forward(self.multi_head_attention(x, pos, rows))


class LightTransformerEncoder(nn.Module):
    def __init__(self, n_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layer = nn.ModuleList(LightTransformerLayer(**layer_kwargs) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, pos)
        return x


@register("lightsans")
class LightSANs(SequentialRecommender):
    config_class = LightSANsConfig

    def __init__(self, n_items: int, max_seq_length: int, config: LightSANsConfig) -> None:
        super().__init__()
        c = self.config = config
        self.n_items = n_items
        self.max_seq_length = max_seq_length
        self.item_embedding = nn.Embedding(n_items + 1, c.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_seq_length, c.hidden_size)
        self.trm_encoder = LightTransformerEncoder(
            c.n_layers, d_model=c.hidden_size, n_heads=c.n_heads, k_interests=c.k_interests, inner_size=c.inner_size,
            hidden_dropout=c.hidden_dropout_prob, attn_dropout=c.attn_dropout_prob, act=c.hidden_act,
            eps=c.layer_norm_eps)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout_prob)
        # RecBole's init: N(0, 0.02) Linear/Embedding weights, zero biases, LN (1, 0); Theta N(0, 1).
        self.apply(lambda module: normal_init(module, c.initializer_range))

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.trm_encoder(*self._embed(item_seq))

    def forward(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``gather_last(encode(...))`` (the base class's, which tests pin this to), faster: the last
        layer computes its per-position half (attention read-out, output projection, feed-forward)
        at each row's last item only. Its poolings and softmaxes still read every position."""
        x, pos = self._embed(item_seq)
        *first, last = self.trm_encoder.layer
        for layer in first:
            x = layer(x, pos)
        return last(x, pos, rows=(lengths - 1).clamp(min=0)).squeeze(1)

    def _embed(self, item_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E = Drop(LN(Emb(s))) (B x L x D) and the position table's first L rows (L x D)."""
        self.check_length(item_seq)
        pos = self.position_embedding(torch.arange(item_seq.shape[1], device=item_seq.device))
        return self.dropout(self.LayerNorm(self.item_embedding(item_seq))), pos
