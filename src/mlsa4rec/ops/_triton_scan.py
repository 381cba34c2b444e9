"""The selective scan as Triton kernels: fused forward and a hand-written, checkpointed backward.

Layout of the work: one program per (batch row, block of ``BLOCK_D`` channels) walks time with
that block's BLOCK_D x N states in registers (N padded to a power of two, padding masked off:
A = B = C = 0 there, so padded states stay 0; see ``_config`` for how the tile is spread over
warps). Everything elementwise is fused around the recurrence, so each input is read once per
pass and nothing of size B x d_inner x N x L exists:

* forward, per step: dt = softplus(delta + delta_bias); h = exp(dt A) h + dt u B_t;
  y = <C_t, h> + D u; out = y SiLU(z). Every ``CHUNK`` steps the state is written to a
  checkpoint tensor (B x n_chunks x d_inner x N, fp32), the only thing saved besides the inputs.
* backward, chunks in reverse: reload the chunk's checkpoint, recompute its <= CHUNK states into
  a per-program scratch slab ((CHUNK + 1) x BLOCK_D x N, fp32; it stays in L1/L2), then walk the
  chunk backwards with dh (the gradient of the state) in registers, writing du, ddelta, dz per
  step. Sums over time (dA, dD, d delta_bias) accumulate in registers (one row per program,
  summed over rows by torch). Sums over channels (dB, dC) are fp32 atomics into B x L x N (as
  in mamba-ssm), or, under torch.use_deterministic_algorithms or with a single channel block,
  one partial per channel block summed by torch in a fixed order (bitwise reproducible).

Precision: fp16/bf16 inputs are read as they are and computed with fp32 states; float64 inputs
compute in float64 (for checking). Outputs and input gradients come back in the inputs' dtypes.
softplus needs log1p(w), w = exp(-|x|): log(1 + w) loses all of w's digits that 1 + w rounds
away (relative error up to 1e-4 in fp32 at softplus(-7) ~ 1e-3, where Mamba's steps live), and
the accurate ``libdevice.log1p`` is an external call that Triton's interpreter cannot run. So
log1p(w) = 2 atanh(w / (2 + w)) by its series: plain arithmetic, accurate in fp32 and fp64, the
same code on the GPU and in the CPU tests.

``TRITON_INTERPRET=1`` (set before this module is imported) runs the same kernels on CPU tensors
through Triton's interpreter: slow, for tests without a GPU. ``INTERPRET`` records which mode
the kernels were built in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from mlsa4rec.ops._reference import selective_scan_reference

try:
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.4 has no knobs; it reads the variable the same way
    import os

    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tunables (benchmarks/gpu_check.py sweeps them; None: chosen by ``_config``).
CHUNK = 16  # steps between saved states: checkpoint memory B*d*N*4 bytes * L/CHUNK; scratch ~ CHUNK
BLOCK_D: int | None = None  # channels per program
NUM_WARPS: int | None = None  # warps per program
WARPS_DEFAULT = 8
_SERIES = {torch.float32: 8, torch.float64: 16}  # terms of the atanh series (truncation < 1e-9 / 1e-17)


def _helper(fn):
    """@triton.jit for functions the kernels call. The interpreter re-patches triton.language on
    every call of a jitted function (a fifth of its time here); the plain function does the same
    there, since the kernels' own patching already covers it."""
    return fn if INTERPRET else triton.jit(fn)


@_helper
def _softplus_sigmoid(x, SOFTPLUS: tl.constexpr, NTERMS: tl.constexpr):
    """(softplus(x), sigmoid(x)) as torch computes softplus (x > 20 passes through); (x, 1)
    without SOFTPLUS. log1p(w), w = exp(-|x|) in (0, 1], is 2 s (1 + s^2/3 + s^4/5 + ...) with
    s = w / (2 + w) <= 1/3, so the terms shrink by 9x or more: NTERMS = 8 leaves < 1e-9 (fp32),
    16 leaves < 1e-17 (fp64)."""
    if SOFTPLUS:
        w = tl.exp(-tl.abs(x))
        s = w / (2.0 + w)
        s2 = s * s
        p = s2 * 0.0
        for j in tl.static_range(NTERMS):
            p = p * s2 + 1.0 / (2 * (NTERMS - 1 - j) + 1)
        sp = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + 2.0 * s * p)
        sig = tl.where(x >= 0.0, 1.0 / (1.0 + w), w / (1.0 + w))
        return sp, sig
    else:
        return x, x * 0.0 + 1.0


