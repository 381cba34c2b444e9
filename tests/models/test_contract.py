"""The contract of every registered model: API shapes, and the flags it declares hold."""

from __future__ import annotations

import pytest
import torch

from mlsa4rec.models import available, create

N_ITEMS = 40


# every registered model at its defaults, plus the variants whose flags differ from them
CASES = [(name, {}) for name in available()] + [
    ("mlsa4rec", {"variant": "masked"}), ("mlsa4rec", {"variant": "causal"}),
    ("mlsa4rec", {"variant": "causal", "attn_softmax": "sequence"}),
]
IDS = [name + "".join(f"-{v}" for v in kw.values()) for name, kw in CASES]


def build(name: str, **kw):
    torch.manual_seed(0)
    return create(name, N_ITEMS, MAX_ITEM_LIST_LENGTH=12, **kw).eval()


def cases_where(flag: str) -> list:
    return [pytest.param(name, kw, id=i) for (name, kw), i in zip(CASES, IDS) if getattr(build(name, **kw), flag)]


def padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (3, 10), generator=g)
    lengths = torch.tensor([10, 6, 2])
    for b, n in enumerate(lengths.tolist()):
        seq[b, n:] = 0
    return seq, lengths


@pytest.mark.parametrize("name, kw", CASES, ids=IDS)
def test_api_shapes(name, kw) -> None:
    m = build(name, **kw)
    seq, lengths = padded_batch()
    assert m.encode(seq, lengths).shape[:2] == (3, 10)
    scores = m.full_sort_scores(seq, lengths)
    assert scores.shape == (3, N_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    assert m.item_table().shape[0] == N_ITEMS + 1


@pytest.mark.parametrize("name, kw", cases_where("causal"))
def test_causal_models_never_see_the_future(name, kw) -> None:
    m = build(name, **kw)
    seq, lengths = padded_batch()
    changed = seq.clone()
    changed[:, 5:] = torch.randint(1, N_ITEMS + 1, (3, 5))
    torch.testing.assert_close(m.encode(seq, lengths)[:, :5], m.encode(changed, lengths)[:, :5])


@pytest.mark.parametrize("name, kw", cases_where("padding_invariant"))
def test_padding_invariant_models_ignore_trailing_padding(name, kw) -> None:
    m = build(name, **kw)
    seq, lengths = padded_batch()
    longer = torch.cat([seq, torch.zeros(3, 2, dtype=torch.long)], dim=1)
    torch.testing.assert_close(m(seq, lengths), m(longer, lengths))
    short = lengths.clamp(max=6)
    torch.testing.assert_close(m(seq[:, :6], short), m(seq, short))


@pytest.mark.parametrize("name, kw", CASES, ids=IDS)
def test_gradients_reach_every_parameter(name, kw) -> None:
    m = build(name, **kw).train()
    seq, lengths = padded_batch()
    (m(seq, lengths) @ m.item_table().T).logsumexp(-1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
