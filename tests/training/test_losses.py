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


# --- losses for large catalogs: each against a plain reference written out here ----------------------------

from mlsa4rec.errors import ConfigError  # noqa: E402
from mlsa4rec.training.losses import (  # noqa: E402
    TrainingLoss,
    check_loss_memory,
    gbce_beta,
    gbce_loss,
    loss_memory_bytes,
    negative_generator,
    sampled_softmax_loss,
    targets_per_step,
)


def reference_sampled_softmax(hidden, table, targets, negatives, log_q=None) -> float:
    """Row by row in Python floats: log(e^{s+} + sum_{j != t} e^{s_j - log_q_j}) - s+."""
    h_rows, w = hidden.double().tolist(), table.double().tolist()
    lq = [0.0] * len(negatives) if log_q is None else [float(x) for x in log_q]
    total = 0.0
    for h, t in zip(h_rows, targets.tolist()):
        pos = sum(a * b for a, b in zip(h, w[t]))
        logits = [pos] + [sum(a * b for a, b in zip(h, w[j])) - q for j, q in zip(negatives.tolist(), lq) if j != t]
        top = max(logits)
        total += top + math.log(sum(math.exp(z - top) for z in logits)) - pos
    return total / len(h_rows)


def reference_gbce(hidden, table, targets, negatives, beta) -> float:
    """Row by row: -beta log(sigmoid(s+)) - sum_{j != t} log(1 - sigmoid(s_j)), as the paper writes it."""
    h_rows, w = hidden.double().tolist(), table.double().tolist()
    total = 0.0
    for h, t in zip(h_rows, targets.tolist()):
        pos = sum(a * b for a, b in zip(h, w[t]))
        loss = -math.log((1 / (1 + math.exp(-pos))) ** beta)
        for j in negatives.tolist():
            if j != t:
                loss -= math.log(1 - 1 / (1 + math.exp(-sum(a * b for a, b in zip(h, w[j])))))
        total += loss
    return total / len(h_rows)


def tiny(seed: int, n: int = 6, items: int = 9, d: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=dtype), torch.randn(items, d, generator=g, dtype=dtype),
            torch.randint(0, items, (n,), generator=g))


def test_sampled_softmax_matches_the_reference_with_hits_and_log_q() -> None:
    hidden, table, targets = tiny(0)
    targets = torch.tensor([0, 3, 3, 8, 5, 1])
    negatives = torch.tensor([3, 2, 2, 7, 0, 8, 3])  # duplicates, and accidental hits for rows 0, 1, 2, 3
    log_q = torch.linspace(-2.0, 1.0, len(negatives), dtype=torch.float64)
    for lq in (None, log_q):
        got = float(sampled_softmax_loss(hidden, table, targets, negatives, lq))
        assert got == pytest.approx(reference_sampled_softmax(hidden, table, targets, negatives, lq), rel=1e-12)
    # every negative a hit: only the target is left, so the row's loss is 0
    assert float(sampled_softmax_loss(hidden[:2], table, torch.tensor([4, 4]), torch.tensor([4, 4, 4]))) == 0.0


def test_gbce_matches_the_paper_formula_and_drops_hits() -> None:
    hidden, table, targets = tiny(1)
    negatives = torch.tensor([1, targets[0].item(), 6, 6, targets[2].item()])
    for beta in (1.0, 0.25, gbce_beta(9, 5, 0.75)):
        got = float(gbce_loss(hidden, table, targets, negatives, beta))
        assert got == pytest.approx(reference_gbce(hidden, table, targets, negatives, beta), rel=1e-12)


def test_gbce_beta_is_the_papers() -> None:
    for n_items, k, t in [(3417, 256, 0.75), (1_000_000, 1024, 0.5), (100, 99, 0.2), (57, 3, 1.0), (57, 3, 0.0)]:
        alpha = k / (n_items - 1)
        assert gbce_beta(n_items, k, t) == pytest.approx(alpha * (t * (1 - 1 / alpha) + 1 / alpha), rel=1e-12)
    assert gbce_beta(1000, 10, 0.0) == 1.0                          # t = 0: plain BCE
    assert gbce_beta(1000, 10, 1.0) == pytest.approx(10 / 999)      # t = 1: beta = alpha, fully calibrated


