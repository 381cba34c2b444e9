"""The fused CPU cross-entropy equals F.cross_entropy in value and in both gradients."""

from __future__ import annotations

import math

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


def reference_cross_entropy(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over rows of log(sum_j exp(h . w_j)) - h . w_target, in Python floats, row by row."""
    total = 0.0
    for h, t in zip(hidden.double().tolist(), targets.tolist()):
        logits = [sum(a * b for a, b in zip(h, w)) for w in table.double().tolist()]
        top = max(logits)
        total += top + math.log(sum(math.exp(z - top) for z in logits)) - logits[t]
    return total / len(targets)


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["fp64", "fp32"])
def test_no_grad_path_is_the_cross_entropy_and_equals_the_fused_path(dtype, rel) -> None:
    """Under no_grad (evaluation, the schemes test) the loss takes another path than in training:
    both must give the cross-entropy, computed here independently of either."""
    g = torch.Generator().manual_seed(0)
    hidden, table = torch.randn(300, 8, generator=g, dtype=dtype), torch.randn(40, 8, generator=g, dtype=dtype)
    targets = torch.randint(0, 40, (300,), generator=g)
    want = reference_cross_entropy(hidden, table, targets)
    with torch.no_grad():
        plain = full_softmax_cross_entropy(hidden, table, targets, chunk=64)
    assert not plain.requires_grad and plain.dtype == dtype
    assert float(plain) == pytest.approx(want, rel=rel)
    fused = full_softmax_cross_entropy(hidden.clone().requires_grad_(), table, targets, chunk=64)
    assert fused.requires_grad and float(fused.detach()) == pytest.approx(want, rel=rel)
    # closed forms: all-zero logits give log(classes) whatever the targets; a one-hot margin m over
    # the other C - 1 classes gives log(1 + (C - 1) e^-m)
    with torch.no_grad():
        assert float(full_softmax_cross_entropy(torch.zeros(3, 8, dtype=dtype), table, torch.tensor([0, 7, 39]))) \
            == pytest.approx(math.log(40), rel=rel)
        eye = torch.eye(5, dtype=dtype)
        assert float(full_softmax_cross_entropy(2.0 * eye, eye, torch.arange(5))) \
            == pytest.approx(math.log(1 + 4 * math.exp(-2.0)), rel=rel)
