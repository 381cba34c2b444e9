"""Performer (FAVOR+ in SASRec's block): its equations, the softmax it approximates, the random
features (orthogonal, redrawn on schedule, seeded, saved), causality, streaming, parameters."""

from __future__ import annotations

import io
import math

import pytest
import safetensors.torch
import torch
from equations import sasrec_blocks

from mlsa4rec.errors import ConfigError
from mlsa4rec.layers.linear_attention import PerformerAttention, orthogonal_gaussian
from mlsa4rec.models import available, create

L = 80  # past one chunk (64), so the carried sums across chunks are exercised


def model(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    m = create("performer", 30, MAX_ITEM_LIST_LENGTH=L, **kw).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # off the init: zero biases would hide a missing term
    return m


def padded(batch_lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, 31, (len(batch_lengths), width), generator=g)
    for b, n in enumerate(batch_lengths):
        seq[b, n:] = 0
    return seq, torch.tensor(batch_lengths)


def phi(x, w):
    """FAVOR+'s positive random features, as written in the paper (no stabiliser)."""
    x = x / x.shape[-1] ** 0.25
    return torch.exp(x @ w.T - x.square().sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])


def transcription(m, seq, drop=lambda x: x):
    """The module docstring's equations, one head and one position at a time (no prefix sums)."""

    def head(att, q, k, v):
        qf, kf = phi(q, att.projection), phi(k, att.projection)
        context = torch.zeros_like(v)
        for t in range(q.shape[1]):
            weights = torch.einsum("bm,bjm->bj", qf[:, t], kf[:, :t + 1])    # j <= t
            context[:, t] = torch.einsum("bj,bjd->bd", weights, v[:, :t + 1]) / weights.sum(-1, keepdim=True)
        return context

    return sasrec_blocks(m, seq, drop, head)


def projections(m) -> list[torch.Tensor]:
    return [layer.attention.projection.clone() for layer in m.layers]


def test_registry_flags_and_settings() -> None:
    assert "performer" in available()
    m = create("performer", 10)
    assert m.causal and m.padding_invariant and m.streams and m.preferred_scheme == "all_positions"
    assert m.layers[0].attention.projection.shape == (64, 32)
    with pytest.raises(ConfigError, match="nb_features must be >= 1"):
        create("performer", 10, nb_features=0)
    with pytest.raises(ConfigError, match="feature_redraw_interval must be >= 0"):
        create("performer", 10, feature_redraw_interval=-1)
    with pytest.raises(ConfigError, match="unknown config key 'attn_dropout_prob'"):
        create("performer", 10, attn_dropout_prob=0.2)


def test_forward_is_the_equations() -> None:
    m = model()
    seq, lengths = padded([L, 70, 9], L)
    torch.testing.assert_close(m.encode(seq, lengths), transcription(m, seq), rtol=1e-10, atol=1e-10)


def test_dropout_sits_where_sasrec_puts_it() -> None:
    m = model().train()
    for module in m.modules():
        if type(module).__name__ == "Dropout":
            module.forward = lambda x: 0.5 * x
    seq, lengths = padded([20, 20], 20)
    torch.testing.assert_close(m.encode(seq, lengths), transcription(m, seq, drop=lambda x: 0.5 * x),
                               rtol=1e-10, atol=1e-10)


def test_stabilisers_are_exact_where_the_plain_features_underflow() -> None:
    """Queries and keys so long that every plain feature underflows in float32 (exp(-140) and
    below): the stabilised float32 attention still gives the unstabilised float64 formula, as the
    factors it divides out cancel exactly; across chunks, as the running max moves."""
    torch.manual_seed(0)
    att = PerformerAttention(16, 2, 0.0, 1e-12, nb_features=32, redraw_interval=0)
    g = torch.Generator().manual_seed(1)
    d, n = 8, 150

    def far():
        x = torch.randn(1, 2, n, d, generator=g)
        return x / x.norm(dim=-1, keepdim=True) * 20 * d ** 0.25

    q, k, v = far(), far(), torch.randn(1, 2, n, d, generator=g)
    assert phi(q, att.projection).max() == 0 and phi(k, att.projection).max() == 0   # plain float32
    w = att.projection.double()
    weights = (phi(q.double(), w) @ phi(k.double(), w).transpose(-2, -1)).tril()
    expected = weights @ v.double() / weights.sum(-1, keepdim=True)
    out = att.attend(q, k, torch.cat([v, torch.ones_like(v[..., :1])], -1))
    torch.testing.assert_close((out[..., :-1] / out[..., -1:]).double(), expected, rtol=1e-4, atol=1e-4)
    state = att.initial_state(1)  # the running max of step: the same
    for t in range(n):
        o, state = att.attend_step(q[:, :, t], k[:, :, t], torch.cat([v[:, :, t], torch.ones(1, 2, 1)], -1), state)
        torch.testing.assert_close((o[..., :-1] / o[..., -1:]).double(), expected[:, :, t], rtol=1e-4, atol=1e-4)