def test_gbce_with_beta_one_is_plain_bce() -> None:
    """t = 0 (beta = 1): BCE with label 1 for the target and 0 for every negative that is not a hit."""
    hidden, table, targets = tiny(2)
    negatives = torch.tensor([0, 2, 4, 6, 8])
    loss = TrainingLoss("gBCE", 9, negatives=5, gbce_t=0.0)
    assert loss.beta == 1.0
    logits = torch.cat([(hidden * table[targets]).sum(1, keepdim=True), hidden @ table[negatives].t()], 1)
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    bce[:, 1:] *= (negatives[None, :] != targets[:, None])
    torch.testing.assert_close(gbce_loss(hidden, table, targets, negatives, loss.beta), bce.sum(1).mean())


def test_gradients_by_gradcheck() -> None:
    hidden, table, _ = tiny(3, n=4, items=6, d=3)
    targets, negatives = torch.tensor([0, 2, 2, 5]), torch.tensor([2, 1, 4, 4, 0])
    log_q = torch.tensor([0.3, -1.0, 0.5, 0.5, 2.0], dtype=torch.float64)
    hidden.requires_grad_()
    table.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: sampled_softmax_loss(h, w, targets, negatives, log_q), (hidden, table))
    assert torch.autograd.gradcheck(lambda h, w: sampled_softmax_loss(h, w, targets, targets), (hidden, table))
    assert torch.autograd.gradcheck(lambda h, w: gbce_loss(h, w, targets, negatives, 0.3), (hidden, table))


def test_the_dispatcher_uses_the_steps_negatives_and_log_q() -> None:
    hidden, table, targets = tiny(4, n=8, items=12)
    counts = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    uniform = TrainingLoss("sampled_softmax", 12, negatives=5, seed=7)
    neg = uniform.negatives_of(3)
    want = reference_sampled_softmax(hidden, table, targets, neg, [math.log(5 / 12)] * 5)
    assert float(uniform(hidden, table, targets, step=3)) == pytest.approx(want, rel=1e-12)
    plain = TrainingLoss("sampled_softmax", 12, negatives=5, seed=7, logq_correction=False)
    assert float(plain(hidden, table, targets, 3)) == pytest.approx(
        reference_sampled_softmax(hidden, table, targets, neg), rel=1e-12)
    popular = TrainingLoss("sampled_softmax", 12, negatives=5, seed=7, sampler="popularity", counts=counts)
    neg = popular.negatives_of(3)
    expected_count = [5 * counts[j].item() / counts.sum().item() for j in neg.tolist()]
    want = reference_sampled_softmax(hidden, table, targets, neg, [math.log(c) for c in expected_count])
    assert float(popular(hidden, table, targets, 3)) == pytest.approx(want, rel=1e-12)
    gbce = TrainingLoss("gbce", 12, negatives=5, seed=7, gbce_t=0.5)
    assert float(gbce(hidden, table, targets, 3)) == pytest.approx(
        reference_gbce(hidden, table, targets, uniform.negatives_of(3), gbce_beta(12, 5, 0.5)), rel=1e-12)
    ce = TrainingLoss("ce", 12)
    assert torch.equal(ce(hidden, table, targets, 3), full_softmax_cross_entropy(hidden, table, targets))


def test_in_batch_negatives_are_the_other_targets_and_duplicates_are_hits() -> None:
    hidden, table, _ = tiny(5, n=5, items=7)
    targets = torch.tensor([2, 4, 2, 6, 0])  # rows 0 and 2 share a target: neither is the other's negative
    counts = torch.tensor([5, 1, 8, 2, 3, 1, 4])
    for logq in (False, True):
        loss = TrainingLoss("sampled_softmax", 7, sampler="in_batch", logq_correction=logq, counts=counts)
        total = 0.0
        for n in range(5):  # the row's candidates written out: every other row's target, unless it is the row's own
            t = targets[n].item()
            others = [targets[m].item() for m in range(5) if m != n and targets[m].item() != t]
            q = [math.log(5 * counts[j].item() / counts.sum().item()) if logq else 0.0 for j in others]
            total += reference_sampled_softmax(hidden[n:n + 1], table, targets[n:n + 1],
                                               torch.tensor(others, dtype=torch.long), q)
        assert float(loss(hidden, table, targets, step=0)) == pytest.approx(total / 5, rel=1e-12)
        assert float(loss(hidden, table, targets, step=0)) == float(loss(hidden, table, targets, step=9))  # no draw


