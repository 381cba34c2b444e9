"""SiLU(causal depthwise convolution): the compiled CPU kernel against PyTorch's conv1d, in outputs
and every gradient, and when it steps aside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlsa4rec.ops import causal_conv_silu, causal_conv_silu_reference
from mlsa4rec.ops import conv as conv_module


def leaves(batch: int, length: int, d_inner: int, width: int, dtype: torch.dtype, *, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # x as the Mamba layer passes it: the first half of in_proj's output, a strided view
    x = torch.randn(batch, length, 2 * d_inner, generator=g, dtype=torch.float64).to(dtype)[..., :d_inner]
    w = torch.randn(d_inner, 1, width, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(d_inner, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, b)]


def outputs_and_grads(fn, x, w, b):
    out = fn(x, w, b)
    g = torch.linspace(-2, 2, out.numel(), dtype=out.dtype).view_as(out)
    wanted = [t for t in (x, w, b) if t is not None]
    return [out.detach(), *torch.autograd.grad((out * g).sum(), wanted)]


@pytest.mark.parametrize("length", [1, 2, 3, 4, 9, 50])
@pytest.mark.parametrize("bias", [True, False])
def test_float64_matches_conv1d(length: int, bias: bool) -> None:
    """Every position sees t - K + 1 .. t (zeros before the start), including lengths under K."""
    x, w, b = leaves(3, length, 16, 4, torch.float64, bias=bias)
    got = outputs_and_grads(causal_conv_silu, x, w, b)
    expected = outputs_and_grads(causal_conv_silu_reference, x, w, b)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_float32_matches_conv1d_and_is_the_definition() -> None:
    x, w, b = leaves(4, 13, 32, 3, torch.float32)
    for a, e in zip(outputs_and_grads(causal_conv_silu, x, w, b),
                    outputs_and_grads(causal_conv_silu_reference, x, w, b), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    # and the reference is the convolution written out: position t reads t - 2, t - 1, t
    xd, wd, bd = (t.detach().double() for t in (x, w, b))
    padded = F.pad(xd, (0, 0, 2, 0))
    conv = sum(padded[:, k:k + 13] * wd[:, 0, k] for k in range(3)) + bd
    torch.testing.assert_close(causal_conv_silu(x, w, b).double(), F.silu(conv), rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_a_missing_kernel_use_conv1d(monkeypatch) -> None:
    x, w, b = leaves(2, 5, 8, 4, torch.bfloat16)
    assert torch.equal(causal_conv_silu(x, w, b), causal_conv_silu_reference(x, w, b))
    monkeypatch.setattr(conv_module, "_kernels", [None])  # as where numba cannot compile them
    x, w, b = leaves(2, 5, 8, 4, torch.float32)
    assert torch.equal(causal_conv_silu(x, w, b), causal_conv_silu_reference(x, w, b))


def test_traced_graphs_and_other_scans_use_conv1d(monkeypatch) -> None:
    """numba is opaque to torch.export and torch.compile; export's use_implementation("traceable")
    block, and any graph being compiled, get the conv1d form."""
    from mlsa4rec.ops import use_implementation

    calls = []

    def counted(*args):
        calls.append(args)
        return causal_conv_silu_reference(*args)

    monkeypatch.setattr(conv_module._NumbaConvSiLU, "apply", counted)
    x, w, b = leaves(2, 5, 8, 4, torch.float32)
    causal_conv_silu(x, w, b)
    assert len(calls) == 1
    with use_implementation("traceable"):
        causal_conv_silu(x, w, b)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    causal_conv_silu(x, w, b)
    assert len(calls) == 1