def test_favor_approximates_causal_softmax_attention() -> None:
    g = torch.Generator().manual_seed(1)
    d, n = 8, 30
    q, k = (torch.randn(2, 2, n, d, generator=g, dtype=torch.float64) * 0.7 for _ in range(2))
    v = torch.randn(2, 2, n, d, generator=g, dtype=torch.float64)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1),
                                                                  float("-inf"))
    exact = scores.softmax(-1) @ v
    errors = []
    for m in (64, 8192):
        torch.manual_seed(0)
        att = PerformerAttention(2 * d, 2, 0.0, 1e-12, nb_features=m, redraw_interval=0).double()
        out = att.attend(q, k, torch.cat([v, torch.ones_like(v[..., :1])], -1))
        errors.append(float((out[..., :-1] / out[..., -1:] - exact).abs().mean()))
    assert errors[1] < 0.02 and errors[1] < errors[0] / 3, errors


def test_random_features_are_orthogonal_gaussian_rows() -> None:
    d, m = 8, 20
    w = orthogonal_gaussian(m, d, torch.Generator().manual_seed(0))
    assert w.shape == (m, d) and w.dtype == torch.float64
    for lo in range(0, m, d):
        block = w[lo:lo + d]
        gram = block @ block.T
        torch.testing.assert_close(gram - torch.diag(torch.diagonal(gram)), torch.zeros_like(gram), atol=1e-12,
                                   rtol=0)
    big = orthogonal_gaussian(4000, d, torch.Generator().manual_seed(1))  # rows marginally N(0, I_d)
    assert abs(float(big.square().sum(1).mean()) - d) < 0.3
    torch.testing.assert_close(big.T @ big / 4000, torch.eye(d, dtype=torch.float64), atol=0.1, rtol=0)


def test_features_are_redrawn_every_interval_in_training_only() -> None:
    torch.manual_seed(0)
    m = create("performer", 30, MAX_ITEM_LIST_LENGTH=L, feature_redraw_interval=3)
    seq, lengths = padded([10, 4], 10)
    start = projections(m)
    m.eval()
    for _ in range(5):
        m(seq, lengths)
    assert all(torch.equal(a, b) for a, b in zip(projections(m), start))    # never in eval
    assert int(m.layers[0].attention.calls_since_redraw) == 0
    m.train()
    for _ in range(3):
        m(seq, lengths)
    assert all(torch.equal(a, b) for a, b in zip(projections(m), start))    # the first 3 steps use draw 0
    m(seq, lengths)                                                         # step 4: draw 1
    first = projections(m)
    assert all(not torch.equal(a, b) for a, b in zip(first, start))
    assert [int(layer.attention.redraws) for layer in m.layers] == [1, 1]
    assert not torch.equal(first[0], first[1])                              # each layer its own features
    for _ in range(3):
        m(seq, lengths)
    assert not any(torch.equal(a, b) for a, b in zip(projections(m), first))  # step 7: draw 2

    torch.manual_seed(0)
    never = create("performer", 30, MAX_ITEM_LIST_LENGTH=L, feature_redraw_interval=0).train()
    fixed = projections(never)
    for _ in range(5):
        never(seq, lengths)
    assert all(torch.equal(a, b) for a, b in zip(projections(never), fixed))


def test_features_are_reproducible_from_the_seed() -> None:
    def draws(seed):
        torch.manual_seed(seed)
        m = create("performer", 30, MAX_ITEM_LIST_LENGTH=L)
        out = projections(m)
        m.redraw_features()
        return out + projections(m)

    a, b, c = draws(0), draws(0), draws(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))