def test_negatives_are_a_function_of_seed_and_step() -> None:
    a = TrainingLoss("sampled_softmax", 1000, negatives=64, seed=3)
    b = TrainingLoss("sampled_softmax", 1000, negatives=64, seed=3)
    assert torch.equal(a.negatives_of(10), b.negatives_of(10))
    assert not torch.equal(a.negatives_of(10), a.negatives_of(11))
    assert not torch.equal(a.negatives_of(10), TrainingLoss("gBCE", 1000, negatives=64, seed=4).negatives_of(10))
    drawn = a.negatives_of(0)
    assert drawn.dtype == torch.long and drawn.shape == (64,) and 0 <= drawn.min() and drawn.max() < 1000
    before = torch.get_rng_state()
    negative_generator(3, 5)
    a.negatives_of(5)
    assert torch.equal(before, torch.get_rng_state())  # the global generator (dropout, init) is not touched


def test_popularity_frequencies_match_the_counts() -> None:
    counts = torch.tensor([0, 1, 5, 10, 84, 0, 100])
    draws = 200_000
    loss = TrainingLoss("sampled_softmax", 7, negatives=draws, sampler="popularity", counts=counts, seed=1)
    seen = torch.bincount(loss.negatives_of(0), minlength=7).double()
    expected = counts.double() / counts.sum() * draws
    assert seen[counts == 0].sum() == 0  # never an item that is never a target
    live = counts > 0
    chi2 = float(((seen[live] - expected[live]) ** 2 / expected[live]).sum())
    assert chi2 < 30.0, (seen, expected)  # 4 degrees of freedom: P(chi2 > 30) < 1e-5
    uniform = torch.bincount(TrainingLoss("sampled_softmax", 7, negatives=draws, seed=1).negatives_of(0), minlength=7)
    assert float(((uniform.double() - draws / 7) ** 2 / (draws / 7)).sum()) < 35.0  # 6 degrees of freedom


def test_memory_estimates() -> None:
    assert targets_per_step("prefix", 2048, 50) == 2048
    assert targets_per_step("all_positions", 2048, 50) == 2048 * 50
    assert targets_per_step("cloze", 100, 50, mask_ratio=0.2) == 100 * 10
    n, d = 10_000_000, 64
    assert loss_memory_bytes("CE", "cpu", n, d, 2048) == 4 * (256 * n + n * d)
    assert loss_memory_bytes("CE", "cuda", n, d, 2048) == 4 * 3 * 2048 * n
    assert loss_memory_bytes("sampled_softmax", "cuda", n, d, 2048, 1024) == 4 * (3 * 2048 * 1025 + 2 * 1024 * d)
    assert loss_memory_bytes("sampled_softmax", "cpu", n, d, 300, 1024, "in_batch") == 4 * (3 * 300 * 301 + 2 * 300 * d)
    assert loss_memory_bytes("gBCE", "cpu", n, d, 300, 16) == 4 * (3 * 300 * 17 + 2 * 16 * d)


def test_memory_refusal_names_the_estimate_the_memory_and_what_fits() -> None:
    big = dict(loss_type="CE", device="cpu", n_items=10_000_000, hidden_size=64, targets=2048)
    need = loss_memory_bytes("CE", "cpu", 10_000_000, 64, 2048)  # 12.3 GiB
    with pytest.raises(ConfigError) as info:
        check_loss_memory(8 * 2 ** 30, **big)
    message = str(info.value)
    assert "\n" not in message and f"{need / 2 ** 30:,.1f} GiB" in message and "8.0 GiB is available" in message
    assert "10,000,000 items" in message and message.endswith("--set loss_type=sampled_softmax --set negatives=1024")
    check_loss_memory(64 * 2 ** 30, **big)   # fits
    check_loss_memory(None, **big)           # unknown: not checked
    check_loss_memory(1000, **big)           # nothing fits either: left to the run's overall check
    cuda = {**big, "device": "cuda:0", "n_items": 100_000, "targets": 2048 * 50}
    with pytest.raises(ConfigError, match=r"on cuda:0 \(102,400 targets per step\) but 40.0 GiB is available; "
                                          r"train with --set loss_type=sampled_softmax --set negatives=1024$"):
        check_loss_memory(40 * 2 ** 30, **cuda)
    # a sampled loss with too many negatives is told how many fit; in-batch is told to draw instead
    with pytest.raises(ConfigError, match=r"with 65,536 negatives .* train with --set negatives=256$"):
        check_loss_memory(400 * 2 ** 20, **{**cuda, "loss_type": "sampled_softmax"}, negatives=65536)
    with pytest.raises(ConfigError, match=r"in-batch negatives .* --set negative_sampler=uniform --set negatives=256$"):
        check_loss_memory(400 * 2 ** 20, **{**cuda, "loss_type": "sampled_softmax"}, sampler="in_batch")
