"""The selective scan as compiled CPU loops (numba), forward and hand-written backward.

Why a compiled loop: the scan's state is B x d_inner x N per step, and every PyTorch formulation
either materialises all L of them (parallel/chunked scans: gigabytes, bound by memory traffic)
or pays a dozen tensor passes per step. Here one (batch row, channel) pair is scanned at a time
with its N states in registers, so the only memory traffic is the inputs and outputs themselves.

Why a hand-written ``exp``: LLVM vectorises the inner loop over the N states only if every call
in it can be vectorised, and numba's ``math.exp`` is a scalar libm call unless Intel's SVML
happens to be installed. The float32 ``_exp`` is exp(x) = 2^k * p(r) with a degree-6
polynomial, which compiles to plain vector arithmetic: within 5 ulp (relative error <= 4.5e-7)
of the exact value on [-87.3, 88.3]. It saturates instead of overflowing: below -87.3 it returns
1.2e-38 (not 0; harmless, it only ever scales a state), above 88.3 it returns 2.2e38 (not inf;
reachable only with A > 0, where the reference gives inf). float64 inputs use ``math.exp``: they
are for checking, not for speed.

Only the recurrence itself is here (y_t = <C_t, h_t>): softplus, the D skip and the SiLU(z) gate
are elementwise and run as vectorised tensor ops around it, which also keeps scalar libm calls
(log1p, exp of a sigmoid) out of these loops. Backward recomputes the states of one (row,
channel) pair into an L x N scratch buffer (it stays in cache), then sweeps time in reverse.
A's gradient sums over the batch, so it is written per row and reduced by the caller: the
parallel loop over rows has no write races.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import float32, float64, int32, njit, prange
from numba.extending import intrinsic, overload

_FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}  # no "nnan"/"ninf": NaN and inf inputs propagate


@intrinsic
def _bits_to_float32(typingctx, bits):
    """Reinterpret an int32's bits as a float32 (LLVM bitcast, vectorisable)."""
    if bits != int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return float32(int32), codegen


def _exp(x):  # pragma: no cover - replaced by the overloads below inside compiled code
    return math.exp(x)


@overload(_exp)  # inlined into the kernels, which compile with _FLAGS
def _exp_overload(x):
    if x == float32:
        def exp32(x):
            x = min(max(x, float32(-87.3)), float32(88.3))
            k = np.floor(x * float32(1.4426950408889634) + float32(0.5))
            r = x - k * float32(0.693145751953125) - k * float32(1.428606765330187e-06)
            p = float32(1.0 / 720.0)
            p = p * r + float32(1.0 / 120.0)
            p = p * r + float32(1.0 / 24.0)
            p = p * r + float32(1.0 / 6.0)
            p = p * r + float32(0.5)
            p = p * r + float32(1.0)
            p = p * r + float32(1.0)
            return p * _bits_to_float32(int32((int32(k) + int32(127)) << int32(23)))
        return exp32
    if x == float64:
        return lambda x: math.exp(x)
    return None


@njit(parallel=True, fastmath=_FLAGS, cache=True)
def scan_fwd(u, dt, A, Bt, Ct, y, last):
    """y[b,c,t] = <C_t, h_t> with h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t; last = h_L."""
    batch, d_inner, length = u.shape
    n_state = A.shape[1]
    zero = np.zeros(1, dtype=u.dtype)[0]
    for bc in prange(batch * d_inner):
        b = bc // d_inner
        c = bc % d_inner
        h = np.zeros(n_state, dtype=u.dtype)
        for t in range(length):
            step = dt[b, c, t]
            dtx = step * u[b, c, t]
            acc = zero
            for n in range(n_state):
                hn = _exp(step * A[c, n]) * h[n] + dtx * Bt[b, t, n]
                h[n] = hn
                acc += hn * Ct[b, t, n]
            y[b, c, t] = acc
        for n in range(n_state):
            last[b, c, n] = h[n]


@njit(parallel=True, fastmath=_FLAGS, cache=True)
def scan_bwd(u, dt, A, Bt, Ct, dy, dlast, du, ddt, dBt, dCt, dA_rows):
    """Gradients of ``scan_fwd``'s outputs (dy, dlast); dBt and dCt must be zeroed by the caller."""
    batch, d_inner, length = u.shape
    n_state = A.shape[1]
    zero = np.zeros(1, dtype=u.dtype)[0]
    for b in prange(batch):
        hs = np.zeros((length + 1, n_state), dtype=u.dtype)  # hs[t + 1] = state after step t
        decay = np.empty((length, n_state), dtype=u.dtype)
        dh = np.empty(n_state, dtype=u.dtype)
        dA_c = np.empty(n_state, dtype=u.dtype)
        h = np.empty(n_state, dtype=u.dtype)
        for c in range(d_inner):
            h[:] = zero
            for t in range(length):  # recompute this (row, channel)'s states
                step = dt[b, c, t]
                dtx = step * u[b, c, t]
                for n in range(n_state):  # the state is carried in h: reading it back from hs
                    a = _exp(step * A[c, n])  # would stop LLVM from vectorising (possible aliasing)
                    decay[t, n] = a
                    hn = a * h[n] + dtx * Bt[b, t, n]
                    h[n] = hn
                    hs[t + 1, n] = hn
            for n in range(n_state):
                dh[n] = dlast[b, c, n]
                dA_c[n] = zero
            for t in range(length - 1, -1, -1):
                step = dt[b, c, t]
                x = u[b, c, t]
                g = dy[b, c, t]
                dtx = step * x
                dh_b = zero  # sum_n dh_n B_n
                dh_ha = zero  # sum_n dh_n h_{t-1,n} a_n A_n
                for n in range(n_state):
                    dhn = dh[n] + g * Ct[b, t, n]
                    dCt[b, t, n] += g * hs[t + 1, n]
                    bn = Bt[b, t, n]
                    dBt[b, t, n] += dhn * dtx
                    dh_b += dhn * bn
                    a = decay[t, n]
                    da = dhn * hs[t, n] * a
                    dh_ha += da * A[c, n]
                    dA_c[n] += da * step
                    dh[n] = dhn * a
                du[b, c, t] = dh_b * step
                ddt[b, c, t] = dh_b * x + dh_ha
            for n in range(n_state):
                dA_rows[b, c, n] = dA_c[n]
