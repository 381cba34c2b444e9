"""LRURec (Yue et al., WSDM 2024, arXiv 2310.02367) as in its authors' code, on our LRU layer.

    X0 = LN(Drop(Emb(s)))                                       no positional embedding
    each block:                                                 N = expand * D complex channels
        lambda = exp(-nu + i theta),  (nu, theta, gamma) = exp(params_log)
        h_t = lambda * h_(t-1) + gamma * (B x_t + b)            h_(-1) = 0 at the first item
        y_t = Re(C h_t + c)
        X   = LN(Drop_lru(y) + X)                               the LRU's residual (its "D x_t" is x_t)
        X   = LN(Drop(W2 Drop(GELU(W1 X + b1)) + b2) + X)       FFN, inner size 4D
    h  = X[len - 1];  scores = h . Emb^T + bias                 tied item table, per-item output bias

LayerNorms have PyTorch's default eps 1e-5, as released. The LRU layer is ``layers/lru.py``:
complex weights as real tensors, the parallel form as a chunked scan over time
(``ops/linear_scan.py``), the recurrent form as ``step``.

Initialisation as released: every weight, bias and the embedding from N(0, 0.02) truncated to
+-0.04, complex ones in real and imaginary parts alike (the output bias too), LayerNorms (1, 0),
and the LRU's ``params_log`` from the ring: |lambda| in [r_min, r_max], phase in (0, max_phase],
gamma = sqrt(1 - |lambda|^2) (then learned freely).

The per-item output bias (``output_bias``, on as released) keeps the contract's scores =
user . item_table^T by one extra coordinate: ``encode`` returns [h, 1] (B x L x (D + 1)) and
``item_table()`` is [Emb, bias], so the bias takes part in training, evaluation, serving and export
unchanged. ``num_parameters(exclude_embeddings=True)`` leaves it out, as it scales with the items.

Where the released code differs:

* Padding. The released model left-pads every sequence, and its parallel scan (log2 L levels, each
  adding a block's last state into the next block) pads L to a power of two, also on the left;
  a carry is dropped when the block it leaves ends in padding, which with left padding removes
  every padding term, so each real position sees its user's items from the first one with h = 0.
  Here sequences are right-padded and the recurrence runs left to right, so the padding comes
  after every real item and cannot reach a real position: the same outputs at real positions,
  with no mask, for any L. The model is causal and padding-invariant and trains with
  all-positions windows; it also streams: ``step`` runs the recurrence one event at a time.
* Parameters: the imaginary part of the released complex ``out_proj`` bias never reaches the
  output (only Re(C h + c) is used) and is not kept (D numbers per block fewer). The padding row
  of the item table is kept at zero (``padding_idx``) where the released one is a trained row; no
  real position ever reads it.
* Training (set in the presets, not here): the released code uses AdamW (weight decay 0.01,
  decoupled, not on biases and LayerNorms); the trainer here is Adam with L2 weight decay, so the
  presets use none. Its CE also counts the padding column as a class, and it trains on a target
  at the padding position before a window's first item; here the padding is never a class and
  every target has at least one item of history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlsa4rec.layers import Dropout
from mlsa4rec.layers.lru import LRU
from mlsa4rec.models.base import SequentialRecommender
from mlsa4rec.models.registry import register
from mlsa4rec.settings import ModelConfig, setting


@dataclass(frozen=True)
class LRURecConfig(ModelConfig):
    """The authors' released defaults (yueqirex/LRURec: config.py, model/lru.py); their names in brackets."""

    hidden_size: int = setting(64, "D [bert_hidden_units]")
    num_layers: int = setting(2, "LRU blocks [bert_num_blocks]")
    dropout_prob: float = setting(0.2, "after the embedding and inside/after the FFN [bert_dropout]")
    lru_dropout_prob: float = setting(0.2, "on the LRU's output, before its residual [bert_attn_dropout]")
    expand: int = setting(2, "complex state channels N = expand * hidden_size (LRULayer: hidden_size = 2 * d_model)")
    r_min: float = setting(0.8, "eigenvalue ring |lambda| in [r_min, r_max] at init (LRULayer defaults)")
    r_max: float = setting(0.99, "outer radius of the eigenvalue ring at init")
    max_phase: float = setting(2 * math.pi, "phases theta uniform in (0, max_phase] at init: 2 pi as released")
    output_bias: bool = setting(True, "per-item bias added to the scores (LRUModel.bias)")
    initializer_range: float = setting(0.02, "truncated normal N(0, std) in [-2 std, 2 std] "
                                             "(LRU.truncated_normal_init)")
    # L=50 is the Amazon setting (ML-1M: 200, see the presets). Causal, so it trains with
    # all-positions windows, as released: 128 windows per step, the loss at every position.
    train_defaults = {"MAX_ITEM_LIST_LENGTH": 50, "train_scheme": "all_positions", "train_batch_size": 128,
                      "stopping_step": 10}

    def check(self) -> None:
        self.at_least(1, "num_layers", "hidden_size", "expand")


