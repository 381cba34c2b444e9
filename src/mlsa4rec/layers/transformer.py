"""Post-LN Transformer encoder layer as in RecBole's SASRec (attention, then a GELU FFN)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlsa4rec.layers.dropout import Dropout, dropout

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh,
               "sigmoid": torch.sigmoid}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"hidden_act must be one of {', '.join(ACTIVATIONS)}; got {name!r}") from None


class MultiHeadAttention(nn.Module):
    """Self-attention with an output projection, dropout, residual and LayerNorm."""

    def __init__(self, hidden_size: int, n_heads: int, attn_dropout: float, hidden_dropout: float, eps: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_dropout = attn_dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = Dropout(hidden_dropout)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        return x.view(b, length, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, causal: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        if self.training and self.attn_dropout > 0:
            # written out so the attention dropout uses the fast mask (SDPA's math path would
            # draw it with bernoulli_); same result in distribution
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            elif causal:
                n = x.shape[1]
                future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            ctx = dropout(scores.softmax(-1), self.attn_dropout, training=True) @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        ctx = ctx.transpose(1, 2).reshape(x.shape)
        return self.layer_norm(self.dropout(self.dense(ctx)) + x)


class FeedForward(nn.Module):
    def __init__(self, hidden_size: int, inner_size: int, dropout: float, act: str, eps: float) -> None:
        super().__init__()
        self.dense_1 = nn.Linear(hidden_size, inner_size)
        self.dense_2 = nn.Linear(inner_size, hidden_size)
        self.act = activation(act)
        self.dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.dropout(self.dense_2(self.act(self.dense_1(x)))) + x)


class TransformerLayer(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, inner_size: int, hidden_dropout: float,
                 attn_dropout: float, act: str, eps: float) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(hidden_size, n_heads, attn_dropout, hidden_dropout, eps)
        self.feed_forward = FeedForward(hidden_size, inner_size, hidden_dropout, act, eps)

    def forward(self, x: torch.Tensor, causal: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.feed_forward(self.attention(x, causal, mask))
