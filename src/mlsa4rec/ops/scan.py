"""The selective scan of Mamba (S6) behind one function, with mamba-ssm's layout and semantics.

For channel c, state n and step t (shapes: u, delta, z: B x d_inner x L; A: d_inner x N;
B, C: B x N x L; D, delta_bias: d_inner)::

    dt_t = softplus(delta_t + delta_bias)       (softplus only if delta_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t          h_0 = 0
    y_t  = <C_t, h_t> + D * u_t ;   out_t = y_t * SiLU(z_t)   (if z is given)

Implementations (``impl`` argument, or ``MLSA4REC_SCAN`` when impl="auto"):

* ``reference`` - the definition as a plain loop through autograd; any dtype incl. float64.
* ``cpu`` - compiled numba loops with a hand-written backward (``_numba_scan``): the default for
  CPU tensors. Falls back to ``torch`` (with a warning, once) if numba cannot be imported or
  cannot compile the kernels.
* ``cuda`` - mamba-ssm's fused kernel when ``mamba_ssm`` imports and the tensors are on a GPU
  (``pip install mlsa4rec[cuda]``). float64 (which the kernel does not take) and a differentiable
  last state (whose gradient its backward drops) go to ``triton`` instead, or ``torch`` without it.
* ``triton`` - a Triton kernel with a hand-written, checkpointed backward (``_triton_scan``):
  fast on any recent NVIDIA GPU with nothing to compile (Triton ships with CUDA builds of torch;
  ``pip install mlsa4rec[triton]`` otherwise). fp16/bf16 inputs keep fp32 states. On CPU tensors
  it runs only under ``TRITON_INTERPRET=1`` (Triton's interpreter: for tests). Falls back to
  ``torch`` (logged once) when Triton is missing or fails a one-off self-check.
* ``auto`` on a GPU: mamba-ssm if it imports, else ``triton``, else ``torch``
  (``PREFER_MAMBA_SSM`` decides the order of the first two).
* ``torch`` - pure PyTorch on any device: a sequential loop over time whose backward is written
  by hand and recomputes states from checkpoints every ``_CHUNK`` steps, so memory stays
  O(B d N L / chunk) instead of autograd's O(B d N L) per-step graph.
* ``traceable`` - the recurrence as torch's ``scan`` operator (``_traceable_scan``), which
  ``torch.export`` keeps as one loop with a dynamic length (an ONNX ``Scan``): what ``mlsa4rec
  export`` traces, chosen with ``use_implementation("traceable")``. Any device; differentiable,
  but it holds B x L x d_inner x N like the reference. Falls back to ``torch`` (logged once) on a
  torch without the operator.

``use_implementation(name)`` makes every call in a block (of this thread or task) run ``name``
whatever its ``impl`` argument: how a caller above the model picks the scan of layers it does not
build, without reaching into them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import threading
from collections.abc import Iterator

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from mlsa4rec.errors import ConfigError
from mlsa4rec.ops._reference import dt as _dt
from mlsa4rec.ops._reference import selective_scan_reference
from mlsa4rec.ops._reference import skip_and_gate as _skip_and_gate

log = logging.getLogger("mlsa4rec")

IMPLEMENTATIONS = ("auto", "reference", "cpu", "cuda", "triton", "torch", "traceable")
_MAMBA_SSM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what its kernel takes
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# impl="auto" on a GPU when both fused kernels are available. TODO(gpu_check): decide by
# measurement: benchmarks/gpu_check.py times `triton` against `cuda` at B=256, L=50..4000 on a
# machine with mamba-ssm installed; set False if `triton` is at least as fast there.
PREFER_MAMBA_SSM = True
_CHUNK = 16
_announced: set[str] = set()
# use_implementation's choice; a ContextVar, so a thread exporting a graph does not change the scan
# of a thread serving requests at the same time
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlsa4rec_selective_scan", default=None)


def _announce(key: str, message: str, level: int = logging.INFO) -> None:
    if key not in _announced:
        _announced.add(key)
        log.log(level, message)


_kernels: list = []  # [module or None] once the first call has tried to load and compile them
_kernel_lock = threading.Lock()  # numba's fallback threading layer (workqueue) aborts on concurrent calls


def _numba_kernels():
    """The compiled kernels, or None when numba is unavailable or cannot compile them (logged once).

    The first call compiles the float32 kernels on a tiny input (or loads them from numba's disk
    cache), so a platform where numba imports but cannot compile falls back here, not mid-training.
    """
    if not _kernels:
        # numba sizes its thread pool once, at import, to every core by default; with several
        # processes per machine (torchrun) the idle workers of each pool then compete for the
        # cores (measured: 32 -> 152 s per ML-1M epoch with 2 ranks). Size it like torch's.
        os.environ.setdefault("NUMBA_NUM_THREADS", str(torch.get_num_threads()))
        try:
            from mlsa4rec.ops import _numba_scan

            one = np.ones((1, 1, 1), dtype=np.float32)
            out = [np.zeros_like(one) for _ in range(5)]
            _numba_scan.scan_fwd(one, one, -one[0], one, one, out[0], out[1])
            _numba_scan.scan_bwd(one, one, -one[0], one, one, one, one, True, *out)
            _kernels.append(_numba_scan)
        except Exception as exc:  # ImportError, numba failing to initialise or to compile on this platform
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            _announce("numba-missing", f"selective scan: the compiled CPU kernel is unavailable ({reason}); using "
                      "the pure-PyTorch loop, which is about 10x slower on CPU (pip install numba)",
                      logging.WARNING)
            _kernels.append(None)
    return _kernels[0]


@functools.lru_cache(maxsize=1)  # an import that failed is not retried on every call
def _mamba_ssm_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # not installed, or built against another torch/CUDA
        _announce("mamba-ssm-missing", f"selective scan: mamba_ssm is not importable ({exc}); GPU tensors use the "
                  "Triton kernel, or the pure-PyTorch loop without Triton (pip install 'mlsa4rec[cuda]' for "
                  "mamba-ssm's)")
        return None
    return selective_scan_fn


@functools.lru_cache(maxsize=1)
def _traceable_fn():
    try:
        from mlsa4rec.ops._traceable_scan import selective_scan_traceable
    except Exception as exc:  # a torch without the scan operator (torch._higher_order_ops.scan)
        _announce("traceable-missing", f"selective scan: the traceable implementation needs torch's scan operator, "
                  f"which torch {torch.__version__} lacks ({exc}); using the pure-PyTorch loop", logging.WARNING)
        return None
    return selective_scan_traceable


_triton_modules: dict[str, object] = {}  # device type -> the kernel module, or None when unusable
_triton_lock = threading.Lock()


def _triton_kernels(device: torch.device):
    """The Triton kernel module for tensors on ``device``, or None (why is logged once).

    The first call per device type imports Triton and runs forward + backward once on a tiny
    problem against the reference (``_triton_scan.self_check``), so a missing Triton, a broken
    compiler toolchain or wrong numbers fall back here, once, not in the middle of training.
    CPU tensors work only when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1
    set before the first import): that path is for tests on machines without a GPU.
    """
    key = device.type
    if key in _triton_modules:
        return _triton_modules[key]
    with _triton_lock:  # one import and self-check, even when serving threads arrive together
        if key not in _triton_modules:
            _triton_modules[key] = _load_triton(key, device)
    return _triton_modules[key]


def _load_triton(key: str, device: torch.device):
    fallback = "the pure-PyTorch loop"
    try:
        from mlsa4rec.ops import _triton_scan

        if key == "cpu" and not _triton_scan.INTERPRET:
            _announce("triton-cpu", "selective scan: the triton implementation runs CUDA tensors (CPU tensors "
                      "only under TRITON_INTERPRET=1, for tests); using " + fallback)
            return None
        if key not in ("cpu", "cuda"):
            _announce(f"triton-{key}", f"selective scan: the triton implementation does not run on {key} tensors; "
                      f"using {fallback}")
            return None
        _triton_scan.self_check(device)
        return _triton_scan
    except Exception as exc:  # not installed, no driver/compiler for this GPU, or a failed self-check
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _announce("triton-missing", f"selective scan: the Triton kernel is unavailable ({reason}); using "
                  f"{fallback} (pip install 'mlsa4rec[triton]')", logging.WARNING)
        return None


def _usable(impl: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``impl`` can run here; the checks are ordered so that nothing is imported (or
    logged) for a device the implementation never runs on."""
    if impl == "cpu":
        return device.type == "cpu" and _numba_kernels() is not None
    if impl == "cuda":
        return device.type == "cuda" and dtype in _MAMBA_SSM_DTYPES and _mamba_ssm_fn() is not None
    if impl == "triton":
        return dtype in _TRITON_DTYPES and _triton_kernels(device) is not None
    if impl == "traceable":
        return _traceable_fn() is not None
    return True  # reference, torch


