"""Causal linear attention for SASRec's post-LN block: LinRec's and Performer's (FAVOR+).

Both modules keep ``MultiHeadAttention``'s layout - ``query``/``key``/``value`` projections, the
output projection ``dense``, hidden dropout, residual and ``layer_norm`` - and replace only the
softmax attention between them. Per head, with feature maps phi_q and phi_k (m features)::

    numerator_t = phi_q(q_t) . S_t,        S_t = sum_{j<=t} phi_k(k_j) v_j^T      (m x d)
    LinRec:     ctx_t = numerator_t                                 (no normaliser, as released)
    Performer:  ctx_t = numerator_t / (phi_q(q_t) . z_t),  z_t = sum_{j<=t} phi_k(k_j)

``forward`` computes all positions at once in chunks of ``chunk_size`` (64): inside a chunk the
C x C scores with a causal mask, across chunks the per-chunk sums phi_k(K)^T V as exclusive prefix
sums (``causal_linear_attention``). That is O(L C m + L m d) time, never materialises an
L x m x d tensor and has no Python loop over time. ``step`` adds one position, S += phi_k(k_t)
v_t^T, O(1) per event; the state is batch-first. Performer appends a column of ones to V, so the
same sums carry the normaliser z in their last column, and keeps a running stabiliser (see
``PerformerAttention``). Feature maps and sums are computed in at least float32 (also under half
precision), and the streaming sums are kept in it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mlsa4rec.layers.dropout import Dropout
from mlsa4rec.layers.precision import state_dtype
from mlsa4rec.layers.transformer import FeedForward


def _decay(c_t: torch.Tensor, c_j: torch.Tensor) -> torch.Tensor:
    """... x T x S: exp(c_j - c_t) where j <= t (<= 1, as c is nondecreasing), else 0."""
    diff = c_j.unsqueeze(-2) - c_t.unsqueeze(-1)
    future = torch.ones(diff.shape[-2:], dtype=torch.bool, device=diff.device).triu(1)
    return diff.masked_fill(future, float("-inf")).exp()


def causal_linear_attention(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, chunk: int = 64,
                            log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """out_t = sum_{j<=t} (qf_t . kf_j) exp(c_j - c_t) v_j, for qf, kf: ... x L x m, v: ... x L x e.

    ``log_scale`` c (... x L, nondecreasing along L; 0 when None) lets the caller store each key's
    features divided by exp(c_j), its own running stabiliser, and have every term for query t
    brought to the common factor exp(-c_t); all factors exp(c_j - c_t) are <= 1. Chunks of
    ``chunk`` positions: causal C x C scores inside a chunk, carried sums across chunks.
    """
    n = qf.shape[-2]
    if n <= chunk:
        scores = qf @ kf.transpose(-2, -1)
        return (scores.tril() if log_scale is None else scores * _decay(log_scale, log_scale)) @ v
    pad = -n % chunk
    if pad:
        qf, kf, v = (F.pad(x, (0, 0, 0, pad)) for x in (qf, kf, v))  # zero keys add nothing
        if log_scale is not None:  # repeat the last value: c stays nondecreasing
            log_scale = torch.cat([log_scale, log_scale[..., -1:].expand(*log_scale.shape[:-1], pad)], dim=-1)
    lead, c = qf.shape[:-2], (n + pad) // chunk
    qc, kc, vc = (x.reshape(*lead, c, chunk, x.shape[-1]) for x in (qf, kf, v))
    scores = qc @ kc.transpose(-2, -1)                                 # ... x c x C x C
    if log_scale is None:
        within = scores.tril() @ vc                                    # ... x c x C x e
        sums = kc.transpose(-2, -1) @ vc                               # ... x c x m x e
        before = torch.cat([torch.zeros_like(sums[..., :1, :, :]), sums[..., :-1, :, :].cumsum(-3)], dim=-3)
        out = within + qc @ before
    else:
        cc = log_scale.reshape(*lead, c, chunk)
        within = (scores * _decay(cc, cc)) @ vc
        end = cc[..., -1]                                              # c at the end of each chunk
        sums = (kc * (cc - end.unsqueeze(-1)).exp().unsqueeze(-1)).transpose(-2, -1) @ vc   # relative to end
        # the sums before chunk n, relative to end[n - 1]: sum_{n' < n} exp(end[n'] - end[n - 1]) sums[n']
        previous = torch.cat([cc[..., :1, 0], end[..., :-1]], dim=-1)  # end[n - 1]; chunk 0: its first c
        weights = _decay(previous, end).tril(-1)                      # n' < n only
        before = torch.einsum("...nk,...kme->...nme", weights, sums)
        out = within + (qc @ before) * (previous.unsqueeze(-1) - cc).exp().unsqueeze(-1)
    return out.reshape(*lead, c * chunk, v.shape[-1])[..., :n, :]


def running_max(x: torch.Tensor) -> torch.Tensor:
    """max over positions <= t along the last dimension. ``cummax`` has no ONNX conversion, so
    under export the same maxima come from an L x L masked max (exact: a max does not round)."""
    if not torch.compiler.is_exporting():
        return x.cummax(-1).values
    later = torch.ones(x.shape[-1], x.shape[-1], dtype=torch.bool, device=x.device).triu(1)   # [t, j]: j > t
    return x.unsqueeze(-2).masked_fill(later, float("-inf")).amax(-1)


class CausalLinearAttention(nn.Module):
    """Self-attention with an output projection, dropout, residual and LayerNorm (the parameter
    names of ``MultiHeadAttention``) whose attention is causal linear attention; subclasses define
    the feature maps (``features``) or the whole attention (``attend``, ``attend_step``)."""

    normalised: bool = False  # divide by phi_q(q_t) . sum_{j<=t} phi_k(k_j) (Performer) or not (LinRec)
    chunk_size: int = 64

    def __init__(self, hidden_size: int, n_heads: int, hidden_dropout: float, eps: float) -> None:
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.head_size = hidden_size // n_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = Dropout(hidden_dropout)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    @property
    def n_features(self) -> int:
        """m, the size of the feature maps."""
        return self.head_size

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi_q(q), phi_k(k)): heads ... x d -> ... x m, each position mapped on its own."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """B x H x L x d queries and keys, B x H x L x e values -> B x H x L x e."""
        qf, kf = self.features(q, k)
        return causal_linear_attention(qf, kf, v, self.chunk_size)

    def initial_state(self, batch: int, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None):
        """The running sums of an empty history: S = 0, B x H x m x e, in at least float32."""
        w = self.query.weight
        e = self.head_size + int(self.normalised)
        return torch.zeros(batch, self.n_heads, self.n_features, e, device=device or w.device,
                           dtype=state_dtype(dtype or w.dtype))

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state):
        """One position (B x H x d, B x H x e) -> (B x H x e, the state after it): S += phi_k(k) v^T."""
        qf, kf = self.features(q, k)
        state = state + kf.unsqueeze(-1) * v.unsqueeze(-2)
        return (qf.unsqueeze(-2) @ state).squeeze(-2), state

    # --- shared -------------------------------------------------------------------------------
    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """... x D -> heads ... x H x d (values x e: with a column of ones when normalised)."""
        work = state_dtype(x.dtype)
        q, k, v = (proj(x).unflatten(-1, (self.n_heads, self.head_size)).to(work)
                   for proj in (self.query, self.key, self.value))
        if self.normalised:
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        return q, k, v

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Attention output (... x H x e) -> the block's output, LN(Drop(dense(ctx)) + x)."""
        if self.normalised:  # 0 / 0 only when every feature underflowed: give 0, not NaN
            out = out[..., :-1] / out[..., -1:].clamp_min(torch.finfo(out.dtype).tiny)
        return self.layer_norm(self.dropout(self.dense(out.flatten(-2).to(x.dtype))) + x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x L x D -> B x L x D; position t attends to positions <= t only."""
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))  # B x H x L x (d | e)
        return self._finish(self.attend(q, k, v).transpose(1, 2), x)

    def step(self, x_t: torch.Tensor, state):
        """``forward`` at one new position: x_t (B x D) and the state -> (B x D, the new state)."""
        out, state = self.attend_step(*self._qkv(x_t), state)
        return self._finish(out, x_t), state


class LinRecAttention(CausalLinearAttention):
    """LinRec's L2-normalised linear attention (Liu et al., SIGIR 2023), causal.

        phi_q(q) = elu(q) / ||elu(q)||_2 / sqrt(d),   phi_k(k) = elu(k) / ||elu(k)||_2

    norms over the head's d features of each position, ``elu`` without a +1, no normaliser: this
    is the released ``MultiHeadAttention.forward`` (layers.py), where the keys are laid out
    B x H x d x L and ``torch.norm(elu_key, dim=2)`` therefore normalises each key over its
    features, like the queries. Each position is normalised on its own, so the causal form needs
    no change to the normalisation. ``F.normalize``'s eps (1e-12) guards an all-zero row. The
    feature values are bounded (|phi| <= 1), so no stabiliser is needed; the state is S alone.
    """

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(F.elu(q), dim=-1) / math.sqrt(self.head_size), F.normalize(F.elu(k), dim=-1)


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """m x d random features (float64, CPU): blocks of d orthonormal rows (Haar, via QR with the
    sign fix), each row rescaled by the norm of an independent N(0, I_d) vector, so that each row
    is marginally N(0, I_d) and rows within a block are exactly orthogonal (FAVOR+'s ORF)."""
    blocks = []
    for _ in range(-(-m // d)):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64, device="cpu"))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64, device="cpu").norm(dim=1, keepdim=True)
    return torch.cat(blocks)[:m] * norms


class FavorState(NamedTuple):
    """Performer's running sums for ``step``: [sum phi(k_j) v_j^T | sum phi(k_j)] / exp(c_t), and c_t."""

    sums: torch.Tensor    # B x H x m x (d + 1)
    shift: torch.Tensor   # B x H, c_t = max_{j<=t, i} log phi_i(k_j) (-inf before any key)


class PerformerAttention(CausalLinearAttention):
    """FAVOR+ (Choromanski et al., ICLR 2021): softmax attention through positive random features.

    With x' = x / d^(1/4) and the m x d projection W (orthogonal random features)::

        phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),    E[phi(q) . phi(k)] = exp(q . k / sqrt(d))
        ctx_t = sum_{j<=t} (phi(q_t) . phi(k_j)) v_j / sum_{j<=t} phi(q_t) . phi(k_j)

    Stabilised exactly and causally: every factor below cancels between the numerator and the
    normaliser. A query's features are divided by exp of their max over the m features; the keys
    by exp(c_t), c_t = max over keys j <= t and features of log phi_i(k_j), a running max - in
    ``forward`` each key is stored divided by exp(c_j) and the sums for query t are rescaled by
    exp(c_j - c_t) <= 1 (``causal_linear_attention``'s ``log_scale``); in ``step`` the sums are
    rescaled by exp(c_{t-1} - c_t) when the max grows. So no feature or sum exceeds its
    unstabilised value relative to the largest key so far, whatever the norms of q and k. (The
    released FAVOR+ code subtracts the max over all keys, which needs the whole sequence and makes
    a position's numerics depend on later keys, and adds 1e-6 to every feature, which biases the
    estimate; neither is done here.)

    ``projection`` (W) is a buffer, saved with the weights. In training mode the layer counts its
    forward calls (one per optimiser step in the trainer) and, every ``redraw_interval`` of them
    (0 = never), draws a new W before the call, from a CPU generator seeded with
    ``feature_seed + redraws``; ``feature_seed`` is drawn from torch's global generator when the
    layer is built. Seed, counts and W are buffers, so a resumed run continues the same draws and
    serving uses the trained W. Eval mode and ``step`` never redraw.
    """

    normalised = True

    def __init__(self, hidden_size: int, n_heads: int, hidden_dropout: float, eps: float, nb_features: int,
                 redraw_interval: int) -> None:
        super().__init__(hidden_size, n_heads, hidden_dropout, eps)
        if nb_features < 1:
            raise ValueError(f"nb_features must be >= 1, got {nb_features}")
        if redraw_interval < 0:
            raise ValueError(f"feature_redraw_interval must be >= 0 (0 = never redraw), got {redraw_interval}")
        self.nb_features = nb_features
        self.redraw_interval = redraw_interval
        seed = int(torch.randint(0, 2**62, (), device="cpu"))  # explicit CPU: also under a meta device
        self.register_buffer("feature_seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("redraws", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("calls_since_redraw", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("projection", torch.empty(nb_features, self.head_size))
        self._set_projection(seed)

    @property
    def n_features(self) -> int:
        return self.nb_features

    def _set_projection(self, seed: int) -> None:
        drawn = orthogonal_gaussian(self.nb_features, self.head_size, torch.Generator().manual_seed(seed))
        if not self.projection.is_meta:
            with torch.no_grad():
                self.projection.copy_(drawn)

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw the next projection (number ``redraws + 1`` of this layer's seeded sequence)."""
        self.redraws += 1
        self.calls_since_redraw.zero_()
        self._set_projection(int(self.feature_seed) + int(self.redraws))

    def log_features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries' features (max 1 / sqrt(m) each) and the keys' log-features, ... x m."""
        w = self.projection.to(q.dtype)
        q, k = q * self.head_size ** -0.25, k * self.head_size ** -0.25
        lq = q @ w.T - q.square().sum(-1, keepdim=True) / 2
        lk = k @ w.T - k.square().sum(-1, keepdim=True) / 2
        qf = torch.exp(lq - lq.amax(-1, keepdim=True).detach()) * self.nb_features ** -0.5
        return qf, lk

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qf, lk = self.log_features(q, k)
        shift = running_max(lk.detach().amax(-1))                       # c_t, B x H x L
        kf = torch.exp(lk - shift.unsqueeze(-1)) * self.nb_features ** -0.5
        return causal_linear_attention(qf, kf, v, self.chunk_size, log_scale=shift)

    def initial_state(self, batch: int, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> FavorState:
        sums = super().initial_state(batch, device, dtype)
        return FavorState(sums, torch.full(sums.shape[:2], float("-inf"), device=sums.device, dtype=sums.dtype))

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    state: FavorState) -> tuple[torch.Tensor, FavorState]:
        qf, lk = self.log_features(q, k)
        shift = torch.maximum(state.shift, lk.amax(-1))
        kf = torch.exp(lk - shift.unsqueeze(-1)) * self.nb_features ** -0.5
        sums = state.sums * (state.shift - shift).exp()[..., None, None] + kf.unsqueeze(-1) * v.unsqueeze(-2)
        return (qf.unsqueeze(-2) @ sums).squeeze(-2), FavorState(sums, shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.redraw_interval > 0:
            if int(self.calls_since_redraw) >= self.redraw_interval:
                self.redraw_features()
            self.calls_since_redraw += 1
        return super().forward(x)


class LinearAttentionLayer(nn.Module):
    """SASRec's post-LN layer with causal linear attention: FFN(attention(x)), and its ``step``."""

    def __init__(self, attention: CausalLinearAttention, hidden_size: int, inner_size: int, hidden_dropout: float,
                 act: str, eps: float) -> None:
        super().__init__()
        self.attention = attention
        self.feed_forward = FeedForward(hidden_size, inner_size, hidden_dropout, act, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.attention(x))

    def step(self, x_t: torch.Tensor, state):
        h, state = self.attention.step(x_t, state)
        return self.feed_forward(h), state
