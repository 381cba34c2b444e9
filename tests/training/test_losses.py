"""The fused CPU cross-entropy equals F.cross_entropy in value and in both gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlsa4rec.training.losses import full_softmax_cross_entropy


@pytest.mark.parametrize("n, chunk", [(1, 256), (37, 8), (300, 256), (512, 256)])
def test_matches_plain_cross_entropy(n: int, chunk: int) -> None:
    torch.manual_seed(n)
    hidden = torch.randn(n, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(51, 16, dtype=torch.float64, requires_grad=True)
    table = weight[1:]  # a view, as the trainer passes it (padding row excluded)
    targets = torch.randint(0, 50, (n,))
    fused = full_softmax_cross_entropy(hidden, table, targets, chunk=chunk)
    (fused * 3.0).backward()
    g_fused = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    plain = F.cross_entropy(hidden @ table.t(), targets)
    (plain * 3.0).backward()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(g_fused[0], hidden.grad)
    torch.testing.assert_close(g_fused[1], weight.grad)
    assert weight.grad[0].abs().max() == 0  # the padding row gets no gradient


def test_no_grad_path() -> None:
    hidden, table = torch.randn(5, 4), torch.randn(7, 4)
    targets = torch.tensor([0, 1, 2, 3, 6])
    with torch.no_grad():
        torch.testing.assert_close(full_softmax_cross_entropy(hidden, table, targets),
                                   F.cross_entropy(hidden @ table.t(), targets))
