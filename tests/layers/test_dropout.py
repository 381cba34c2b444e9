"""The rand-based dropout behaves like nn.Dropout: keep rate 1 - p, scale 1 / (1 - p), off in eval."""

from __future__ import annotations

import torch

from mlsa4rec.layers import Dropout


def test_keep_rate_scale_and_eval() -> None:
    torch.manual_seed(0)
    layer = Dropout(0.3)
    x = torch.ones(200_000)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    layer.eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    assert torch.equal(Dropout(0.0)(x), x)


def test_gradient_is_masked_and_scaled() -> None:
    torch.manual_seed(1)
    x = torch.ones(1000, requires_grad=True)
    y = Dropout(0.5)(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y.detach() != 0).float() * 2.0)
