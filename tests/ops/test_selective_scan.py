"""Every selective-scan implementation against the definition, in outputs and all input gradients."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import mlsa4rec.ops
from mlsa4rec.errors import ConfigError
from mlsa4rec.ops import resolve_impl, selective_scan, selective_scan_reference
from mlsa4rec.ops import scan as scan_module

FAST = ["cpu", "torch"] + (["cuda"] if torch.cuda.is_available() else [])


def make_inputs(batch, d_inner, n_state, length, dtype, *, seed=0, dt_scale=1.0, with_z=True, with_d=True,
                with_bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    return dict(
        u=randn(batch, d_inner, length),
        delta=randn(batch, d_inner, length) * 0.5 + dt_scale,
        A=-torch.exp(randn(d_inner, n_state)),
        B=randn(batch, n_state, length),
        C=randn(batch, n_state, length),
        D=randn(d_inner) if with_d else None,
        z=randn(batch, d_inner, length) if with_z else None,
        delta_bias=randn(d_inner) * 0.1 if with_bias else None,
    )


def run(impl, inputs, softplus=True, dtype=None, seed=1):
    """Outputs, last state and the gradient of a random projection of both, for every input."""
    device = "cuda" if impl == "cuda" else "cpu"
    leaves = {k: (v.to(dtype) if dtype else v).to(device).clone().requires_grad_()
              for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    out, last = selective_scan(**args, delta_softplus=softplus, return_last_state=True, impl=impl)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last)
    ((out * w_out).sum() + (last * w_last).sum()).backward()
    return {"out": out.detach(), "last": last.detach(), **{f"d{k}": v.grad for k, v in leaves.items()}}


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CASES = [  # batch, d_inner, N, L, dt_scale (added to delta before the bias and softplus)
    (2, 3, 4, 1, 0.0),
    (2, 5, 3, 7, 0.0),
    (3, 1, 8, 13, 0.0),
    (1, 4, 1, 33, 0.0),
    (2, 6, 16, 64, 0.0),
    (2, 3, 5, 17, 12.0),   # very large Delta: exp(Delta A) underflows to 0, the state resets each step
    (2, 3, 5, 17, -14.0),  # very small Delta (~1e-6): the state barely moves
]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-d{}-N{}-L{}-dt{:+g}".format(*c))
def test_float64_matches_reference(impl, case):
    """float64 (mamba-ssm's kernel does not take it: ``cuda`` falls back to ``torch`` there)."""
    batch, d, n, length, dt_scale = case
    inputs = make_inputs(batch, d, n, length, torch.float64, dt_scale=dt_scale)
    ref, got = run("reference", inputs), run(impl, inputs)
    for key in ref:
        assert rel_err(got[key], ref[key]) < 1e-10, key


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-d{}-N{}-L{}-dt{:+g}".format(*c))
def test_float32_within_1e5_of_exact(impl, case):
    """fp32 against the float64 definition on the same (fp32-rounded) inputs: norm-wise relative
    error <= 1e-5 for the output, the last state and every gradient."""
    batch, d, n, length, dt_scale = case
    inputs = make_inputs(batch, d, n, length, torch.float32, dt_scale=dt_scale)
    exact = run("reference", inputs, dtype=torch.float64)
    got = run(impl, inputs)
    for key in exact:
        assert got[key].dtype == torch.float32
        assert rel_err(got[key], exact[key]) <= 1e-5, key


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("with_z,with_d,with_bias,softplus", [
    (False, False, False, False), (True, False, False, True), (False, True, True, True), (False, False, True, False),
])
def test_optional_inputs(impl, with_z, with_d, with_bias, softplus):
    inputs = make_inputs(2, 4, 6, 11, torch.float64, with_z=with_z, with_d=with_d, with_bias=with_bias,
                         dt_scale=0.0 if softplus else 1.5)  # without softplus Delta itself must be > 0
    ref, got = run("reference", inputs, softplus), run(impl, inputs, softplus)
    assert set(got) == set(ref)
    for key in ref:
        assert rel_err(got[key], ref[key]) < 1e-10, key


def test_reference_is_the_recurrence():
    """The reference against the equations written out for one channel and one state."""
    inputs = make_inputs(1, 1, 1, 4, torch.float64, with_z=False, with_d=False, with_bias=False)
    u, delta, A, B, C = (inputs[k][0, 0] if inputs[k].dim() == 3 else inputs[k][0] for k in "u delta A B C".split())
    h, expected = 0.0, []
    for t in range(4):
        h = torch.exp(delta[t] * A[0]) * h + delta[t] * B[t] * u[t]
        expected.append(C[t] * h)
    out = selective_scan_reference(**inputs)
    torch.testing.assert_close(out[0, 0], torch.stack(expected))


def test_inputs_without_grad_and_default_impl():
    inputs = make_inputs(2, 3, 4, 9, torch.float32)
    out = selective_scan(**inputs, delta_softplus=True)
    torch.testing.assert_close(out, selective_scan_reference(**inputs, delta_softplus=True), rtol=1e-5, atol=1e-5)
    assert not out.requires_grad


def test_only_some_inputs_require_grad():
    inputs = make_inputs(2, 3, 4, 9, torch.float64)
    for impl in ("reference", "cpu"):
        u = inputs["u"].clone().requires_grad_()
        selective_scan(**{**inputs, "u": u}, delta_softplus=True, impl=impl).sum().backward()
        if impl == "reference":
            expected = u.grad
    torch.testing.assert_close(u.grad, expected)


def test_resolve_impl_and_env_override(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu) == "cpu"
    assert resolve_impl("cuda", cpu) == "torch"  # no GPU tensors: the pure-PyTorch path
    monkeypatch.setenv("MLSA4REC_SCAN", "reference")
    assert resolve_impl("auto", cpu) == "reference"
    assert resolve_impl("torch", cpu) == "torch"  # an explicit impl wins over the environment
    monkeypatch.setenv("MLSA4REC_SCAN", "fast")
    with pytest.raises(ConfigError, match="MLSA4REC_SCAN='fast'"):  # a person's setting: one `error:` line
        resolve_impl("auto", cpu)


def test_falls_back_to_torch_without_numba(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlsa4rec.ops._numba_scan", None)  # the import now fails
    monkeypatch.delattr(mlsa4rec.ops, "_numba_scan", raising=False)
    monkeypatch.setattr(scan_module, "_kernels", [])
    monkeypatch.setattr(scan_module, "_announced", set())
    with caplog.at_level(logging.WARNING, logger="mlsa4rec"):
        assert resolve_impl("cpu", torch.device("cpu")) == "torch"
        assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert caplog.text.count("compiled CPU kernel is unavailable") == 1  # said once, not per call
    inputs = make_inputs(2, 3, 4, 9, torch.float64)
    torch.testing.assert_close(selective_scan(**inputs, impl="cpu"), selective_scan_reference(**inputs))


def test_cpu_backward_is_not_differentiable_and_says_so():
    inputs = make_inputs(1, 2, 3, 4, torch.float64)
    u = inputs["u"].clone().requires_grad_()
    (grad,) = torch.autograd.grad(selective_scan(**{**inputs, "u": u}, impl="cpu").square().sum(), u,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_logs_which_implementation_runs(monkeypatch, caplog):
    monkeypatch.setattr(scan_module, "_announced", set())
    with caplog.at_level(logging.INFO, logger="mlsa4rec"):
        selective_scan(**make_inputs(1, 2, 3, 4, torch.float32))
    assert "selective scan: cpu implementation on cpu" in caplog.text


def test_shape_errors_name_the_tensor():
    inputs = make_inputs(2, 3, 4, 5, torch.float32)
    inputs["B"] = inputs["B"][:, :, :4]
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**inputs)


def test_numba_pool_is_sized_like_torchs(tmp_path):
    """Under torchrun each rank gets OMP_NUM_THREADS = cores / ranks; numba's pool must follow,
    or its idle workers fight the other ranks for the cores (an ML-1M epoch went 32 -> 152 s)."""
    import os
    import subprocess

    code = ("import torch\nfrom mlsa4rec.ops import scan\nassert scan._numba_kernels() is not None\n"
            "import numba\nprint(numba.config.NUMBA_NUM_THREADS)")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip() == "1"