def check_environment() -> str:
    """The ``MLSA4REC_SCAN`` choice ("auto" when unset or empty), or a ConfigError naming it.

    The variable is a person's setting, so a typo must fail as one clear line when a command starts,
    not as a traceback when the first Mamba layer runs minutes into training.
    """
    raw = os.environ.get("MLSA4REC_SCAN", "")
    impl = raw.strip().lower() or "auto"
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"MLSA4REC_SCAN={raw!r} is not a selective-scan implementation; choose one of "
                          f"{', '.join(IMPLEMENTATIONS)} or unset it")
    return impl


@contextlib.contextmanager
def use_implementation(impl: str) -> Iterator[None]:
    """Within the block, every ``selective_scan`` call of this thread (or asyncio task) runs ``impl``,
    whatever its ``impl=`` argument (fallbacks apply as for ``impl=``). For callers above the model
    that need one implementation in layers they did not build: export traces with "traceable"."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown selective-scan implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    token = _forced.set(impl)
    try:
        yield
    finally:
        _forced.reset(token)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The implementation that runs for ``impl`` on ``device`` (after ``use_implementation``, the env
    override and fallbacks)."""
    impl = _forced.get() or impl
    if impl == "auto":
        impl = check_environment()
    if impl not in IMPLEMENTATIONS:  # impl= comes from code, not from a person: a bug, hence ValueError
        raise ValueError(f"unknown selective-scan implementation {impl!r} (impl=); choose one of "
                         f"{', '.join(IMPLEMENTATIONS)}")
    if impl == "auto" and device.type == "cuda":
        order = ("cuda", "triton") if PREFER_MAMBA_SSM else ("triton", "cuda")
        return next((name for name in order if _usable(name, device, dtype)), "torch")
    if impl == "auto":
        impl = "cpu"
    if not _usable(impl, device, dtype):  # an explicit choice that cannot run here
        impl = "triton" if impl == "cuda" and device.type == "cuda" and _usable("triton", device, dtype) else "torch"
    return impl


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """out (B x d_inner x L), and the final state (B x d_inner x N) if ``return_last_state``."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_impl(impl, u.device, u.dtype)
    if name == "cuda" and return_last_state and torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (u, delta, A, B, C, D, z, delta_bias)):
        # mamba-ssm's backward drops the gradient of the last state; triton's does not
        name = "triton" if _usable("triton", u.device, u.dtype) else "torch"
    threads = f", {torch.get_num_threads()} threads" if u.device.type == "cpu" else ""
    _announce(f"run-{name}-{u.device.type}", f"selective scan: {name} implementation on {u.device.type}{threads}")
    if name == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "traceable" and u.shape[2]:  # (the scan operator needs a position to scan)
        return _traceable_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "cuda":
        return _mamba_ssm_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "triton" and u.numel() and A.numel():  # (an empty problem has nothing to launch)
        y, last = _triton_kernels(u.device).selective_scan_triton(u, delta, A, B, C, D, z, delta_bias,
                                                                   delta_softplus)
        return (y, last.to(u.dtype)) if return_last_state else y
    core = _NumbaScan if name == "cpu" else _TorchLoopScan  # (and triton, traceable on an empty problem)
    dtype = u.dtype if u.dtype in (torch.float32, torch.float64) else torch.float32
    u_, A_, B_, C_ = (x.to(dtype) for x in (u, A, B, C))
    dt = _dt(delta.to(dtype), None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    y, last = core.apply(u_, dt, A_, B_, C_)
    y = _skip_and_gate(y, u_, D, z)
    y = y.to(u.dtype)
    return (y, last.to(u.dtype)) if return_last_state else y


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be batch x d_inner x L, got shape {tuple(u.shape)}")
    batch, d_inner, length = u.shape
    n_state = A.shape[-1]
    expected = {"delta": (delta, (batch, d_inner, length)), "A": (A, (d_inner, n_state)),
                "B": (B, (batch, n_state, length)), "C": (C, (batch, n_state, length)),
                "D": (D, (d_inner,)), "z": (z, (batch, d_inner, length)), "delta_bias": (delta_bias, (d_inner,))}
    for key, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {key} must have shape {shape}, got {tuple(tensor.shape)}")


class _NumbaScan(torch.autograd.Function):
    """The recurrence y_t = <C_t, h_t> on CPU through the compiled kernels.

    The kernels take channels last (``_numba_scan``), so u and dt (B x d_inner x L) are read as
    B x L x d_inner: free when they are transposed views of channels-last tensors, as the Mamba
    layer passes them, one copy otherwise. y comes back as such a view, so nothing after the scan
    copies either.
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        kernels = _numba_kernels()
        ctx.set_materialize_grads(False)
        args = [x.detach().transpose(-1, -2).contiguous() for x in (u, dt, A, B, C)]
        y = torch.empty_like(args[0])
        last = u.new_empty(u.shape[0], A.shape[1], u.shape[1])
        with _kernel_lock:
            _numba_threads()
            kernels.scan_fwd(*(x.numpy() for x in args), y.numpy(), last.numpy())
        ctx.save_for_backward(*args)
        return y.transpose(1, 2), last.transpose(1, 2)  # views: B x d_inner x L, B x d_inner x N

    @staticmethod
    @once_differentiable  # the kernel's gradients are not themselves differentiable
    def backward(ctx, dy, dlast):
        kernels = _numba_kernels()
        u, dt, A_t, Bt, Ct = ctx.saved_tensors  # channels last
        dy = torch.zeros_like(u) if dy is None else dy.detach().transpose(1, 2).contiguous()
        has_dlast = dlast is not None
        dlast = dlast.detach().transpose(1, 2).contiguous() if has_dlast else u.new_empty(1, 1, 1)
        du, ddt = torch.empty_like(u), torch.empty_like(u)
        dBt, dCt = torch.empty_like(Bt), torch.empty_like(Ct)
        dA_rows = u.new_empty(u.shape[0], A_t.shape[0], u.shape[2])
        with _kernel_lock:
            _numba_threads()
            kernels.scan_bwd(*(x.numpy() for x in (u, dt, A_t, Bt, Ct, dy, dlast)), has_dlast,
                             *(x.numpy() for x in (du, ddt, dBt, dCt, dA_rows)))
        return du.transpose(1, 2), ddt.transpose(1, 2), dA_rows.sum(0).t(), dBt.transpose(1, 2), dCt.transpose(1, 2)


