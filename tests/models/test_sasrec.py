"""SASRec: its equations (RecBole 1.2.1, ``equations.sasrec``) in eval and training mode, the model
API contract, causality, padding invariance and parameter count."""

from __future__ import annotations

import pytest
import torch
from equations import Replay, gather_last, recorded_dropout, sasrec

from mlsa4rec.errors import ConfigError
from mlsa4rec.models import available, create


def model(**kw):
    torch.manual_seed(0)
    m = create("sasrec", 50, MAX_ITEM_LIST_LENGTH=12, **kw)
    return m.eval()


def test_registry() -> None:
    assert "sasrec" in available()
    with pytest.raises(ConfigError, match="unknown model 'sasrek'.*did you mean 'sasrec'"):
        create("sasrek", 10)
    with pytest.raises(ConfigError, match="unknown config key 'hidden'"):
        create("sasrec", 10, hidden=3)
    with pytest.raises(ConfigError, match="divisible"):
        create("sasrec", 10, hidden_size=63)
    with pytest.raises(ConfigError, match="n_heads must be >= 1"):
        create("sasrec", 10, n_heads=0)


def test_api_shapes_and_padding_column() -> None:
    m = model()
    seq = torch.tensor([[3, 4, 5, 0, 0], [7, 0, 0, 0, 0]])
    lengths = torch.tensor([3, 1])
    assert m(seq, lengths).shape == (2, 64)
    scores = m.full_sort_scores(seq, lengths)
    assert scores.shape == (2, 51)
    assert torch.isinf(scores[:, 0]).all() and (scores[:, 0] < 0).all()
    assert torch.isfinite(scores[:, 1:]).all()


def test_causal_and_padding_invariant() -> None:
    m = model()
    seq = torch.randint(1, 51, (3, 10))
    lengths = torch.tensor([10, 6, 2])
    for b, n in enumerate(lengths.tolist()):
        seq[b, n:] = 0
    h = m.encode(seq, lengths)
    changed = seq.clone()
    changed[:, 5:] = torch.randint(1, 51, (3, 5))
    h2 = m.encode(changed, lengths)
    torch.testing.assert_close(h[:, :5], h2[:, :5])  # positions < 5 never see positions >= 5
    # trailing padding does not change the user representation
    longer = torch.cat([seq, torch.zeros(3, 2, dtype=torch.long)], dim=1)
    torch.testing.assert_close(m(seq, lengths), m(longer, lengths))
    torch.testing.assert_close(m(seq[:, :6], lengths.clamp(max=6)), m(seq, lengths.clamp(max=6)))


def test_parameter_count() -> None:
    m = create("sasrec", 100, MAX_ITEM_LIST_LENGTH=50)
    d, inner, layers = 64, 256, 2
    per_layer = 4 * (d * d + d) + 2 * d + (d * inner + inner) + (inner * d + d) + 2 * d
    assert m.num_parameters() == 101 * d + 50 * d + 2 * d + layers * per_layer


def test_init_is_recbole() -> None:
    m = create("sasrec", 1000, MAX_ITEM_LIST_LENGTH=50)
    w = m.item_embedding.weight.detach()
    assert abs(float(w.std()) - 0.02) < 0.002
    assert float(m.layers[0].attention.query.bias.detach().abs().max()) == 0.0


def test_cosine_head_scores_are_cosines_over_the_temperature() -> None:
    seq = torch.tensor([[3, 4, 5, 0, 0], [7, 0, 0, 0, 0]])
    lengths = torch.tensor([3, 1])
    dot, cosine = model(), model(similarity="cosine", temperature=0.05)  # same seed: the same weights
    h, table = dot(seq, lengths), dot.item_embedding.weight
    want = torch.nn.functional.cosine_similarity(h[:, None, :], table[None, 1:, :], dim=-1) / 0.05
    scores = cosine.full_sort_scores(seq, lengths)
    torch.testing.assert_close(scores[:, 1:], want, rtol=1e-5, atol=1e-5)
    assert torch.isinf(scores[:, 0]).all() and float(scores[:, 1:].detach().abs().max()) <= 20.0 + 1e-4
    # every position of encode is a unit vector (the all-positions loss reads them all)
    torch.testing.assert_close(cosine.encode(seq, lengths).norm(dim=-1), torch.ones(2, 5))
    assert dot.config.similarity == "dot"  # RecBole's head stays the default
    torch.testing.assert_close(dot.full_sort_scores(seq, lengths)[:, 1:], h @ table[1:].t())


def test_cosine_head_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="similarity must be one of dot, cosine"):
        create("sasrec", 10, similarity="euclidean")
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        create("sasrec", 10, similarity="cosine", temperature=0.0)
    with pytest.raises(ConfigError, match="temperature applies to similarity: cosine only"):
        create("sasrec", 10, temperature=0.05)  # would be silently ignored by the dot product
    dot = create("sasrec", 10)
    assert dot.item_table() is dot.item_embedding.weight  # RecBole's tied table itself, no copy


def float64_model(**kw):
    torch.manual_seed(0)
    m = create("sasrec", 50, MAX_ITEM_LIST_LENGTH=12, **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # off the init: zero biases would hide a missing term
    return m


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(1, 51, (4, 11), generator=g)
    lengths = torch.tensor([11, 7, 3, 1])
    for b, n in enumerate(lengths.tolist()):
        seq[b, n:] = 0
    return seq, lengths


@pytest.mark.parametrize("layers, heads", [(2, 2), (3, 4)])
@torch.no_grad()
def test_encode_forward_and_scores_are_recboles_sasrec_in_float64(layers, heads) -> None:
    m = float64_model(n_layers=layers, n_heads=heads).eval()
    seq, lengths = padded_batch()
    want = sasrec(m, seq)
    got = m.encode(seq, lengths)
    for b, n in enumerate(lengths.tolist()):  # RecBole masks padded keys: the padded positions differ
        torch.testing.assert_close(got[b, :n], want[b, :n], rtol=1e-10, atol=1e-10)
    user = gather_last(want, lengths)
    torch.testing.assert_close(m(seq, lengths), user, rtol=1e-10, atol=1e-10)
    scores = m.full_sort_scores(seq, lengths)
    torch.testing.assert_close(scores[:, 1:], user @ m.item_embedding.weight[1:].T, rtol=1e-10, atol=1e-10)
    assert torch.isneginf(scores[:, 0]).all()


@pytest.mark.parametrize("layers, heads", [(2, 2), (3, 4)])
def test_training_mode_is_recboles_sasrec_with_the_same_dropout_masks(layers, heads) -> None:
    """Dropout on (hidden 0.3, attention 0.2, so a mask drawn at the wrong rate fails): the masks
    the model draws, replayed in the transcription, give its outputs; a dropout missing, extra, moved
    or at the wrong rate, or any other difference of the training path (its attention is written out
    rather than SDPA's), fails."""
    m = float64_model(n_layers=layers, n_heads=heads, hidden_dropout_prob=0.3, attn_dropout_prob=0.2).train()
    seq, lengths = padded_batch()
    torch.manual_seed(1)
    with recorded_dropout() as masks:
        got = m(seq, lengths)
    assert len(masks) == 1 + 3 * layers  # embeddings; per layer the attention weights, its output, the FFN's
    replay = Replay(masks)
    with torch.no_grad():
        want = gather_last(sasrec(m, seq, drop=replay.expect(0.3), drop_attn=replay.expect(0.2)), lengths)
    assert replay.exhausted
    torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        assert float((m.eval()(seq, lengths) - want).abs().max()) > 1e-2  # the masks did change the output