@_helper
def _sigmoid(x):
    w = tl.exp(-tl.abs(x))  # never overflows
    return tl.where(x >= 0.0, 1.0 / (1.0 + w), w / (1.0 + w))


@triton.jit(do_not_specialize=["length", "n_chunks"])  # one binary for every L
def _scan_fwd(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, ckpt_ptr,
    d_inner, n_state, length, n_chunks,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC: tl.constexpr, NTERMS: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < n_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state_off = offs_d[:, None] * n_state + offs_n[None, :]
    A = tl.load(A_ptr + state_off, mask=mask_dn, other=0.0).to(ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    u_p = u_ptr + pid_b * s_ub + offs_d * s_ud
    delta_p = delta_ptr + pid_b * s_db + offs_d * s_dd
    z_p = z_ptr + pid_b * s_zb + offs_d * s_zd
    out_p = out_ptr + pid_b * s_ob + offs_d * s_od
    B_p = B_ptr + pid_b * s_Bb + offs_n * s_Bn
    C_p = C_ptr + pid_b * s_Cb + offs_n * s_Cn
    ckpt_p = ckpt_ptr + pid_b * n_chunks * d_inner * n_state + state_off

    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    for k in range(n_chunks):
        if SAVE:
            tl.store(ckpt_p + k * d_inner * n_state, h, mask=mask_dn)
        t0 = k * CHUNK
        t1 = tl.minimum(t0 + CHUNK, length)
        for t in range(t0, t1):
            x = tl.load(u_p + t * s_ul, mask=mask_d, other=0.0).to(ACC)
            dt = tl.load(delta_p + t * s_dl, mask=mask_d, other=0.0).to(ACC)
            if HAS_BIAS:
                dt = dt + bias
            dt, _ = _softplus_sigmoid(dt, SOFTPLUS, NTERMS)
            Bt = tl.load(B_p + t * s_Bl, mask=mask_n, other=0.0).to(ACC)
            Ct = tl.load(C_p + t * s_Cl, mask=mask_n, other=0.0).to(ACC)
            h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1)
            if HAS_D:
                y += Dv * x
            if HAS_Z:
                zt = tl.load(z_p + t * s_zl, mask=mask_d, other=0.0).to(ACC)
                y = y * zt * _sigmoid(zt)
            tl.store(out_p + t * s_ol, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(last_ptr + pid_b * d_inner * n_state + state_off, h, mask=mask_dn)


@triton.jit(do_not_specialize=["length", "n_chunks"])  # one binary for every L
def _scan_bwd(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr, ckpt_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    d_inner, n_state, length, n_chunks,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
    s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl, s_dzb, s_dzd, s_dzl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DOUT: tl.constexpr, HAS_DLAST: tl.constexpr, ATOMIC: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr, NTERMS: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    batch = tl.num_programs(0)
    n_blocks = tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < n_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state_off = offs_d[:, None] * n_state + offs_n[None, :]
    A = tl.load(A_ptr + state_off, mask=mask_dn, other=0.0).to(ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    u_p = u_ptr + pid_b * s_ub + offs_d * s_ud
    delta_p = delta_ptr + pid_b * s_db + offs_d * s_dd
    z_p = z_ptr + pid_b * s_zb + offs_d * s_zd
    g_p = dout_ptr + pid_b * s_gb + offs_d * s_gd
    du_p = du_ptr + pid_b * s_dub + offs_d * s_dud
    ddelta_p = ddelta_ptr + pid_b * s_ddb + offs_d * s_ddd
    dz_p = dz_ptr + pid_b * s_dzb + offs_d * s_dzd
    B_p = B_ptr + pid_b * s_Bb + offs_n * s_Bn
    C_p = C_ptr + pid_b * s_Cb + offs_n * s_Cn
    ckpt_p = ckpt_ptr + pid_b * n_chunks * d_inner * n_state + state_off
    slab = BLOCK_D * BLOCK_N
    scratch_p = (scratch_ptr + (pid_b * n_blocks + pid_d) * (CHUNK + 1) * slab
                 + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :])
    if ATOMIC:  # dB, dC: B x L x N, every channel block adds into it
        part_off = pid_b * length * n_state + offs_n
    else:  # one partial per channel block: n_blocks x B x L x N, summed afterwards
        part_off = (pid_d * batch + pid_b) * length * n_state + offs_n
    dB_p = dB_ptr + part_off
    dC_p = dC_ptr + part_off

    if HAS_DLAST:
        dh = tl.load(dlast_ptr + pid_b * d_inner * n_state + state_off, mask=mask_dn, other=0.0).to(ACC)
    else:
        dh = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    dD_acc = tl.zeros([BLOCK_D], dtype=ACC)
    dbias_acc = tl.zeros([BLOCK_D], dtype=ACC)
    for kk in range(n_chunks):
        k = n_chunks - 1 - kk
        t0 = k * CHUNK
        t1 = tl.minimum(t0 + CHUNK, length)
        h = tl.load(ckpt_p + k * d_inner * n_state, mask=mask_dn, other=0.0)
        tl.debug_barrier()  # every thread is done reading the previous chunk's scratch
        tl.store(scratch_p, h)
        for t in range(t0, t1):  # recompute the chunk's states: slot i holds the state after step t0 + i - 1
            x = tl.load(u_p + t * s_ul, mask=mask_d, other=0.0).to(ACC)
            dt = tl.load(delta_p + t * s_dl, mask=mask_d, other=0.0).to(ACC)
            if HAS_BIAS:
                dt = dt + bias
            dt, _ = _softplus_sigmoid(dt, SOFTPLUS, NTERMS)
            Bt = tl.load(B_p + t * s_Bl, mask=mask_n, other=0.0).to(ACC)
            h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bt[None, :]
            tl.store(scratch_p + (t - t0 + 1) * slab, h)
        tl.debug_barrier()  # the slab is written before any thread reads it back
        for i in range(t1 - t0):
            t = t1 - 1 - i
            h_prev = tl.load(scratch_p + (t - t0) * slab)
            x = tl.load(u_p + t * s_ul, mask=mask_d, other=0.0).to(ACC)
            dt = tl.load(delta_p + t * s_dl, mask=mask_d, other=0.0).to(ACC)
            if HAS_BIAS:
                dt = dt + bias
            dt, dsoft = _softplus_sigmoid(dt, SOFTPLUS, NTERMS)
            Bt = tl.load(B_p + t * s_Bl, mask=mask_n, other=0.0).to(ACC)
            Ct = tl.load(C_p + t * s_Cl, mask=mask_n, other=0.0).to(ACC)
            if HAS_DOUT:
                g = tl.load(g_p + t * s_gl, mask=mask_d, other=0.0).to(ACC)
            else:
                g = tl.zeros([BLOCK_D], dtype=ACC)
            if HAS_Z:  # out = y SiLU(z): g becomes d out / d y
                zt = tl.load(z_p + t * s_zl, mask=mask_d, other=0.0).to(ACC)
                y = tl.sum(h * Ct[None, :], axis=1)
                if HAS_D:
                    y += Dv * x
                sz = _sigmoid(zt)
                tl.store(dz_p + t * s_dzl, (g * y * sz * (1.0 + zt * (1.0 - sz))).to(dz_ptr.dtype.element_ty),
                         mask=mask_d)
                g = g * zt * sz
            a = tl.exp(dt[:, None] * A)
            dh = dh + g[:, None] * Ct[None, :]
            if ATOMIC:
                tl.atomic_add(dC_p + t * n_state, tl.sum(g[:, None] * h, axis=0), mask=mask_n, sem="relaxed")
                tl.atomic_add(dB_p + t * n_state, tl.sum(dh * (dt * x)[:, None], axis=0), mask=mask_n,
                              sem="relaxed")
            else:
                tl.store(dC_p + t * n_state, tl.sum(g[:, None] * h, axis=0), mask=mask_n)
                tl.store(dB_p + t * n_state, tl.sum(dh * (dt * x)[:, None], axis=0), mask=mask_n)
            dh_b = tl.sum(dh * Bt[None, :], axis=1)  # sum_n dh_n B_n
            da = dh * h_prev * a
            du = dh_b * dt
            if HAS_D:
                du += g * Dv
                dD_acc += g * x
            ddt = (dh_b * x + tl.sum(da * A, axis=1)) * dsoft
            dA_acc += da * dt[:, None]
            dbias_acc += ddt
            tl.store(du_p + t * s_dul, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddelta_p + t * s_ddl, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
            dh = dh * a
            h = h_prev
    tl.store(dA_ptr + pid_b * d_inner * n_state + state_off, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * d_inner + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * d_inner + offs_d, dbias_acc, mask=mask_d)


def _block_n(n_state: int) -> int:
    return max(2, triton.next_power_of_2(n_state))


def _config(d_inner: int, n_state: int) -> tuple[int, int]:
    """(channels per program, warps per program). Triton lays the BLOCK_D x N tile out with the
    N states across the 32 lanes of a warp and the channels across warps (and, beyond that,
    within a thread). Giving every warp its own channel(s) keeps each thread at one or two states
    and one channel: compiled for sm_90 that is ~40 registers forward, ~75 backward, without
    spills; 8 channels per warp took 170 / 255 (spilling). N < 32 fits 32 // N channels per warp."""
    per_warp = max(1, 32 // _block_n(n_state))
    warps = NUM_WARPS or WARPS_DEFAULT
    block = BLOCK_D or per_warp * warps
    block = min(block, max(2, triton.next_power_of_2(d_inner)))
    if NUM_WARPS is None:
        warps = max(1, min(warps, block // per_warp))
    return block, warps


def _strides(x: torch.Tensor | None) -> tuple[int, int, int]:
    return tuple(x.stride()) if x is not None else (0, 0, 0)


class TritonScan(torch.autograd.Function):
    """(out, last state) of the full selective scan, D, z, delta_bias and softplus included."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        batch, d_inner, length = u.shape
        n_state = A.shape[1]
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        A, D, delta_bias = (None if x is None else x.contiguous() for x in (A, D, delta_bias))
        save = any(ctx.needs_input_grad[:8])
        (block_d, warps), block_n = _config(d_inner, n_state), _block_n(n_state)
        n_chunks = triton.cdiv(length, CHUNK)
        out = torch.empty_like(u)
        last = u.new_empty(batch, d_inner, n_state, dtype=acc)
        ckpt = u.new_empty(batch, n_chunks if save else 0, d_inner, n_state, dtype=acc)
        grid = (batch, triton.cdiv(d_inner, block_d))
        _scan_fwd[grid](
            u, delta, A, B, C, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
            out, last, ckpt if save else last, d_inner, n_state, length, n_chunks,
            *u.stride(), *delta.stride(), *_strides(z), *out.stride(), *B.stride(), *C.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
            SAVE=save, CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n, ACC=tl.float64 if acc == torch.float64
            else tl.float32, NTERMS=_SERIES[acc], num_warps=warps, enable_fp_fusion=True,
        )
        ctx.set_materialize_grads(False)
        ctx.softplus = bool(softplus)
        ctx.config = (block_d, block_n, warps, CHUNK, acc)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        return out, last

    @staticmethod
    @once_differentiable  # the kernel's gradients are not themselves differentiable: say so
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        block_d, block_n, warps, chunk, acc = ctx.config
        batch, d_inner, length = u.shape
        n_state = A.shape[1]
        n_blocks = triton.cdiv(d_inner, block_d)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        f32 = dict(device=u.device, dtype=acc)
        scratch = torch.empty(batch * n_blocks * (chunk + 1) * block_d * block_n, **f32)
        dA = torch.empty(batch, d_inner, n_state, **f32)
        # dB and dC sum over channels: per-block partials where that is deterministic and cheap
        # (one block, or torch.use_deterministic_algorithms), else fp32 atomics (as mamba-ssm)
        atomic = n_blocks > 1 and not torch.are_deterministic_algorithms_enabled()
        parts = (1 if atomic else n_blocks, batch, length, n_state)
        dB, dC = (torch.zeros(parts, **f32) if atomic else torch.empty(parts, **f32) for _ in range(2))
        dD = torch.empty(batch, d_inner, **f32) if D is not None else None
        dbias = torch.empty(batch, d_inner, **f32) if delta_bias is not None else None
        _scan_bwd[(batch, n_blocks)](
            u, delta, A, B, C, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
            u if dout is None else dout, u if dlast is None else dlast.contiguous(), ckpt, scratch,
            du, ddelta, u if dz is None else dz, dA, dB, dC, u if dD is None else dD, u if dbias is None else dbias,
            d_inner, n_state, length, ckpt.shape[1],
            *u.stride(), *delta.stride(), *_strides(z), *_strides(dout), *B.stride(), *C.stride(),
            *du.stride(), *ddelta.stride(), *_strides(dz),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus,
            HAS_DOUT=dout is not None, HAS_DLAST=dlast is not None, ATOMIC=atomic, CHUNK=chunk, BLOCK_D=block_d,
            BLOCK_N=block_n, ACC=tl.float64 if acc == torch.float64 else tl.float32, NTERMS=_SERIES[acc],
            num_warps=warps, enable_fp_fusion=True,
        )
        dB, dC = (x[0] if x.shape[0] == 1 else x.sum(0) for x in (dB, dC))
        dC = dC.transpose(1, 2).to(C.dtype)
        if dout is None:  # only the last state was used: C, D and z did not touch it
            dC = dD = dz = None
        return (du, ddelta, dA.sum(0).to(A.dtype), dB.transpose(1, 2).to(B.dtype), dC,
                None if dD is None else dD.sum(0).to(D.dtype), dz,
                None if dbias is None else dbias.sum(0).to(delta_bias.dtype), None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """(out in u's dtype, last state in fp32 or fp64), differentiable in every tensor input."""
    return TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def self_check(device: torch.device) -> None:
    """Compile and run forward + backward once on a tiny problem and compare with the definition;
    raises when the toolchain fails or the numbers are wrong, so the caller can fall back."""
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 5), (2, 3, 5), (3, 4), (2, 4, 5), (2, 4, 5), (3,), (2, 3, 5), (3,)]
    xs = [torch.randn(*s, generator=g).to(device) for s in shapes]
    xs[2] = -xs[2].exp()
    leaves = [x.clone().requires_grad_() for x in xs]
    ref = [x.clone().requires_grad_() for x in xs]
    out, last = selective_scan_triton(*leaves, delta_softplus=True)
    out_ref, last_ref = selective_scan_reference(*ref, delta_softplus=True, return_last_state=True)
    (out.sum() + last.sum()).backward()
    (out_ref.sum() + last_ref.sum()).backward()
    pairs = [(out.detach(), out_ref.detach()), (last.detach(), last_ref.detach())]
    pairs += [(a.grad, b.grad) for a, b in zip(leaves, ref)]
    worst = max(float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
                for a, b in pairs)
    if not worst <= 1e-3:  # also catches NaN
        raise RuntimeError(f"self-check against the reference failed (relative error {worst:.1e})")