def _numba_threads() -> None:
    """Use as many threads as torch does (numba keeps its own pool)."""
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class _TorchLoopScan(torch.autograd.Function):
    """The recurrence in plain tensor ops; states kept only every ``_CHUNK`` steps for backward."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        ctx.set_materialize_grads(False)
        dtx = dt * u
        Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # batch x L x N
        h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        marks, ys = [], []
        for t in range(u.shape[2]):
            if t % _CHUNK == 0:
                marks.append(h)
            h = torch.addcmul(dtx[:, :, t, None] * Bt[:, None, t], torch.exp(dt[:, :, t, None] * A), h)
            ys.append(torch.bmm(h, Ct[:, t, :, None]).squeeze(-1))
        y = torch.stack(ys, dim=-1) if ys else torch.zeros_like(u)
        ctx.save_for_backward(u, dt, A, B, C, *marks)
        return y, h

    @staticmethod
    def backward(ctx, dy, dlast):
        u, dt, A, B, C, *marks = ctx.saved_tensors
        length = u.shape[2]
        dtx = dt * u
        Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
        dy = torch.zeros_like(u) if dy is None else dy
        du, ddt, dA = torch.zeros_like(u), torch.zeros_like(u), torch.zeros_like(A)
        dBt, dCt = torch.zeros_like(Bt), torch.zeros_like(Ct)
        dh = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if dlast is None else dlast.clone()
        for k in range(len(marks) - 1, -1, -1):
            t0, t1 = k * _CHUNK, min((k + 1) * _CHUNK, length)
            states, decays = [marks[k]], []  # recompute this chunk's states from its checkpoint
            for t in range(t0, t1):
                decays.append(torch.exp(dt[:, :, t, None] * A))
                states.append(torch.addcmul(dtx[:, :, t, None] * Bt[:, None, t], decays[-1], states[-1]))
            for t in range(t1 - 1, t0 - 1, -1):
                i = t - t0
                g = dy[:, :, t]
                dh = torch.addcmul(dh, g[:, :, None], Ct[:, None, t])
                dCt[:, t] = torch.bmm(g[:, None], states[i + 1]).squeeze(1)
                dBt[:, t] = torch.bmm(dtx[:, None, :, t], dh).squeeze(1)
                dh_b = torch.bmm(dh, Bt[:, t, :, None]).squeeze(-1)  # sum_n dh_n B_n
                da = dh * states[i] * decays[i]
                du[:, :, t] = dh_b * dt[:, :, t]
                ddt[:, :, t] = dh_b * u[:, :, t] + (da * A).sum(-1)
                dA += torch.einsum("bdn,bd->dn", da, dt[:, :, t])
                dh = dh * decays[i]
        return du, ddt, dA, dBt.transpose(1, 2), dCt.transpose(1, 2)
