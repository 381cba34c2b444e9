"""The complex diagonal linear recurrence of the LRU, in parallel over time, with its loop beside it.

For channel n, sequence b and time t (u: 2 x N x B x L, real and imaginary parts first; nu, theta: N)::

    lambda_n = exp(-nu_n + i theta_n)              |lambda_n| = exp(-nu_n), < 1 for nu_n > 0
    h_t      = lambda * h_(t-1) + u_t ,     h_(-1) = 0          (h: 2 x N x B x L, as u)

Complex numbers travel as (real, imaginary) planes of real tensors: any real dtype works
(float64 in the tests), autograd needs nothing special, and the graphs export to ONNX, which has
no complex type. The layout is channel-major with time last, so that every channel's sequences
are rows of a matrix: a Linear layer computed as ``W @ x^T`` produces it and ``h^T @ W^T``
consumes it without a transpose, and each step of the scan is one batched matmul over the
channels. Powers are always computed as lambda^k = exp(-k nu) (cos k theta + i sin k theta),
never as repeated products or negative powers, so no factor exceeds 1 in magnitude.

* ``linear_scan_reference`` - the definition: a loop over t (autograd through every step).
* ``linear_scan`` - a two-level chunked scan. Time is cut into chunks of T steps (the last one padded
  with zeros, which come after every real step and so change nothing before them):

  1. inside every chunk at once, h^loc_t = sum_(s <= t in the chunk) lambda^(t-s) u_s: per channel a
     T x T lower-triangular Toeplitz matrix of powers, applied to all B x L/T chunks by batched
     matmuls (four real ones for the complex product);
  2. the state before chunk c, S_c = sum_(c' < c) lambda^(T (c - 1 - c')) h^loc_(c', T-1), from the chunks'
     end states by the same construction one level up: a C x C strictly lower-triangular Toeplitz
     matrix of powers of lambda^T (C = L / T chunks);
  3. h_(c, t) = h^loc_(c, t) + lambda^(t+1) S_c   (a rank-2 update of every chunk's row).

  Two levels of dense batched matmuls, nothing sequential: work O(B N (L T + L^2 / T^2))
  multiply-adds, the second term below the first up to L = T^3 = 4096; memory O(B L N) plus the
  N x T x T and N x C x C matrices of powers. No branch depends on L, so torch.export keeps the
  length dynamic (the LRU's ONNX encoder graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 16


def _check(u: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor) -> None:
    if u.dim() != 4 or u.shape[0] != 2:
        raise ValueError(f"u must be 2 x N x B x L (real and imaginary planes), got {tuple(u.shape)}")
    n = u.shape[1]
    if nu.shape != (n,) or theta.shape != (n,):
        raise ValueError(f"nu and theta must have shape ({n},), got {tuple(nu.shape)} and {tuple(theta.shape)}")


def powers(nu: torch.Tensor, theta: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lambda^k for integer exponents ``k`` (any shape, >= 0): (real, imaginary), each of shape
    (N,) + k.shape, in the dtype of nu.

    Computed in float64 (where the device has it): in float32 the angle k theta would lose its
    absolute precision for large k (at k theta ~ 10^4 rad, one ulp is 10^-3 rad), so the matrices
    of powers are exact to rounding whatever the lag, as repeated products are only on average."""
    work = nu.dtype if nu.device.type == "mps" else torch.promote_types(nu.dtype, torch.float64)
    k = k.to(work)
    shape = (-1,) + (1,) * k.dim()
    magnitude = torch.exp(-k * nu.to(work).reshape(shape))
    angle = k * theta.to(work).reshape(shape)
    return (magnitude * torch.cos(angle)).to(nu.dtype), (magnitude * torch.sin(angle)).to(nu.dtype)


def linear_scan_reference(u: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """h_t = lambda h_(t-1) + u_t as a loop over t: h, 2 x N x B x L."""
    _check(u, nu, theta)
    lam_re, lam_im = (p[:, None] for p in powers(nu, theta, torch.ones((), dtype=torch.long, device=nu.device)))
    h_re, h_im = torch.zeros_like(u[0, :, :, 0]), torch.zeros_like(u[1, :, :, 0])
    out = []
    for t in range(u.shape[-1]):
        h_re, h_im = lam_re * h_re - lam_im * h_im + u[0, :, :, t], lam_re * h_im + lam_im * h_re + u[1, :, :, t]
        out.append(torch.stack([h_re, h_im]))
    return torch.stack(out, -1) if out else u.clone()


def linear_scan(u: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """The chunked scan (module docstring): the same h as ``linear_scan_reference``, 2 x N x B x L."""
    _check(u, nu, theta)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    _, n, rows, length = u.shape
    u = F.pad(u, (0, (-length) % chunk))                 # whole chunks; the zeros come after every real step
    chunks = u.shape[-1] // chunk
    u_re = u[0].reshape(n, rows * chunks, chunk)          # one row per chunk
    u_im = u[1].reshape(n, rows * chunks, chunk)

    # 1. inside the chunks: P[n, t, s] = lambda_n^(t-s) for s <= t, else 0; h^loc = P u per chunk row
    p_re, p_im = _toeplitz(nu, theta, chunk, shift=0, stride=1)
    h_re = torch.bmm(u_re, p_re).baddbmm_(u_im, p_im, alpha=-1)
    h_im = torch.bmm(u_re, p_im).baddbmm_(u_im, p_re)

    # 2. the state before every chunk: S_c = sum_(c' < c) lambda^(T (c - 1 - c')) h^loc_(c', T-1)
    e_re = h_re[:, :, -1].reshape(n, rows, chunks)
    e_im = h_im[:, :, -1].reshape(n, rows, chunks)
    s_re, s_im = _toeplitz(nu, theta, chunks, shift=1, stride=chunk)
    before_re = torch.bmm(e_re, s_re).baddbmm_(e_im, s_im, alpha=-1)
    before_im = torch.bmm(e_re, s_im).baddbmm_(e_im, s_re)
    before = torch.stack([before_re, before_im], -1).reshape(n, rows * chunks, 2)

    # 3. + lambda^(t+1) S_c in every position t of chunk c: a rank-2 update of each chunk's row
    q_re, q_im = powers(nu, theta, torch.arange(1, chunk + 1, device=nu.device))     # N x T
    h_re = torch.baddbmm(h_re, before, torch.stack([q_re, -q_im], 1))
    h_im = torch.baddbmm(h_im, before, torch.stack([q_im, q_re], 1))
    return torch.stack([h_re, h_im]).reshape(2, n, rows, chunks * chunk)[..., :length]


def _toeplitz(nu: torch.Tensor, theta: torch.Tensor, size, shift: int, stride: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The transposed lower-triangular Toeplitz matrices of lambda^(stride (i - j - shift)) for
    i - j >= shift (0 elsewhere): (real, imaginary), each N x size x size, to right-multiply rows."""
    k = torch.arange(size, device=nu.device)
    lag = k[:, None] - k[None, :] - shift
    below = (lag >= 0).to(nu.dtype)
    p_re, p_im = powers(nu, theta, stride * lag.clamp(min=0))
    return (p_re * below).transpose(1, 2), (p_im * below).transpose(1, 2)
