"""Low-rank decomposed self-attention (LSA, from LightSANs) in three forms.

For X: B x L x D (``MLSA4REC.md`` section 3)::

    Q, K, V = X Wq, X Wk, X Wv
    K~ = softmax_L(K Theta_K)^T K        item-to-interest pooling: P vectors of D, shared by the heads
    V~ = softmax_L(V Theta_V)^T V
    W  = softmax_?(Q_h K~_h^T / sqrt(d_h))        B x H x L x P, then attention dropout
    A  = LN(Drop(W V~) + X)              no output projection

``variant`` (the model's) chooses how the padding and the future are treated:

* ``faithful`` - the released code: no mask, so padded positions take part in both softmaxes and
  every output depends on how much padding follows the sequence.
* ``masked`` - padded positions are left out of the pooling and of a sequence-axis attention
  softmax, so outputs at real positions no longer depend on the padding.
* ``causal`` - position t pools only positions <= t (a running log-sum-exp, see
  ``ItemToInterestPooling.cumulative``), and a sequence-axis softmax is normalised over positions <= t. The output
  at t then depends on nothing after t, and ``step`` updates a constant-size state per event.

``softmax`` is the axis of the attention weights: ``sequence`` (the released code: for each
interest, a distribution over positions) or ``interests`` (for each position, a distribution over
the P interests, as ordinary attention would).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from mlsa4rec.errors import check_choice
from mlsa4rec.layers.dropout import Dropout
from mlsa4rec.layers.precision import state_dtype

VARIANTS = ("faithful", "masked", "causal")
SOFTMAX_AXES = ("sequence", "interests")


class ItemToInterestPooling(nn.Module):
    """P softmax-weighted averages of the L inputs; ``theta`` (D x P) is initialised N(0, 1)."""

    def __init__(self, d_model: int, k_interests: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(d_model, k_interests))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """B x P x D pooled over the whole sequence (``mask``: B x L, True = take part)."""
        logits = x @ self.theta
        if mask is not None:
            logits = logits.masked_fill(~mask[..., None], float("-inf"))
        return logits.softmax(dim=1).transpose(1, 2) @ x

    def cumulative(self, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """B x L x P x D: at each t, the pooling over positions <= t only.

        pooled_t = sum_{s<=t} exp(a_s - z_t) x_s with a = x Theta and z_t = logcumsumexp(a)_t.
        Every exponent is <= 0, so nothing overflows however large the logits grow. Positions are
        processed in chunks of ``chunk``: inside a chunk the weights form a T x T triangle; across
        chunks the pooled sum is carried, rescaled by exp(z_prev - z_t) <= 1. Time and memory are
        linear in L.
        """
        a = x @ self.theta                                   # B x L x P
        z = torch.logcumsumexp(a, dim=1)
        out, carry, z_prev = [], None, None
        for lo in range(0, x.shape[1], chunk):
            ac, zc, xc = a[:, lo:lo + chunk], z[:, lo:lo + chunk], x[:, lo:lo + chunk]
            t = ac.shape[1]
            later = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)[None, :, :, None]
            w = (ac[:, None, :, :] - zc[:, :, None, :]).masked_fill(later, float("-inf")).exp()  # B x t x s x P
            pooled = torch.einsum("btsp,bsd->btpd", w, xc)
            if carry is not None:
                pooled = pooled + (z_prev[:, None] - zc).exp()[..., None] * carry[:, None]
            carry, z_prev = pooled[:, -1], zc[:, -1]
            out.append(pooled)
        return torch.cat(out, dim=1)

    def step(self, x_t: torch.Tensor, pooled: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one position (B x D) to a running pooling (B x P x D, log-normaliser z: B x P); computed in
        the state's dtype (fp32 under half precision, where a running sum would drift)."""
        x_t = x_t.to(pooled.dtype)
        a = x_t @ self.theta.to(pooled.dtype)
        z_new = torch.logaddexp(z, a)
        pooled = (z - z_new).exp()[..., None] * pooled + (a - z_new).exp()[..., None] * x_t[:, None]
        return pooled, z_new