class LRURecFeedForward(nn.Module):
    """LRURec's position-wise FFN: GELU, dropout inside and after, residual, LayerNorm (eps 1e-5)."""

    def __init__(self, d_model: int, inner_size: int, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.dropout(self.w_2(self.dropout(F.gelu(self.w_1(x))))) + x)


class LRUBlock(nn.Module):
    """The LRU with dropout, residual and LayerNorm, then the FFN (the released LRUBlock)."""

    def __init__(self, d_model: int, d_state: int, r_min: float, r_max: float, max_phase: float,
                 dropout: float, lru_dropout: float) -> None:
        super().__init__()
        self.lru = LRU(d_model, d_state, r_min=r_min, r_max=r_max, max_phase=max_phase)
        self.dropout = Dropout(lru_dropout)
        self.layer_norm = nn.LayerNorm(d_model)
        self.feed_forward = LRURecFeedForward(d_model, 4 * d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.layer_norm(self.dropout(self.lru(x)) + x))

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` at one position: x_t (B x D) and the LRU state -> (B x D, new state)."""
        y, state = self.lru.step(x_t, state)
        return self.feed_forward(self.layer_norm(self.dropout(y) + x_t)), state


@register("lrurec")
class LRURec(SequentialRecommender):
    causal = True
    padding_invariant = True
    preferred_scheme = "all_positions"
    streams = True

    config_class = LRURecConfig

    def __init__(self, n_items: int, max_seq_length: int, config: LRURecConfig) -> None:
        super().__init__()
        c = self.config = config
        self.n_items = n_items
        self.max_seq_length = max_seq_length
        self.item_embedding = nn.Embedding(n_items + 1, c.hidden_size, padding_idx=0)
        self.layer_norm = nn.LayerNorm(c.hidden_size)
        self.dropout = Dropout(c.dropout_prob)
        self.lru_blocks = nn.ModuleList(
            LRUBlock(c.hidden_size, c.expand * c.hidden_size, c.r_min, c.r_max, c.max_phase, c.dropout_prob,
                     c.lru_dropout_prob)
            for _ in range(c.num_layers)
        )
        self.output_bias = nn.Parameter(torch.zeros(n_items + 1)) if c.output_bias else None
        self._released_init(c.initializer_range)

    @torch.no_grad()
    def _released_init(self, std: float) -> None:
        """N(0, std) truncated to +-2 std for everything but LayerNorms and the LRU's params_log."""
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                continue
            for name, p in module.named_parameters(recurse=False):
                if name != "params_log":
                    nn.init.trunc_normal_(p, 0.0, std, -2 * std, 2 * std)
        self.item_embedding.weight[0].zero_()

    def _user(self, h: torch.Tensor) -> torch.Tensor:
        """[h, 1] with the output bias (its coordinate in ``item_table``), else h."""
        if self.output_bias is None:
            return h
        return torch.cat([h, h.new_ones(*h.shape[:-1], 1)], -1)

    def item_table(self) -> torch.Tensor:
        """(n_items + 1) x (D + 1): [Emb, bias] with the output bias, else Emb."""
        if self.output_bias is None:
            return self.item_embedding.weight
        return torch.cat([self.item_embedding.weight, self.output_bias[:, None]], 1)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = super().num_parameters(exclude_embeddings)
        if exclude_embeddings and self.output_bias is not None:
            n -= self.output_bias.numel()
        return n

    def embed(self, item_seq: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.dropout(self.item_embedding(item_seq)))

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.embed(item_seq)
        for block in self.lru_blocks:
            h = block(h)
        return self._user(h)

    # --- streaming: ``encode`` one event at a time ----------------------------------------------
    def initial_state(self, batch: int, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """The state of an empty history for ``batch`` users: per block, h = 0 as B x 2 x N
        (real, imaginary parts)."""
        return [block.lru.initial_state(batch, device=device) for block in self.lru_blocks]

    def step(self, items: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Feed one item per user (B ids); returns the representation after it (as ``forward``)
        and the new state."""
        h = self.embed(items)
        new_state = []
        for block, s in zip(self.lru_blocks, state, strict=True):
            h, s = block.step(h, s)
            new_state.append(s)
        return self._user(h), new_state

