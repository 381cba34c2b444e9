"""The Triton scan beyond the shared accuracy matrix of test_selective_scan.py: channel blocks and
chunk boundaries, half precision, the Mamba layer's strided inputs, partial gradients,
determinism, and the fallbacks. Without a GPU the kernels run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so every shape here is tiny."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from test_selective_scan import GPU, TRITON_SKIP, make_inputs, rel_err, run

from mlsa4rec.ops import resolve_impl, selective_scan
from mlsa4rec.ops import scan as scan_module

pytestmark = pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP)
DEVICE = torch.device("cuda" if GPU else "cpu")


@pytest.fixture
def kernels():
    """The kernel module (its tunables are monkeypatched per test)."""
    assert resolve_impl("triton", DEVICE) == "triton"
    from mlsa4rec.ops import _triton_scan

    return _triton_scan


def test_triton_runs_here(kernels):
    """With triton installed, ``triton`` must not quietly fall back (its self-check passed):
    compiled on a GPU, interpreted on CPU."""
    assert kernels.INTERPRET or GPU


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def deterministic(request):
    """dB and dC sum over channel blocks: fp32 atomics by default, per-block partials summed in
    a fixed order under torch.use_deterministic_algorithms."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param, warn_only=True)
    yield request.param
    torch.use_deterministic_algorithms(before)


def test_channel_blocks_padding_and_chunks(kernels, monkeypatch, deterministic):
    """d_inner = 5 in blocks of 2 (three programs per row, the last half empty), N = 3 padded to
    4, L = 11 in chunks of 4 (4 + 4 + 3): every partial sum and every masked lane, in float64.
    Two channels get Delta + bias ~ 25, where softplus passes its input through (above 20)."""
    monkeypatch.setattr(kernels, "BLOCK_D", 2)
    monkeypatch.setattr(kernels, "CHUNK", 4)
    inputs = make_inputs(2, 5, 3, 11, torch.float64)
    inputs["delta"][:, 3:] += 24.0
    ref, got = run("reference", inputs), run("triton", inputs)
    for key in ref:
        assert rel_err(got[key], ref[key]) < 1e-10, key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_fp32_state(dtype):
    """u, delta, B, C, z in half precision with A, D, delta_bias in fp32 (as under autocast):
    outputs and gradients come back in each input's dtype; the error is that of storing the
    results in half precision (bf16: 2^-9 relative), not of a half-precision state."""
    inputs = make_inputs(2, 3, 4, 9, torch.float64)
    half = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v.float()) for k, v in inputs.items()}
    leaves = {k: v.to(DEVICE).clone().requires_grad_() for k, v in half.items()}
    exact = {k: v.double().requires_grad_() for k, v in half.items()}  # the same rounded inputs, exactly
    out, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True, impl="triton")
    ref, ref_last = selective_scan(**exact, delta_softplus=True, return_last_state=True, impl="reference")
    assert out.dtype == last.dtype == dtype
    (out.float().sum() + last.float().sum()).backward()
    (ref.sum() + ref_last.sum()).backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert rel_err(out, ref.detach()) < tol
    for key in leaves:
        assert leaves[key].grad.dtype == half[key].dtype, key
        assert rel_err(leaves[key].grad, exact[key].grad) < tol, key


def test_mamba_layer_layout():
    """The Mamba block hands the scan transposed views (delta, B, C, z are time-major): the
    kernel reads them through their strides. Whole block, forward and backward, float64."""
    from mlsa4rec.layers import Mamba

    torch.manual_seed(0)
    block = Mamba(d_model=4, d_state=3, expand=2, scan_impl="reference").double().to(DEVICE)
    x = torch.randn(2, 7, 4, dtype=torch.float64, device=DEVICE)
    grads = []
    for impl in ("reference", "triton"):
        block.scan_impl = impl
        block.zero_grad()
        y, state = block(x, return_state=True)
        (y.square().sum() + state.ssm.sum()).backward()
        grads.append([y.detach(), state.ssm.detach()] + [p.grad.clone() for p in block.parameters()])
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("use", ["out", "last"])
def test_gradient_of_only_one_output(use):
    """Only the output, or only the last state, feeds the loss (the other's gradient is None)."""
    inputs = make_inputs(2, 3, 4, 6, torch.float64)
    grads = []
    for impl in ("reference", "triton"):
        leaves = {k: v.to(DEVICE).clone().requires_grad_() for k, v in inputs.items()}
        out, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True, impl=impl)
        (out if use == "out" else last).sin().sum().backward()
        grads.append([v.grad for v in leaves.values()])
    for key, a, b in zip(inputs, *grads):
        assert (a is None) == (b is None), key  # C, D and z do not reach the last state
        assert a is None or rel_err(a, b) < 1e-10, key