class LSAState(NamedTuple):
    """What a causal LSA remembers between events: the running poolings and their normalisers."""
    key: torch.Tensor        # B x P x D
    key_z: torch.Tensor      # B x P
    value: torch.Tensor      # B x P x D
    value_z: torch.Tensor    # B x P
    scores_z: torch.Tensor   # B x H x P: running log-normaliser of a sequence-axis softmax


class LowRankSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, k_interests: int, attn_dropout: float, hidden_dropout: float,
                 variant: str = "faithful", softmax: str = "sequence", eps: float = 1e-12) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"hidden_size ({d_model}) must be divisible by n_heads ({n_heads})")
        check_choice("the LSA's variant", variant, VARIANTS)
        check_choice("the attention's softmax axis (attn_softmax)", softmax, SOFTMAX_AXES)
        if k_interests < 1:
            raise ValueError(f"k_interests must be >= 1, got {k_interests}")
        self.n_heads = n_heads
        self.variant = variant
        self.softmax = softmax
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.attpooling_key = ItemToInterestPooling(d_model, k_interests)
        self.attpooling_value = ItemToInterestPooling(d_model, k_interests)
        self.attn_dropout = Dropout(attn_dropout)
        self.dropout = Dropout(hidden_dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """... x D -> ... x H x d_h"""
        return x.unflatten(-1, (self.n_heads, x.shape[-1] // self.n_heads))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.context(x, lengths)) + x)

    def context(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The attention output W V~ with the heads merged (B x L x D), before dropout and residual
        (the causal variant's is ``causal_context``, defined by ``causal_context_reference``)."""
        return self.attend(self.query(x), self.key(x), self.value(x), lengths)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """``context`` from the projections Q, K, V (B x L x D). With ``rows`` (B, a position per
        sequence; faithful and masked only) the output at those positions alone, B x 1 x D: every
        position still takes part in the poolings and the softmax, only the rows nobody reads are skipped."""
        scale = 1.0 / math.sqrt(q.shape[-1] // self.n_heads)
        if self.variant == "causal":
            if rows is not None:
                raise ValueError("the causal LSA computes every position (rows=None)")
            return causal_context(self, q, k, v)
        mask = None
        if self.variant == "masked":
            if lengths is None:
                raise ValueError("the masked LSA needs the sequence lengths")
            mask = torch.arange(q.shape[1], device=q.device)[None, :] < lengths[:, None]   # B x L
        k_pool = self._heads(self.attpooling_key(k, mask)).transpose(1, 2)     # B x H x P x d_h
        v_pool = self._heads(self.attpooling_value(v, mask)).transpose(1, 2)
        scores = self._heads(q).transpose(1, 2) @ k_pool.transpose(-1, -2) * scale   # B x H x L x P
        if self.softmax == "interests":
            weights = scores.softmax(dim=-1)
        else:
            if mask is not None:
                scores = scores.masked_fill(~mask[:, None, :, None], float("-inf"))
            weights = scores.softmax(dim=-2)
        if rows is not None:                                                     # B x H x 1 x P
            weights = weights.gather(2, rows.view(-1, 1, 1, 1).expand(-1, weights.shape[1], 1, weights.shape[-1]))
        return (self.attn_dropout(weights) @ v_pool).transpose(1, 2).flatten(-2)

    def causal_weights(self, scores: torch.Tensor, dim: int) -> torch.Tensor:
        """The causal attention weights from ``scores`` (interests last, positions along ``dim``),
        attention dropout applied: a softmax over the interests, or over positions <= t."""
        if self.softmax == "interests":
            weights = scores.softmax(dim=-1)
        else:  # normalised over positions <= t
            weights = (scores - torch.logcumsumexp(scores, dim=dim)).exp()
        return self.attn_dropout(weights)

    # --- streaming (causal variant only) ---------------------------------------------------------
    def initial_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
                      ) -> LSAState:
        device = device or self.query.weight.device
        dtype = dtype or self.query.weight.dtype
        dtype = state_dtype(dtype)  # running sums stay in at least fp32, like Mamba's SSM state
        d, p = self.query.in_features, self.attpooling_key.theta.shape[1]
        empty = torch.full((batch, p), float("-inf"), device=device, dtype=dtype)
        zeros = torch.zeros(batch, p, d, device=device, dtype=dtype)
        scores_z = torch.full((batch, self.n_heads, p), float("-inf"), device=device, dtype=dtype)
        return LSAState(zeros, empty, zeros.clone(), empty.clone(), scores_z)

    def step(self, x_t: torch.Tensor, state: LSAState) -> tuple[torch.Tensor, LSAState]:
        """Output at one new position (B x D) from the state of the positions before it."""
        if self.variant != "causal":
            raise RuntimeError(f"only the causal LSA can stream; this one is {self.variant!r}")
        k_pool, k_z = self.attpooling_key.step(self.key(x_t), state.key, state.key_z)
        v_pool, v_z = self.attpooling_value.step(self.value(x_t), state.value, state.value_z)
        q = self._heads(self.query(x_t).to(k_pool.dtype))                        # B x H x d_h
        scores = torch.einsum("bhd,bphd->bhp", q, self._heads(k_pool)) / math.sqrt(q.shape[-1])
        scores_z = state.scores_z
        if self.softmax == "interests":
            weights = scores.softmax(dim=-1)
        else:
            scores_z = torch.logaddexp(scores_z, scores)
            weights = (scores - scores_z).exp()
        context = torch.einsum("bhp,bphd->bhd", self.attn_dropout(weights), self._heads(v_pool)).flatten(-2)
        context = context.to(x_t.dtype)
        return self.LayerNorm(self.dropout(context) + x_t), LSAState(k_pool, k_z, v_pool, v_z, scores_z)


# --- the causal context: its definition, and the chunked form training uses --------------------
CAUSAL_CHUNK = 32  # positions per chunk of causal_context: measured best of 16-64 at L = 50 and 200


def causal_context_reference(lsa: LowRankSelfAttention, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor) -> torch.Tensor:
    """The causal LSA as defined: every position's running poolings K~_t, V~_t materialised
    (B x L x P x D each, ``ItemToInterestPooling.cumulative``), then attention over the interests."""
    scale = 1.0 / math.sqrt(q.shape[-1] // lsa.n_heads)
    k_pool = lsa._heads(lsa.attpooling_key.cumulative(k))           # B x L x P x H x d_h
    v_pool = lsa._heads(lsa.attpooling_value.cumulative(v))
    scores = torch.einsum("blhd,blphd->bhlp", lsa._heads(q), k_pool) * scale
    weights = lsa.causal_weights(scores, dim=2)                      # B x H x L x P
    return torch.einsum("bhlp,blphd->blhd", weights, v_pool).flatten(-2)


def causal_context(lsa: LowRankSelfAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   chunk: int = CAUSAL_CHUNK) -> torch.Tensor:
    """``causal_context_reference`` without materialising the running poolings (tested equal,
    outputs and gradients): 2-2.7x faster for the LSA, about 1.5x for a causal MLSA4Rec training
    step on ML-1M (docs/results/causal_lsa.md).

    With w_p[t, s] = exp(a_s,p - z_t,p) the weight of position s in K~_t's interest p (a = K Theta_K,
    z = logcumsumexp(a), so every w <= 1), the scores regroup as

        q_t . K~_t,p = sum_(s <= t) w_p[t, s] (q_t . k_s)      and      sum_p W_t,p V~_t,p = sum_(s <= t) M[t, s] v_s,
        with M[t, s] = sum_p W_t,p w'_p[t, s] per head,

    so each chunk of T positions costs T x T products per head and interest instead of T x T x D
    per interest. The poolings of the chunks before are carried as one B x P x D state, rescaled
    by exp(z_before - z_t) <= 1, as in ``cumulative``: time and memory stay linear in L."""
    batch, length, d = q.shape
    heads, d_h = lsa.n_heads, d // lsa.n_heads
    p = lsa.attpooling_key.theta.shape[1]
    a_k, a_v = k @ lsa.attpooling_key.theta, v @ lsa.attpooling_value.theta    # B x L x P
    z_k, z_v = torch.logcumsumexp(a_k, dim=1), torch.logcumsumexp(a_v, dim=1)
    q, k, v = (_by_head(t, heads) for t in (q, k, v))                           # B x H x L x d_h
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)[:, :, None]
    chunks = [(lo, min(chunk, length - lo)) for lo in range(0, length, chunk)]

    scores, carry = [], None                                         # carry: B x H x P x d_h, K~ so far
    for lo, t in chunks:
        here = slice(lo, lo + t)
        w = _PrefixWeights.apply(a_k[:, here], z_k[:, here], later[:t, :t])        # B x t x t x P
        qk = (q[:, :, here] @ k[:, :, here].transpose(-1, -2)).transpose(1, 2)    # B x t x H x t
        s = (qk.reshape(batch * t, heads, t) @ w.reshape(batch * t, t, p)).view(batch, t, heads, p)
        if carry is not None:
            s = s + (q[:, :, here] @ carry.transpose(-1, -2)).transpose(1, 2) * _decay(z_k, lo, t)[:, :, None]
        carry = _carry(a_k, z_k, k, lo, t, carry)
        scores.append(s)
    # in the reference's layout, so that attention dropout draws the same mask for the same seed
    scores_bhlp = torch.cat(scores, dim=1).transpose(1, 2).contiguous() * (1.0 / math.sqrt(d_h))
    weights = lsa.causal_weights(scores_bhlp, dim=2).transpose(1, 2)                # B x L x H x P

    out, carry = [], None                                            # carry: V~ so far
    for lo, t in chunks:
        here = slice(lo, lo + t)
        w = _PrefixWeights.apply(a_v[:, here], z_v[:, here], later[:t, :t])
        weights_here = weights[:, here]                                              # B x t x H x P
        m = weights_here.reshape(batch * t, heads, p) @ w.reshape(batch * t, t, p).transpose(1, 2)
        c = m.view(batch, t, heads, t).transpose(1, 2) @ v[:, :, here]              # B x H x t x d_h
        if carry is not None:
            c = c + (weights_here * _decay(z_v, lo, t)[:, :, None]).transpose(1, 2) @ carry
        carry = _carry(a_v, z_v, v, lo, t, carry)
        out.append(c)
    return torch.cat(out, dim=2).transpose(1, 2).flatten(-2)                         # B x L x D


def _by_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """B x L x D -> B x H x L x d_h, contiguous (batched matmuls over B x H need it to run as one)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2).contiguous()


def _decay(z: torch.Tensor, lo: int, t: int) -> torch.Tensor:
    """exp(z_before - z_t) for the t positions of the chunk at ``lo``: B x t x P, each <= 1."""
    return (z[:, lo - 1, None] - z[:, lo:lo + t]).exp()


def _carry(a: torch.Tensor, z: torch.Tensor, x: torch.Tensor, lo: int, t: int,
           carry: torch.Tensor | None) -> torch.Tensor:
    """The running pooling at the chunk's last position (B x H x P x d_h), from the one before it."""
    end = lo + t - 1
    pooled = (a[:, lo:end + 1] - z[:, end, None]).exp().transpose(1, 2)[:, None] @ x[:, :, lo:end + 1]
    if carry is None:
        return pooled
    return pooled + (z[:, lo - 1] - z[:, end]).exp()[:, None, :, None] * carry


class _PrefixWeights(torch.autograd.Function):
    """w[b, t, s, p] = exp(a[b, s, p] - z[b, t, p]) for s <= t, else 0: B x T x T x P, written in
    place and saved alone (its gradient needs only w), where autograd would keep three such
    tensors and run twice as many passes over them."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, z: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        w = torch.sub(a[:, None], z[:, :, None])
        w.masked_fill_(later, float("-inf")).exp_()
        ctx.save_for_backward(w)
        return w

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (w,) = ctx.saved_tensors
        grad_w = grad * w                                                # d exp(u) = exp(u) du
        return grad_w.sum(dim=1), grad_w.sum(dim=2).neg_(), None
