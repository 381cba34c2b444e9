"""The Mamba block: mamba-ssm's parameters and init, the equations, and streaming."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlsa4rec.layers import Mamba

# mamba_ssm.modules.mamba_simple.Mamba(d_model=64, d_state=32, d_conv=4, expand=2).state_dict()
MAMBA_SSM_SHAPES = {
    "A_log": (128, 32),
    "D": (128,),
    "in_proj.weight": (256, 64),
    "conv1d.weight": (128, 1, 4),
    "conv1d.bias": (128,),
    "x_proj.weight": (68, 128),
    "dt_proj.weight": (128, 4),
    "dt_proj.bias": (128,),
    "out_proj.weight": (64, 128),
}


def block(**kw) -> Mamba:
    torch.manual_seed(0)
    return Mamba(64, d_state=32, d_conv=4, expand=2, **kw)


def test_parameters_are_mamba_ssms() -> None:
    m = block()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == MAMBA_SSM_SHAPES
    assert sum(p.numel() for p in m.parameters()) == 38_784


def test_default_initialisation() -> None:
    m = block()
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1.0, 33.0)).expand(128, 32))
    assert torch.equal(m.D.detach(), torch.ones(128))
    dt = F.softplus(m.dt_proj.bias.detach())  # the initial step sizes: log-uniform in [1e-3, 1e-1]
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert float(dt.log().std()) > 0.5  # spread over the range, not constant
    assert m.dt_proj.weight.abs().max() <= 4 ** -0.5
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.x_proj.bias is None


def transcription(m: Mamba, u: torch.Tensor) -> torch.Tensor:
    """MLSA4REC.md section 1, written out step by step (float64, loops where the text loops)."""
    batch, length, _ = u.shape
    xz = u @ m.in_proj.weight.T
    x, z = xz[..., :m.d_inner], xz[..., m.d_inner:]
    w, bias = m.conv1d.weight[:, 0, :], m.conv1d.bias  # d_inner x K
    conv = torch.zeros_like(x)
    for t in range(length):
        for k in range(m.d_conv):  # tap k reads position t - (K - 1 - k): causal, left-padded
            s = t - (m.d_conv - 1 - k)
            if s >= 0:
                conv[:, t] += w[:, k] * x[:, s]
    x = F.silu(conv + bias)
    proj = x @ m.x_proj.weight.T
    r, n = m.dt_rank, m.d_state
    dt_low, B, C = proj[..., :r], proj[..., r:r + n], proj[..., r + n:]
    delta = F.softplus(dt_low @ m.dt_proj.weight.T + m.dt_proj.bias)
    A = -torch.exp(m.A_log)
    h = torch.zeros(batch, m.d_inner, n, dtype=u.dtype)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + m.D * x[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return y @ m.out_proj.weight.T


@pytest.mark.parametrize("length", [1, 3, 9])
def test_forward_is_the_equations(length) -> None:
    m = block().double()
    with torch.no_grad():
        m.dt_proj.bias.normal_()  # exercise the bias and softplus well away from the init range
    u = torch.randn(2, length, 64, dtype=torch.float64)
    torch.testing.assert_close(m(u), transcription(m, u), rtol=1e-10, atol=1e-12)


def test_scan_inputs_reach_the_reference_scan() -> None:
    """The block hands the scan mamba-ssm's argument layout: swapping in the reference changes nothing."""
    m = block()
    u = torch.randn(3, 11, 64)
    expected = m(u)
    m.scan_impl = "reference"
    torch.testing.assert_close(m(u), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [1, 2, 5, 23])
def test_step_by_step_equals_forward(length) -> None:
    m = block().eval()
    u = torch.randn(3, length, 64)
    full, final = m(u, return_state=True)
    state = m.initial_state(3)
    outs = []
    for t in range(length):
        y, state = m.step(u[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.ssm, final.ssm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.conv, final.conv)


def test_continue_after_a_full_forward() -> None:
    """Read a history in one pass, then extend it event by event: same as one pass over everything."""
    m = block().eval()
    u = torch.randn(2, 14, 64)
    full = m(u)
    _, state = m(u[:, :10], return_state=True)
    for t in range(10, 14):
        y, state = m.step(u[:, t], state)
        torch.testing.assert_close(y, full[:, t], rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_every_parameter() -> None:
    m = block()
    m(torch.randn(2, 7, 64)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="d_state must be >= 1"):
        Mamba(8, d_state=0)
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(8, dt_init="zeros")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mamba-ssm comparison needs a GPU")
def test_same_outputs_as_mamba_ssm() -> None:
    mamba_ssm = pytest.importorskip("mamba_ssm")
    ref = mamba_ssm.Mamba(d_model=64, d_state=32, d_conv=4, expand=2).cuda()
    ours = Mamba(64, d_state=32).cuda()
    ours.load_state_dict(ref.state_dict())
    u = torch.randn(4, 50, 64, device="cuda")
    torch.testing.assert_close(ours(u), ref(u), rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(ours(u).sum()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_and_step(dtype) -> None:
    """Half-precision weights: forward and step run, agree with each other, keep their dtypes."""
    m = block().to(dtype).eval()
    u = torch.randn(2, 6, 64).to(dtype)
    full, final = m(u, return_state=True)
    state = m.initial_state(2)
    for t in range(6):
        y, state = m.step(u[:, t], state)
        assert y.dtype == dtype and state.conv.dtype == dtype and state.ssm.dtype == torch.float32
    assert final.ssm.dtype == torch.float32
    torch.testing.assert_close(y.float(), full[:, -1].float(), rtol=0.05, atol=0.05)


def test_same_weights_as_mamba_ssm_for_the_same_seed() -> None:
    """mamba-ssm's constructor, transcribed: same modules built and random numbers drawn in the same order."""
    torch.manual_seed(3)
    ours = Mamba(16, d_state=8, d_conv=3, expand=2)
    torch.manual_seed(3)
    d_inner, dt_rank = 32, 1
    expected = {"in_proj.weight": torch.nn.Linear(16, 2 * d_inner, bias=False).weight}
    conv = torch.nn.Conv1d(d_inner, d_inner, 3, groups=d_inner, padding=2)
    expected.update({"conv1d.weight": conv.weight, "conv1d.bias": conv.bias,
                     "x_proj.weight": torch.nn.Linear(d_inner, dt_rank + 16, bias=False).weight})
    dt_proj = torch.nn.Linear(dt_rank, d_inner)
    torch.nn.init.uniform_(dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
    dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
    expected.update({"dt_proj.weight": dt_proj.weight, "dt_proj.bias": dt + torch.log(-torch.expm1(-dt)),
                     "out_proj.weight": torch.nn.Linear(d_inner, 16, bias=False).weight})
    state = ours.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value.detach(), msg=key)


def test_step_accepts_mamba_ssms_shape_and_checks_the_batch() -> None:
    m = block().eval()
    u = torch.randn(2, 64)
    y, _ = m.step(u, m.initial_state(2))
    y3, _ = m.step(u[:, None], m.initial_state(2))
    torch.testing.assert_close(y3[:, 0], y)
    with pytest.raises(ValueError, match="state holds 3 sequences"):
        m.step(u, m.initial_state(3))
    with pytest.raises(ValueError, match="empty sequence"):
        m(torch.randn(2, 0, 64))
