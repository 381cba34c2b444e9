"""SiLU(causal depthwise convolution), the first half of a Mamba block's mixer, behind one function.

``causal_conv_silu(x, weight, bias)`` takes channels-last x (B x L x d_inner) and ``nn.Conv1d``'s
depthwise weight (d_inner x 1 x K) and bias, and returns SiLU(conv(x)) (B x L x d_inner), where
position t sees positions t - K + 1 .. t (left-padded with zeros). On CPU in float32/float64 it
runs the compiled kernels of ``_numba_conv``; elsewhere (a GPU, half precision, no numba) it is
``causal_conv_silu_reference``: PyTorch's ``conv1d`` and ``silu``, which the tests pin it to. So is
it while a graph is traced (``torch.compile``, ``torch.export``), which cannot see into numba, and
inside ``use_implementation`` blocks that choose a scan other than ``cpu`` (export's ``traceable``):
the switch that picks the ops floor's implementations picks this one too.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mlsa4rec.ops.scan import _announce, _forced, _kernel_lock, _numba_kernels, _numba_threads

_kernels: list = []  # [module or None] once the first call has tried to load and compile them


def causal_conv_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The definition by ``conv1d`` (padded by K - 1 on both sides, the right trimmed): B x L x d_inner."""
    length, width = x.shape[1], weight.shape[-1]
    conv = F.conv1d(x.transpose(1, 2), weight, bias, padding=width - 1, groups=weight.shape[0])
    return F.silu(conv[..., :length]).transpose(1, 2)


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU(causal depthwise conv(x)) for x: B x L x d_inner; the compiled kernel where it runs."""
    if _compiled_kernel_runs(x, weight, bias):
        return _NumbaConvSiLU.apply(x, weight, bias)
    return causal_conv_silu_reference(x, weight, bias)


def _compiled_kernel_runs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.numel() == 0:
        return False
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    if torch.compiler.is_compiling() or _forced.get() not in (None, "auto", "cpu"):
        return False
    return _conv_kernels() is not None


def _conv_kernels():
    """The compiled kernels, or None where the scan's own numba kernels are unavailable or these do
    not compile (logged once); compiled on a tiny input at the first call, as the scan's are."""
    if not _kernels:
        module = None
        if _numba_kernels() is not None:
            try:
                from mlsa4rec.ops import _numba_conv

                one = np.ones((1, 1, 1), dtype=np.float32)
                _numba_conv.conv_silu_fwd(one, one[0], one[0, 0], np.empty_like(one))
                _numba_conv.conv_silu_bwd(one, one[0], one[0, 0], one, np.empty_like(one), np.empty_like(one),
                                          np.empty_like(one[0]))
                module = _numba_conv
            except Exception as exc:  # numba failing to compile these on this platform
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                _announce("numba-conv-missing", f"causal convolution: the compiled CPU kernel is unavailable "
                          f"({reason}); using PyTorch's conv1d", logging.WARNING)
        _kernels.append(module)
    return _kernels[0]


class _NumbaConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        kernels = _conv_kernels()
        x_ = x.detach().contiguous()
        w = weight.detach()[:, 0, :].t().contiguous()  # K x d_inner
        b = x_.new_zeros(x.shape[2]) if bias is None else bias.detach().contiguous()
        out = torch.empty_like(x_)
        with _kernel_lock:
            _numba_threads()
            kernels.conv_silu_fwd(x_.numpy(), w.numpy(), b.numpy(), out.numpy())
        ctx.save_for_backward(x_, w, b)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        kernels = _conv_kernels()
        x, w, b = ctx.saved_tensors
        dout = dout.contiguous()
        dx = torch.empty_like(x)
        dw_rows = x.new_empty(x.shape[0], *w.shape)
        db_rows = x.new_empty(x.shape[0], x.shape[2])
        with _kernel_lock:
            _numba_threads()
            kernels.conv_silu_bwd(*(t.numpy() for t in (x, w, b, dout, dx, dw_rows, db_rows)))
        dweight = dw_rows.sum(0).t()[:, None, :]  # d_inner x 1 x K, conv1d's layout
        return dx, dweight, db_rows.sum(0) if ctx.has_bias else None
