"""The selective scan's definition and the elementwise pieces every implementation shares.

Below ``scan`` (the dispatcher) and the kernel modules: the kernels check themselves against this
definition, and the dispatcher imports the kernels, so it lives apart from both (no import cycle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dt(delta: torch.Tensor, delta_bias: torch.Tensor | None, softplus: bool) -> torch.Tensor:
    """The step size Delta: ``delta + delta_bias``, through softplus if asked."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if softplus else delta


def skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """``(y + D u) * SiLU(z)``, each term only when given."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    return y * F.silu(z.to(y.dtype)) if z is not None else y


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
    """The definition, one step at a time, differentiated by autograd (for tests: slow, exact).
    Computes in at least float32 and returns the input's dtype, as mamba-ssm's reference does."""
    in_dtype = u.dtype
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (x.to(dtype) for x in (u, delta, A, B, C))
    step = dt(delta, None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(step[:, :, t, None] * A) * h + (step[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)
    y = skip_and_gate(y, u, D, z).to(in_dtype)
    return (y, h.to(in_dtype)) if return_last_state else y
