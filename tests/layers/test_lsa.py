"""The causal LSA's chunked context against its definition (``causal_context_reference``): the same
outputs and gradients, the same dropout mask for a seed, finite where the logits are large."""

from __future__ import annotations

import pytest
import torch

from mlsa4rec.layers.lsa import (
    LowRankSelfAttention,
    _PrefixWeights,
    causal_context,
    causal_context_reference,
)


def lsa(softmax: str, dropout: float = 0.0, d: int = 8, heads: int = 2, interests: int = 3) -> LowRankSelfAttention:
    torch.manual_seed(0)
    layer = LowRankSelfAttention(d, heads, interests, dropout, 0.0, variant="causal", softmax=softmax).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-zero biases: a missing term would show
    return layer


@pytest.mark.parametrize("softmax", ["interests", "sequence"])
@pytest.mark.parametrize(("length", "chunk"), [(11, 4), (3, 4), (8, 4), (40, 32), (1, 32)])
def test_chunked_context_is_the_reference_in_outputs_and_gradients(softmax: str, length: int, chunk: int) -> None:
    """Lengths below, at and across chunk boundaries (a partial last chunk, carries over several)."""
    layer = lsa(softmax)
    x = torch.randn(3, length, 8, dtype=torch.double, requires_grad=True)
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    fast, ref = causal_context(layer, q, k, v, chunk=chunk), causal_context_reference(layer, q, k, v)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    inputs = [x, *(p for name, p in layer.named_parameters() if not name.startswith("LayerNorm"))]
    for a, b in zip(torch.autograd.grad(fast, inputs, grad, retain_graph=True), torch.autograd.grad(ref, inputs, grad),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_layer_trains_on_the_chunked_context_with_the_references_dropout_mask() -> None:
    layer = lsa("interests", dropout=0.5).float().train()
    x = torch.randn(2, 37, 8)
    torch.manual_seed(5)
    out = layer.context(x)
    torch.manual_seed(5)
    expected = causal_context_reference(layer, layer.query(x), layer.key(x), layer.value(x))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_large_logits_stay_finite_in_float32() -> None:
    layer = lsa("sequence").float()
    with torch.no_grad():
        layer.attpooling_key.theta.mul_(500.0)  # pooling logits in the thousands
        layer.attpooling_value.theta.mul_(500.0)
    x = torch.randn(2, 70, 8, requires_grad=True)
    out = layer.context(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_prefix_weights_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 3, dtype=torch.double, generator=g, requires_grad=True)
    z = (torch.logcumsumexp(a, 1) + 0.1).detach().requires_grad_()
    later = torch.ones(5, 5, dtype=torch.bool).triu(1)[:, :, None]
    assert torch.autograd.gradcheck(lambda a, z: _PrefixWeights.apply(a, z, later), (a, z))
    w = _PrefixWeights.apply(a, z, later)
    assert (w[:, later[..., 0]] == 0).all() and torch.allclose(w[:, 2, 1], (a[:, 1] - z[:, 2]).exp())
