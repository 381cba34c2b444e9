"""The streaming contract: ``initial_state`` / ``step`` equal ``forward`` on the whole history.

Every model that sets ``streams`` is fed histories of different lengths one item per step, and
after each step its representation must be the one ``forward`` gives on the history so far. The
state must be a pytree of batch-first tensors: flattened, saved, rebuilt, split and concatenated
along users, it must carry on as if nothing happened.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils import _pytree as pytree

from mlsa4rec.models import available, create

N_ITEMS = 30
LENGTHS = [1, 7, 20]
WIDTH = max(LENGTHS)

STREAMING = {
    "mamba4rec-1": ("mamba4rec", {"num_layers": 1}),
    "mamba4rec-2": ("mamba4rec", {"num_layers": 2}),
    "gru4rec-1": ("gru4rec", {"num_layers": 1}),
    "gru4rec-2": ("gru4rec", {"num_layers": 2}),
    "mlsa4rec-causal": ("mlsa4rec", {"variant": "causal"}),
    "mlsa4rec-causal-sequence": ("mlsa4rec", {"variant": "causal", "attn_softmax": "sequence"}),
    # an ablation with no Mamba block in the interaction layer: its state holds a None
    "mlsa4rec-causal-no-interaction-mamba": ("mlsa4rec", {"variant": "causal", "interaction_mamba": False}),
    "linrec": ("linrec", {}),
    "performer": ("performer", {}),
    "lrurec": ("lrurec", {}),
}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
# what each registered model declares at its defaults (a new model must be added here)
STREAMS = {"bert4rec": False, "gru4rec": True, "lightsans": False, "linrec": True, "lrurec": True, "mamba4rec": True,
           "mlsa4rec": False, "performer": True, "sasrec": False}


def build(case: str, dtype: torch.dtype = torch.float64):
    name, kw = STREAMING[case]
    torch.manual_seed(0)
    m = create(name, N_ITEMS, MAX_ITEM_LIST_LENGTH=WIDTH, **kw).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move off the init (zero biases would hide a missing term)
    return m


def histories(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3 users with LENGTHS items each, right-padded to WIDTH."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (len(LENGTHS), WIDTH), generator=g)
    for b, n in enumerate(LENGTHS):
        seq[b, n:] = 0
    return seq, torch.tensor(LENGTHS)


def tensors(state) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_flatten(state)[0] if leaf is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", STREAMING)
@torch.no_grad()
def test_each_step_equals_forward_on_the_history_so_far(case, dtype) -> None:
    m = build(case, dtype)
    assert m.streams
    seq, lengths = histories()
    tol = TOLERANCE[dtype]
    state = m.initial_state(len(LENGTHS))
    # the model's dtype by default (integer leaves, such as a position counter, aside)
    assert all(leaf.dtype == dtype for leaf in tensors(state) if leaf.is_floating_point())
    last = torch.empty(len(LENGTHS), m.item_table().shape[1], dtype=dtype)
    for t in range(WIDTH):
        h, state = m.step(seq[:, t], state)
        assert h.shape == last.shape and h.dtype == dtype
        active = lengths > t  # users whose history reaches t; the others are being fed padding
        expected = m(seq[:, :t + 1], lengths.clamp(max=t + 1))
        torch.testing.assert_close(h[active], expected[active], rtol=tol, atol=tol)
        last[lengths == t + 1] = h[lengths == t + 1]
    torch.testing.assert_close(last, m(seq, lengths), rtol=tol, atol=tol)


@pytest.mark.parametrize("case", STREAMING)
@torch.no_grad()
def test_state_is_a_pytree_of_batch_first_tensors(case) -> None:
    m = build(case)
    seq, _ = histories()
    batch = seq.shape[0]
    state = m.initial_state(batch, device="cpu")
    for t in range(5):
        _, state = m.step(seq[:, t], state)

    flat, spec = pytree.tree_flatten(state)
    assert flat and all(isinstance(leaf, torch.Tensor) and leaf.shape[0] == batch for leaf in flat)
    buffer = io.BytesIO()  # what serving would do: store the leaves, rebuild with the spec
    torch.save(flat, buffer)
    buffer.seek(0)
    rebuilt = pytree.tree_unflatten(torch.load(buffer), spec)
    assert pytree.tree_structure(rebuilt) == spec

    # users taken apart and put back in another order continue as the whole batch does
    order = [2, 0, 1]
    users = [pytree.tree_map(lambda leaf, b=b: leaf[b:b + 1], rebuilt) for b in range(batch)]
    merged = pytree.tree_map(lambda *rows: torch.cat(rows), *[users[b] for b in order])
    for t in range(5, 12):
        h, state = m.step(seq[:, t], state)
        h_rebuilt, rebuilt = m.step(seq[:, t], rebuilt)
        h_merged, merged = m.step(seq[order, t], merged)
        torch.testing.assert_close(h_rebuilt, h, rtol=0, atol=0)
        torch.testing.assert_close(h_merged, h[order], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", available())
@torch.no_grad()
def test_every_registered_model_declares_whether_it_streams(name) -> None:
    torch.manual_seed(0)
    m = create(name, N_ITEMS).eval()
    assert isinstance(m.streams, bool)
    assert name in STREAMS, f"add {name} to STREAMS"
    assert m.streams == STREAMS[name]
    items = torch.tensor([3, 5])
    if m.streams:
        h, _ = m.step(items, m.initial_state(2))
        torch.testing.assert_close(h, m(items[:, None], torch.ones(2, dtype=torch.long)))
    else:
        with pytest.raises(NotImplementedError, match=f"{name} re-encodes its history"):
            m.initial_state(2)
        with pytest.raises(NotImplementedError, match=f"{name} re-encodes its history"):
            m.step(items, [])


@pytest.mark.parametrize("variant, streams", [("faithful", False), ("masked", False), ("causal", True)])
def test_mlsa4rec_streams_only_as_the_causal_variant(variant, streams) -> None:
    m = create("mlsa4rec", N_ITEMS, variant=variant)
    assert m.streams is streams
    if not streams:
        with pytest.raises(NotImplementedError, match=f"mlsa4rec re-encodes its history.*{variant}.*variant=causal"):
            m.initial_state(1)
