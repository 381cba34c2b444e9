"""The linear recurrent unit (LRU; Orvieto et al., ICML 2023) as LRURec releases it, with a streaming step.

For x: B x L x D and a complex state of N channels (LRURec: N = 2D)::

    nu, theta, gamma = exp(params_log)            params_log: 3 x N, learned (gamma too)
    lambda = exp(-nu + i theta)                   diagonal, |lambda| = exp(-nu) < 1
    h_t    = lambda * h_(t-1) + gamma * (B x_t + b)       B in C^(N x D), b in C^N; h_(-1) = 0
    y_t    = Re(C h_t + c)                        C in C^(D x N); only Re(c) matters

Complex weights are kept as real tensors (so ``.double()``, safetensors, the optimiser and ONNX
see ordinary parameters): ``in_proj`` (D -> 2N) holds [Re B; Im B] and [Re b; Im b] in its rows,
``out_proj`` (2N -> D) holds [Re C, -Im C] in its columns and Re c as its bias, so
y_t = out_proj([Re h_t, Im h_t]). The recurrence runs in parallel over time by the chunked scan of
``ops/linear_scan.py``; ``step`` advances one position in O(1) from a B x 2 x N state
(real and imaginary parts), kept in at least float32, as is the scan.

Initialisation (``reset_ring``): eigenvalues uniform on the ring r_min <= |lambda| <= r_max in the
complex plane (|lambda|^2 uniform in [r_min^2, r_max^2]) with phases uniform in (0, max_phase],
and gamma = sqrt(1 - |lambda|^2), so that an i.i.d. input gives a state of the input's scale.
The projections are left to the caller (LRURec: a truncated normal).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlsa4rec.layers.precision import state_dtype
from mlsa4rec.ops.linear_scan import linear_scan, powers


class LRU(nn.Module):
    def __init__(self, d_model: int, d_state: int, r_min: float = 0.8, r_max: float = 0.99,
                 max_phase: float = 2 * math.pi) -> None:
        super().__init__()
        if d_model < 1 or d_state < 1:
            raise ValueError(f"d_model and d_state must be >= 1, got {d_model} and {d_state}")
        if not 0.0 < r_min <= r_max < 1.0:
            raise ValueError(f"the eigenvalue ring needs 0 < r_min <= r_max < 1, got r_min={r_min}, r_max={r_max}")
        if not max_phase > 0.0:
            raise ValueError(f"max_phase must be > 0, got {max_phase}")
        self.d_model = d_model
        self.d_state = d_state
        self.r_min = r_min
        self.r_max = r_max
        self.max_phase = max_phase
        self.params_log = nn.Parameter(torch.empty(3, d_state))  # rows: log nu, log theta, log gamma
        self.in_proj = nn.Linear(d_model, 2 * d_state)
        self.out_proj = nn.Linear(2 * d_state, d_model)
        self.reset_ring()

    @torch.no_grad()
    def reset_ring(self) -> None:
        """The ring initialisation of the eigenvalues and the matching gamma (module docstring)."""
        n = self.d_state
        u1 = torch.rand(n, dtype=torch.float64)
        u2 = 1.0 - torch.rand(n, dtype=torch.float64)  # (0, 1]: log theta stays finite
        nu = -0.5 * torch.log(u1 * (self.r_max ** 2 - self.r_min ** 2) + self.r_min ** 2)
        theta = self.max_phase * u2
        gamma = torch.sqrt(1.0 - torch.exp(-2.0 * nu))
        self.params_log.copy_(torch.stack([nu.log(), theta.log(), gamma.log()]))

    def eigen(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(nu, theta, gamma) in ``dtype``: lambda = exp(-nu + i theta)."""
        nu, theta, gamma = torch.exp(self.params_log.to(dtype)).unbind(0)
        return nu, theta, gamma

    def _in_weights(self, dtype: torch.dtype, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma folded into [Re B; Im B] and [Re b; Im b]: (2N x D, 2N)."""
        g = gamma.repeat(2)
        return self.in_proj.weight.to(dtype) * g[:, None], self.in_proj.bias.to(dtype) * g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x L x D -> B x L x D, the recurrence run over the whole sequence from h = 0.

        The scan's channel-major layout (2 x N x B x L) comes out of in_proj computed as W x^T and
        goes into out_proj as h^T W^T, so no large tensor is transposed."""
        batch, length, d = x.shape
        dtype = state_dtype(x.dtype)
        nu, theta, gamma = self.eigen(dtype)
        w, b = self._in_weights(dtype, gamma)
        u = torch.addmm(b[:, None], w, x.reshape(batch * length, d).to(dtype).T)     # 2N x BL
        h = linear_scan(u.view(2, self.d_state, batch, length), nu, theta)
        h = h.reshape(2 * self.d_state, batch * length).T.to(x.dtype)                 # BL x 2N: [Re h, Im h]
        return self.out_proj(h).view(batch, length, d)

    def initial_state(self, batch: int, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
        """h = 0 for ``batch`` sequences: B x 2 x N (real, imaginary), in at least float32."""
        w = self.in_proj.weight
        return torch.zeros(batch, 2, self.d_state, device=device or w.device,
                           dtype=state_dtype(dtype or w.dtype))

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One position: x_t (B x D) and h_(t-1) (B x 2 x N) -> (y_t, B x D; h_t)."""
        if state.shape[0] != x_t.shape[0]:
            raise ValueError(f"the state holds {state.shape[0]} sequences but the input has {x_t.shape[0]}; "
                             "build it with initial_state(batch) for this batch")
        nu, theta, gamma = self.eigen(state.dtype)
        lam_re, lam_im = powers(nu, theta, torch.ones((), dtype=torch.long, device=nu.device))
        w, b = self._in_weights(state.dtype, gamma)
        u_re, u_im = torch.addmm(b, x_t.to(state.dtype), w.T).view(-1, 2, self.d_state).unbind(1)
        h_re, h_im = state.unbind(1)
        h = torch.stack([lam_re * h_re - lam_im * h_im + u_re, lam_re * h_im + lam_im * h_re + u_im], 1)
        return self.out_proj(h.reshape(-1, 2 * self.d_state).to(x_t.dtype)), h
