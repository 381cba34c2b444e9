"""The Mamba block (mamba-ssm v1 ``Mamba``) in pure PyTorch, with a streaming step.

Same parameter names, shapes and default initialisation as ``mamba_ssm.modules.mamba_simple.Mamba``,
so a state dict moves between this module and the CUDA package unchanged. For u: B x L x D::

    x, z = split(in_proj(u))                      d_inner = expand * D each, no bias
    x    = SiLU(causal depthwise conv_K(x))       left-padded by K - 1
    dt_low, B, C = split(x_proj(x))               dt_rank, N, N
    Delta = softplus(dt_proj(dt_low))             (bias added inside the scan)
    A    = -exp(A_log)                            S4D-real: A_log = log(1..N) on every channel
    y    = selective_scan(x, Delta, A, B, C, D) * SiLU(z)
    out  = out_proj(y)                            no bias

``step`` advances one position in O(1): the state is the last K inputs of the convolution and
the B x d_inner x N SSM state. ``forward(u, return_state=True)`` also returns the state after
the last position, so a sequence can be read in full and then continued event by event.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mlsa4rec.layers.dropout import Dropout
from mlsa4rec.layers.precision import at_least_fp32, state_dtype
from mlsa4rec.ops import causal_conv_silu, selective_scan


class MambaState(NamedTuple):
    conv: torch.Tensor  # B x d_inner x K: the last K inputs of the convolution (oldest first)
    ssm: torch.Tensor  # B x d_inner x N


class Mamba(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,  # accepted for mamba-ssm compatibility; the scan is chosen by scan_impl
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        scan_impl: str = "auto",
    ) -> None:
        super().__init__()
        for key, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self.scan_impl = scan_impl

        # built, and random numbers drawn, in mamba-ssm's order: the same seed gives the same weights
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        # mamba-ssm's dt init: weights U(+-dt_rank^-1/2 * scale); bias = softplus^-1(dt) with dt
        # log-uniform in [dt_min, dt_max], so that Delta starts in that range
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt = torch.exp(torch.rand(self.d_inner, **factory) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # S4D-real, kept in fp32 as mamba-ssm does
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.A_log._no_weight_decay = True  # as mamba-ssm marks them
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Delta before softplus/bias, B and C from the convolved x (last dim = d_inner)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, u: torch.Tensor, return_state: bool = False):
        """B x L x D -> B x L x D (and the state after position L - 1 if ``return_state``).

        The returned state is the one after the last *column*: with right-padded sequences that
        is after the padding, so read each sequence unpadded (or by ``step``) to continue it.
        """
        length = u.shape[1]
        if length == 0:
            raise ValueError("Mamba got an empty sequence (length 0); give it at least one position")
        x, z = self.in_proj(u).chunk(2, dim=-1)                 # B x L x d_inner each
        x_conv = causal_conv_silu(x, self.conv1d.weight, self.conv1d.bias)  # B x L x d_inner
        dt, B, C = self._ssm_inputs(x_conv)
        A = -torch.exp(at_least_fp32(self.A_log))
        # the scan takes mamba-ssm's B x d_inner x L: transposed views, no copies
        out = selective_scan(x_conv.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                             at_least_fp32(self.D), z.transpose(1, 2), at_least_fp32(self.dt_proj.bias),
                             delta_softplus=True, return_last_state=return_state, impl=self.scan_impl)
        if not return_state:
            return self.out_proj(out.transpose(1, 2))
        y, ssm = out
        conv = F.pad(x.transpose(1, 2), (max(self.d_conv - length, 0), 0))[..., -self.d_conv:]
        return self.out_proj(y.transpose(1, 2)), MambaState(conv.contiguous(), at_least_fp32(ssm).contiguous())

    def initial_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
                      ) -> MambaState:
        """The state before any input (zeros), for ``step``. The SSM state is kept in fp32 (as
        mamba-ssm's inference cache allows) so that long streams in half precision do not drift."""
        w = self.in_proj.weight
        device, dtype = device or w.device, dtype or w.dtype
        return MambaState(torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype),
                          torch.zeros(batch, self.d_inner, self.d_state, device=device,
                                      dtype=state_dtype(dtype)))

    def step(self, u_t: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One position: u_t (B x D, or mamba-ssm's B x 1 x D) and the state -> (y_t of the same
        shape, the new state); O(1) in the length of what came before."""
        if u_t.dim() == 3:
            if u_t.shape[1] != 1:
                raise ValueError(f"step takes one position (B x D or B x 1 x D), got shape {tuple(u_t.shape)}")
            y, new = self.step(u_t[:, 0], state)
            return y[:, None], new
        if state.conv.shape[0] != u_t.shape[0] or state.ssm.shape[0] != u_t.shape[0]:
            raise ValueError(f"the state holds {state.conv.shape[0]} sequences but the input has {u_t.shape[0]}; "
                             "build it with initial_state(batch) for this batch")
        x, z = self.in_proj(u_t).chunk(2, dim=-1)
        conv = torch.cat([state.conv[..., 1:], x[..., None].to(state.conv.dtype)], dim=-1)
        x = F.silu((conv * self.conv1d.weight.squeeze(1)).sum(-1)
                   + (self.conv1d.bias if self.conv1d.bias is not None else 0)).to(u_t.dtype)
        dt, B, C = self._ssm_inputs(x)
        dt = F.softplus(dt + self.dt_proj.bias)
        A = -torch.exp(at_least_fp32(self.A_log))
        ssm = torch.exp(dt[..., None] * A) * state.ssm + (dt * x)[..., None] * B[:, None, :]
        ssm = ssm.to(state.ssm.dtype)
        y = (ssm * C[:, None, :]).sum(-1) + at_least_fp32(self.D) * x
        return self.out_proj((y * F.silu(z)).to(u_t.dtype)), MambaState(conv, ssm)


class MambaResidual(nn.Module):
    """X -> LN(Drop(Mamba(X)) + X), or LN(Drop(Mamba(X))) with ``residual=False``: MLSA4Rec's Mamba
    normalization layer, and Mamba4Rec's layer before its feed-forward."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dropout: float, eps: float = 1e-12,
                 *, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.mamba = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.dropout = Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.mamba(x))
        return self.LayerNorm(h + x if self.residual else h)

    def step(self, x_t: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """``forward`` at one position: x_t (B x D) and the Mamba state -> (B x D, new state)."""
        h, state = self.mamba.step(x_t, state)
        h = self.dropout(h)
        return self.LayerNorm(h + x_t if self.residual else h), state