def test_features_are_saved_with_the_weights() -> None:
    torch.manual_seed(0)
    m = create("performer", 30, MAX_ITEM_LIST_LENGTH=L, feature_redraw_interval=2).train()
    seq, lengths = padded([10, 4], 10)
    for _ in range(3):  # one redraw, one call since
        m(seq, lengths)
    state = m.state_dict()
    for name in ("projection", "feature_seed", "redraws", "calls_since_redraw"):
        assert f"layers.1.attention.{name}" in state
    # what a run directory holds (safetensors), loaded into a model built from another seed
    blob = safetensors.torch.load(safetensors.torch.save({k: v.contiguous() for k, v in state.items()}))
    torch.manual_seed(1)
    other = create("performer", 30, MAX_ITEM_LIST_LENGTH=L, feature_redraw_interval=2)
    other.load_state_dict(blob)
    m.eval()
    other.eval()
    torch.testing.assert_close(other(seq, lengths), m(seq, lengths), rtol=0, atol=0)
    m.train()
    other.train()
    m(seq, lengths)  # both continue with the same next draw
    other(seq, lengths)
    assert all(torch.equal(a, b) for a, b in zip(projections(m), projections(other)))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True).keys() == state.keys()


def test_builds_on_the_meta_device() -> None:
    with torch.device("meta"):  # how a run estimates its memory
        m = create("performer", 30, MAX_ITEM_LIST_LENGTH=L)
    assert m.layers[0].attention.projection.is_meta


def test_causal_and_padding_invariant_across_chunks() -> None:
    m = model()
    seq, lengths = padded([L, 70, 9], L)
    h = m.encode(seq, lengths)
    changed = seq.clone()
    changed[:, 66:] = torch.randint(1, 31, (3, L - 66))
    torch.testing.assert_close(m.encode(changed, lengths)[:, :66], h[:, :66], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(seq[:, :70], lengths.clamp(max=70)), m(seq, lengths.clamp(max=70)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
@torch.no_grad()
def test_step_equals_forward_across_chunks(dtype, tol) -> None:
    m = model(dtype)
    seq, lengths = padded([L, 70, 9], L)
    h = m.encode(seq, lengths)
    state = m.initial_state(3)
    assert state.position.dtype == torch.int64 and all(s.sums.shape == (3, 2, 64, 33) and s.shift.shape == (3, 2)
                                                       for s in state.layers)
    for t in range(L):
        out, state = m.step(seq[:, t], state)
        torch.testing.assert_close(out, h[:, t], rtol=tol, atol=tol)


@torch.no_grad()
def test_step_refuses_to_go_past_the_learned_positions() -> None:
    torch.manual_seed(0)
    m = create("performer", 30, MAX_ITEM_LIST_LENGTH=3).eval()
    state = m.initial_state(1)
    for _ in range(3):
        _, state = m.step(torch.tensor([1]), state)
    with pytest.raises(ValueError, match="MAX_ITEM_LIST_LENGTH=3 events"):
        m.step(torch.tensor([1]), state)


def test_parameters_are_sasrecs() -> None:
    performer, sasrec = (create(n, 100, MAX_ITEM_LIST_LENGTH=50) for n in ("performer", "sasrec"))
    assert performer.num_parameters() == sasrec.num_parameters()          # the features are buffers
    assert performer.num_parameters(exclude_embeddings=True) == sasrec.num_parameters(exclude_embeddings=True)


def test_half_precision_keeps_fp32_features_and_sums() -> None:
    torch.manual_seed(0)
    m = create("performer", 30, MAX_ITEM_LIST_LENGTH=L).to(torch.bfloat16).eval()
    seq, lengths = padded([L, 70, 9], L)
    out = m(seq, lengths)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    state = m.initial_state(3)
    assert all(s.sums.dtype == s.shift.dtype == torch.float32 for s in state.layers)
    h, state = m.step(seq[:, 0], state)
    assert h.dtype == torch.bfloat16 and torch.isfinite(h).all()


def test_the_export_form_of_the_running_max_is_exact(monkeypatch) -> None:
    """cummax has no ONNX conversion; the masked max used while exporting gives the same maxima."""
    from mlsa4rec.layers.linear_attention import running_max

    x = torch.randn(2, 3, 17, dtype=torch.float64)
    eager = running_max(x)
    assert torch.equal(eager, x.cummax(-1).values)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert torch.equal(running_max(x), eager)
