"""The selective scan as torch's ``scan`` higher-order operator: one loop that tracers keep.

The other implementations cannot be traced with a dynamic length: the reference's and the torch
loop's Python loops are unrolled to the example's length, and the numba, Triton and CUDA kernels
are opaque. ``torch.export`` keeps ``scan`` as one loop over the positions, and the ONNX exporter
turns it into an ONNX ``Scan``, so an exported Mamba graph takes histories of any length.

It materialises the per-step decay and input (B x L x d_inner x N) like the reference does, and
autograd differentiates it: it is for export and for checks, not for training.
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.scan import scan  # ImportError on a torch without it: the dispatcher falls back

from mlsa4rec.ops._reference import dt, skip_and_gate


def selective_scan_traceable(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                             delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                             return_last_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``ops.selective_scan`` (same arguments and layout); computes in float32 (or float64) and
    returns the input's dtype, like the other implementations."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    u_, delta_, A_, B_, C_ = (x.to(dtype) for x in (u, delta, A, B, C))
    step = dt(delta_, None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    # per position t (scanned along dim 1): decay_t = exp(dt_t A), drive_t = dt_t u_t B_t, C_t
    decay = torch.exp(step.transpose(1, 2)[..., None] * A_)                                # B x L x d x N
    drive = (step * u_).transpose(1, 2)[..., None] * B_.transpose(1, 2)[:, :, None, :]     # B x L x d x N
    c = C_.transpose(1, 2)                                                                 # B x L x N

    def combine(h: torch.Tensor, xs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        decay_t, drive_t, c_t = xs
        h = decay_t * h + drive_t
        return h, (h * c_t[:, None, :]).sum(-1)

    h0 = u_.new_zeros(u_.shape[0], u_.shape[1], A_.shape[1])
    last, ys = scan(combine, h0, (decay, drive, c), dim=1)                                 # ys: B x L x d
    y = skip_and_gate(ys.transpose(1, 2), u_, D, z).to(u.dtype)
    return (y, last.to(u.dtype)) if return_last_state else y
