"""Performer (FAVOR+, Choromanski et al., ICLR 2021) inside SASRec's block, causal by prefix sums.

    E   = Drop(LN(Emb(s) + PosEmb(0..L-1)))                   SASRec's input, learned positions
    per layer, per head (d = head size, m = nb_features, W: m x d random features):
        q_t, k_t, v_t = W_q h_t + b_q, W_k h_t + b_k, W_v h_t + b_v
        phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),  x' = x / d^(1/4)      positive random features
        ctx_t = phi(q_t)^T (sum_{j<=t} phi(k_j) v_j^T) / phi(q_t)^T (sum_{j<=t} phi(k_j))
              ~ sum_{j<=t} softmax_j(q_t . k_j / sqrt(d)) v_j                (causal softmax attention)
        A = LN(Drop(W_o ctx + b_o) + H)                         SASRec's post-LN residual
        H = LN(Drop(W_2 GELU(W_1 A + b_1) + b_2) + A)           SASRec's FFN
    h   = H_n[len - 1];  scores = h . Emb^T                     tied item table

W has blocks of d exactly orthogonal rows (orthogonal random features), each row scaled to the
norm of a Gaussian vector; one W per layer, shared by its heads (as in performer-pytorch). It is a
buffer saved with the weights, redrawn every ``feature_redraw_interval`` training forwards (0 =
never) from a generator seeded per layer (seed, number of draws and W are all in the state dict,
so runs, resumed runs and serving are reproducible). The stabilisation of the exponentials, and
where it departs from the released FAVOR+ code, is in ``layers/linear_attention.py``
(``PerformerAttention``).

As in performer-pytorch's FAVOR+ attention there is no attention dropout (no attention matrix is
formed), so ``attn_dropout_prob`` is not a setting; dropout acts on the embeddings and after the
output projection and the FFN, as in SASRec.

Streaming: ``step`` keeps, per layer, [sum_{j<=t} phi(k_j) v_j^T | sum_{j<=t} phi(k_j)] / exp(c_t)
(B x H x m x (d + 1)) with its running stabiliser c_t (B x H), and the position of the next event
(B, int64): O(1) per event. Positions are
learned only up to MAX_ITEM_LIST_LENGTH, so a state that already holds that many events refuses
the next one (``ValueError``). ``step`` never redraws the features.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlsa4rec.layers.linear_attention import PerformerAttention
from mlsa4rec.models.linrec import LinearSASRec, LinRecConfig
from mlsa4rec.models.registry import register
from mlsa4rec.settings import setting


@dataclass(frozen=True)
class PerformerConfig(LinRecConfig):
    """SASRec's defaults (RecBole 1.2) plus FAVOR+'s own settings. No authors' configuration for
    sequential recommendation exists, so there is no preset. No attn_dropout_prob: FAVOR+ forms no
    attention matrix to drop."""

    nb_features: int = setting(64, "m: random features per head (performer-pytorch's default d ln d would be 110)")
    feature_redraw_interval: int = setting(1000, "draw new random features every this many training steps; 0 = "
                                                 "never (performer-pytorch's default 1000)")

    def check(self) -> None:
        super().check()
        self.at_least(1, "nb_features")
        self.at_least(0, "feature_redraw_interval")


@register("performer")
class Performer(LinearSASRec):
    config_class = PerformerConfig

    def __init__(self, n_items: int, max_seq_length: int, config: PerformerConfig) -> None:
        super().__init__(n_items, max_seq_length, config, make_attention=lambda: PerformerAttention(
            config.hidden_size, config.n_heads, config.hidden_dropout_prob, config.layer_norm_eps, config.nb_features,
            config.feature_redraw_interval))

    def redraw_features(self) -> None:
        """Draw the next random features in every layer now (training does this on its own)."""
        for layer in self.layers:
            layer.attention.redraw_features()
