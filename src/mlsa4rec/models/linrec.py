"""LinRec (Liu et al., SIGIR 2023): SASRec with L2-normalised linear attention, built causal.

    E   = Drop(LN(Emb(s) + PosEmb(0..L-1)))                  SASRec's input, learned positions
    per layer, per head (d = head size):
        q_t, k_t, v_t = W_q h_t + b_q, W_k h_t + b_k, W_v h_t + b_v
        q^_t = elu(q_t) / ||elu(q_t)||_2,   k^_t = elu(k_t) / ||elu(k_t)||_2      (over the d features)
        ctx_t = q^_t^T (sum_{j<=t} k^_j v_j^T) / sqrt(d)                           (causal)
        A = LN(Drop(W_o ctx + b_o) + H)                        SASRec's post-LN residual
        H = LN(Drop(W_2 GELU(W_1 A + b_1) + b_2) + A)          SASRec's FFN
    h   = H_n[len - 1];  scores = h . Emb^T                    tied item table

The attention is the released code's (``MultiHeadAttention.forward`` in the authors' layers.py,
which replaces RecBole's): ``elu`` with no +1, each query and each key L2-normalised over its own
features, Q (K^T V) / sqrt(d), no normaliser. (The keys there are laid out B x H x d x L, so
``torch.norm(elu_key, dim=2)`` is the norm over the features of each position, not over the
sequence; the paper's "column-wise" normalisation of K refers to the columns of K^T.) Since every
position is normalised on its own, the causal form needs no change to the normalisation.

Departures from the released code:

* causal: position t sums over keys j <= t, by prefix sums. The released attention ignores the
  attention mask, so every position (the last one included, whose output is scored) also sums
  over the positions after it and over the padding; the model then trains on one prefix per
  sample. Here the output at t depends on items <= t only, so it trains on every position of a
  user window at once (all-positions scheme), ignores trailing padding, and streams.
* the released layer still defines ``attn_dropout`` but never applies it (there is no attention
  matrix); ``attn_dropout_prob`` is therefore not a setting here.
* ``F.normalize`` divides by max(||x||, 1e-12) where the released code divides by ||x||.

Streaming: ``step`` keeps, per layer, S = sum_{j<=t} k^_j v_j^T (B x H x d x d) and the position
of the next event (B, int64): O(1) per event whatever the history's length. Positions are learned
only up to MAX_ITEM_LIST_LENGTH, so a state that already holds that many events refuses the next
one (``ValueError``); re-encode the last L events instead (``forward``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from mlsa4rec.layers import Dropout
from mlsa4rec.layers.linear_attention import CausalLinearAttention, LinearAttentionLayer, LinRecAttention
from mlsa4rec.models.base import SequentialRecommender, TransformerConfig, normal_init
from mlsa4rec.models.registry import register


class LinearSASRecState(NamedTuple):
    """Streaming state: the position of the next event per user, and each layer's attention state
    (LinRec: the sums S, B x H x d x d; Performer: ``FavorState``)."""

    position: torch.Tensor       # B, int64
    layers: list[Any]            # per layer: its attention's state, batch-first tensors


class LinearSASRec(SequentialRecommender):
    """SASRec's embedding, learned positions and post-LN layers with a causal linear attention
    (one ``make_attention()`` per layer), tied item table; ``step`` streams it."""

    causal = True
    padding_invariant = True
    preferred_scheme = "all_positions"
    streams = True

    def __init__(self, n_items: int, max_seq_length: int, config: TransformerConfig,
                 make_attention: Callable[[], CausalLinearAttention]) -> None:
        super().__init__()
        c = self.config = config
        self.n_items = n_items
        self.max_seq_length = max_seq_length
        self.stream_limit = max_seq_length  # learned positions end there
        self.item_embedding = nn.Embedding(n_items + 1, c.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_seq_length, c.hidden_size)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(
            LinearAttentionLayer(make_attention(), c.hidden_size, c.inner_size, c.hidden_dropout_prob, c.hidden_act,
                                 c.layer_norm_eps)
            for _ in range(c.n_layers)
        )
        # RecBole's init: N(0, 0.02) for Linear/Embedding weights, zero biases, LN = (1, 0).
        self.apply(lambda module: normal_init(module, c.initializer_range))

    def _embed(self, items: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layer_norm(self.item_embedding(items) + self.position_embedding(positions)))

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.check_length(item_seq)
        h = self._embed(item_seq, torch.arange(item_seq.shape[1], device=item_seq.device))
        for layer in self.layers:
            h = layer(h)
        return h

    # --- streaming: ``encode`` one event at a time ----------------------------------------------
    def initial_state(self, batch: int, device: torch.device | str | None = None) -> LinearSASRecState:
        """The state of an empty history for ``batch`` users: position 0 and zero sums per layer."""
        device = device or self.item_embedding.weight.device
        return LinearSASRecState(torch.zeros(batch, dtype=torch.int64, device=device),
                                 [layer.attention.initial_state(batch, device=device) for layer in self.layers])

    def step(self, items: torch.Tensor, state: LinearSASRecState) -> tuple[torch.Tensor, LinearSASRecState]:
        """Feed one item per user (B ids); returns the B x D representation after it and the new state."""
        position, layer_states = state
        # (not while exporting: the graph cannot branch on data; export.json states the limit)
        if not torch.compiler.is_exporting() and bool((position >= self.max_seq_length).any()):
            raise ValueError(f"a history in this state already holds MAX_ITEM_LIST_LENGTH={self.max_seq_length} "
                             f"events, where {self.name}'s learned positions end; re-encode the most recent "
                             f"{self.max_seq_length} events with forward() instead of stepping further")
        h = self._embed(items, position)
        new_states = []
        for layer, s in zip(self.layers, layer_states, strict=True):
            h, s = layer.step(h, s)
            new_states.append(s)
        return h, LinearSASRecState(position + 1, new_states)


@dataclass(frozen=True)
class LinRecConfig(TransformerConfig):
    """SASRec's defaults (RecBole 1.2), so that the two compare like for like; the authors' released
    ml-1m settings are the preset linrec-ml-1m. No attn_dropout_prob: linear attention forms no
    attention matrix to drop (the released layer defines attn_dropout but never applies it)."""

    # causal, so all-positions training, in SASRec's step size
    train_defaults = {"train_scheme": "all_positions", "train_batch_size": 128}


@register("linrec")
class LinRec(LinearSASRec):
    config_class = LinRecConfig

    def __init__(self, n_items: int, max_seq_length: int, config: LinRecConfig) -> None:
        super().__init__(n_items, max_seq_length, config, make_attention=lambda: LinRecAttention(
            config.hidden_size, config.n_heads, config.hidden_dropout_prob, config.layer_norm_eps))