def test_no_grad_and_deterministic(kernels, monkeypatch):
    """Without gradients nothing is checkpointed (and the output is the same); under
    torch.use_deterministic_algorithms two runs give bitwise the same gradients, also with
    several channel blocks (whose dB, dC partials are then summed in a fixed order)."""
    monkeypatch.setattr(kernels, "BLOCK_D", 2)
    inputs = {k: v.to(DEVICE) for k, v in make_inputs(2, 3, 4, 7, torch.float32).items()}
    with torch.no_grad():
        plain = selective_scan(**inputs, delta_softplus=True, impl="triton")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, second = run("triton", inputs), run("triton", inputs)
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(plain, first["out"].to(plain.device))
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_auto_order_on_a_gpu(monkeypatch):
    """impl="auto" on CUDA tensors: mamba-ssm, then triton, then torch (PREFER_MAMBA_SSM sets
    the order of the first two); an explicit ``cuda`` that cannot run goes to triton."""
    cuda = torch.device("cuda")
    monkeypatch.delenv("MLSA4REC_SCAN", raising=False)
    cases = [({"cuda", "triton"}, True, "cuda"), ({"cuda", "triton"}, False, "triton"), ({"triton"}, True, "triton"),
             ({"cuda"}, False, "cuda"), (set(), True, "torch")]
    for available, prefer, expected in cases:
        monkeypatch.setattr(scan_module, "PREFER_MAMBA_SSM", prefer)
        monkeypatch.setattr(scan_module, "_usable", lambda impl, device, dtype, ok=available: impl in ok
                            or impl in ("torch", "reference"))
        assert resolve_impl("auto", cuda) == expected, (available, prefer)
        assert resolve_impl("cuda", cuda) == ("cuda" if "cuda" in available else
                                              "triton" if "triton" in available else "torch")
        assert resolve_impl("triton", cuda) == ("triton" if "triton" in available else "torch")


def _reset(monkeypatch):
    monkeypatch.setattr(scan_module, "_triton_modules", {})
    monkeypatch.setattr(scan_module, "_announced", set())


def test_falls_back_without_triton(monkeypatch, caplog):
    _reset(monkeypatch)
    monkeypatch.setitem(sys.modules, "mlsa4rec.ops._triton_scan", None)  # the import now fails
    import mlsa4rec.ops

    monkeypatch.delattr(mlsa4rec.ops, "_triton_scan", raising=False)
    with caplog.at_level(logging.WARNING, logger="mlsa4rec"):
        assert resolve_impl("triton", DEVICE) == "torch"
        assert resolve_impl("triton", DEVICE) == "torch"
    assert caplog.text.count("Triton kernel is unavailable") == 1  # said once, not per call
    inputs = make_inputs(2, 3, 4, 5, torch.float64)
    torch.testing.assert_close(selective_scan(**inputs, impl="triton"), selective_scan(**inputs, impl="reference"))


def test_failed_self_check_falls_back(kernels, monkeypatch, caplog):
    _reset(monkeypatch)

    def broken(device):
        raise RuntimeError("self-check against the reference failed (relative error 1.0e+00)")

    monkeypatch.setattr(kernels, "self_check", broken)
    with caplog.at_level(logging.WARNING, logger="mlsa4rec"):
        assert resolve_impl("triton", DEVICE) == "torch"
    assert "self-check against the reference failed" in caplog.text


def test_cpu_tensors_need_the_interpreter(kernels, monkeypatch, caplog):
    _reset(monkeypatch)
    monkeypatch.setattr(kernels, "INTERPRET", False)  # kernels compiled for a GPU
    with caplog.at_level(logging.INFO, logger="mlsa4rec"):
        assert resolve_impl("triton", torch.device("cpu")) == "torch"
        assert resolve_impl("auto", torch.device("cpu")) == "cpu"  # auto never picks triton on CPU
    assert "TRITON_INTERPRET=1" in caplog.text


COMPILE_SM90 = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mlsa4rec.ops import _triton_scan as ts
assert not ts.INTERPRET
block_d, warps = ts._config(128, 32)
for fn, flags in [(ts._scan_fwd, dict(SAVE=True)), (ts._scan_bwd, dict(HAS_DOUT=True, HAS_DLAST=True, ATOMIC=True))]:
    for dtype in ("fp32", "bf16"):
        consts = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, CHUNK=ts.CHUNK, BLOCK_D=block_d,
                      BLOCK_N=32, ACC=tl.float32, NTERMS=8, s_ul=1, s_dd=1, s_Bn=1, s_Cn=1, **flags)
        io = ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr")
        sig = {a: "constexpr" if a in consts else ("*" + dtype if a in io else "*fp32") if a.endswith("_ptr")
               else "i32" for a in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps, "enable_fp_fusion": True})
        assert kernel.asm["cubin"], fn
print("ok")
"""


@pytest.mark.skipif(GPU, reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter accepts code the compiler may not (it runs the Python as written), so
    the kernels are also compiled, without a GPU, to an sm_90 (H100/H200) binary: Triton's
    wheel carries the NVIDIA backend and ptxas. In a subprocess, since this process has
    TRITON_INTERPRET=1 and so only interpreted kernels."""
    import os
    import subprocess

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:  # the compile API moved (it is not a public one)
        pytest.skip(f"triton's compile API is not where this test looks: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # never the user's ~/.triton
    result = subprocess.run([sys.executable, "-c", COMPILE_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_backward_is_not_differentiable_and_says_so():
    inputs = {k: v.to(DEVICE) for k, v in make_inputs(1, 2, 3, 4, torch.float64).items()}
    u = inputs["u"].clone().requires_grad_()
    (grad,) = torch.autograd.grad(selective_scan(**{**inputs, "u": u}, impl="triton").square().sum(), u,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()
