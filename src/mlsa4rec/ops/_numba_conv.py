"""Mamba's causal depthwise convolution and its SiLU as compiled CPU loops (numba), forward and
hand-written backward, channels last (x: batch x L x d_inner, weight: K x d_inner).

Why: on CPU, PyTorch's depthwise ``conv1d`` backward took 12 % of an MLSA4Rec training step (41 ms
for a 1,024 x 10 batch, against 2 ms forward), and the SiLU after it two more passes each way. Here
one batch row is done at a time, the innermost loop over its contiguous channels (vectorised), the
pre-activation recomputed in backward instead of stored. The weight and bias gradients sum over
the batch, so they are written per row and reduced by the caller (no write races).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mlsa4rec.ops._numba_scan import _FLAGS, _exp


@njit(fastmath=_FLAGS, cache=True, inline="always")
def _preactivation(x, w, bias, b, t, acc):
    """acc[c] = bias[c] + sum_k w[k, c] x[b, t - (K - 1) + k, c], the left padding being zeros."""
    width = w.shape[0]
    acc[:] = bias
    for k in range(width):
        s = t - (width - 1) + k
        if s >= 0:
            for c in range(acc.shape[0]):
                acc[c] += w[k, c] * x[b, s, c]


@njit(parallel=True, fastmath=_FLAGS, cache=True)
def conv_silu_fwd(x, w, bias, out):
    """out = SiLU(causal depthwise conv(x)): out[b, t, c] = v / (1 + exp(-v)) with v the pre-activation."""
    batch, length, d_inner = x.shape
    one = np.ones(1, dtype=x.dtype)[0]
    for b in prange(batch):
        acc = np.empty(d_inner, dtype=x.dtype)
        for t in range(length):
            _preactivation(x, w, bias, b, t, acc)
            for c in range(d_inner):
                v = acc[c]
                out[b, t, c] = v / (one + _exp(-v))


@njit(parallel=True, fastmath=_FLAGS, cache=True)
def conv_silu_bwd(x, w, bias, dout, dx, dw_rows, dbias_rows):
    """dx (batch x L x d_inner), and per row the gradients of w (K x d_inner) and bias (d_inner)."""
    batch, length, d_inner = x.shape
    width = w.shape[0]
    zero, one = np.zeros(1, dtype=x.dtype)[0], np.ones(1, dtype=x.dtype)[0]
    for b in prange(batch):
        acc = np.empty(d_inner, dtype=x.dtype)
        dpre = np.empty(d_inner, dtype=x.dtype)
        dw = np.zeros((width, d_inner), dtype=x.dtype)
        dbias = np.zeros(d_inner, dtype=x.dtype)
        dx[b] = zero
        for t in range(length):
            _preactivation(x, w, bias, b, t, acc)
            for c in range(d_inner):
                v = acc[c]
                sig = one / (one + _exp(-v))
                g = dout[b, t, c] * sig * (one + v * (one - sig))  # SiLU'(v) = s (1 + v (1 - s))
                dpre[c] = g
                dbias[c] += g
            for k in range(width):
                s = t - (width - 1) + k
                if s >= 0:
                    for c in range(d_inner):
                        dx[b, s, c] += w[k, c] * dpre[c]
                        dw[k, c] += dpre[c] * x[b, s, c]
        dw_rows[b] = dw
        dbias_rows[b] = dbias
