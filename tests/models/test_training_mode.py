"""Every registered model in training mode, dropout on: causal models stay causal, and every model
computes its equations with the dropout masks it drew.

The other model tests run in eval mode or with dropout 0 (or dropout replaced by a fixed scale), so
a bug that exists only while dropout draws masks - the attention's training path, a causal mask
applied only in eval, a dropout moved past its LayerNorm - passes them. Here the masks the model's
dropout draws are recorded (``equations.recorded_dropout``) and replayed in the float64
transcription of its equations (``equations.Replay``), in eval mode and in training mode.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import test_bert4rec
import test_lightsans
import test_linrec
import test_lrurec
import test_mamba4rec
import test_mlsa4rec
import test_performer
import torch
from equations import Replay, gru4rec, lin, ln, recorded_dropout, sasrec, softmax

from mlsa4rec.models import available, create

N_ITEMS = 40
WIDTH = 10
LENGTHS = [10, 6, 2]

# every dropout setting of each model, at a rate of its own where a model has two (a transcription
# that names the rate it expects then checks the model drew each mask with the right one)
DROPOUT = {
    "sasrec": {"hidden_dropout_prob": 0.3, "attn_dropout_prob": 0.2},
    "bert4rec": {"hidden_dropout_prob": 0.3, "attn_dropout_prob": 0.2},
    "lightsans": {"hidden_dropout_prob": 0.3, "attn_dropout_prob": 0.2},
    "linrec": {"hidden_dropout_prob": 0.3},
    "performer": {"hidden_dropout_prob": 0.3},
    "gru4rec": {"dropout_prob": 0.3},
    "mamba4rec": {"dropout_prob": 0.3},
    "mlsa4rec": {"dropout_prob": 0.3, "attn_dropout_prob": 0.2},
    "lrurec": {"dropout_prob": 0.3, "lru_dropout_prob": 0.2},
}


def rate(drop, p: float):
    """``drop`` that checks the mask's rate when it replays the model's masks."""
    return drop.expect(p) if isinstance(drop, Replay) else drop


# --- the LSA of MLSA4Rec's masked and causal variants, from their definitions (layers/lsa.py) ---

def pool(z: torch.Tensor, theta: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """P softmax-weighted averages of the positions of z (B x L x D), over the ``real`` ones only."""
    logits = z @ theta
    if real is not None:
        logits = logits.masked_fill(~real[..., None], float("-inf"))
    return torch.einsum("blp,bld->bpd", softmax(logits, dim=1), z)


def lsa_masked(mod, x, n_heads, drop, lengths, axis):
    """Padding takes no part: not in the pooling, not in a sequence-axis softmax."""
    real = torch.arange(x.shape[1])[None, :] < lengths[:, None]                  # B x L
    q, k, v = lin(mod.query, x), lin(mod.key, x), lin(mod.value, x)
    k_pool, v_pool = pool(k, mod.attpooling_key.theta, real), pool(v, mod.attpooling_value.theta, real)
    d = x.shape[-1] // n_heads
    context = torch.zeros_like(x)
    for h in range(n_heads):
        c = slice(h * d, (h + 1) * d)
        scores = q[..., c] @ k_pool[..., c].transpose(1, 2) / math.sqrt(d)        # B x L x P
        if axis == "sequence":
            weights = softmax(scores.masked_fill(~real[..., None], float("-inf")), dim=1)
        else:
            weights = softmax(scores, dim=-1)
        context[..., c] = drop(weights) @ v_pool[..., c]
    return ln(mod.LayerNorm, drop(context) + x)


def lsa_causal(mod, x, n_heads, drop, axis):
    """Position t pools positions <= t only; a sequence-axis softmax at t runs over positions <= t,
    each scored against its own pooling."""
    width = x.shape[1]
    q, k, v = lin(mod.query, x), lin(mod.key, x), lin(mod.value, x)
    k_pools = [pool(k[:, :t + 1], mod.attpooling_key.theta) for t in range(width)]      # B x P x D each
    v_pools = [pool(v[:, :t + 1], mod.attpooling_value.theta) for t in range(width)]
    d = x.shape[-1] // n_heads
    context = torch.zeros_like(x)
    for h in range(n_heads):
        c = slice(h * d, (h + 1) * d)
        scores = torch.stack([torch.einsum("bd,bpd->bp", q[:, t, c], k_pools[t][..., c])
                              for t in range(width)], 1) / math.sqrt(d)                  # B x L x P
        if axis == "sequence":
            weights = torch.stack([scores[:, t].exp() / scores[:, :t + 1].exp().sum(1) for t in range(width)], 1)
        else:
            weights = softmax(scores, dim=-1)
        weights = drop(weights)
        context[..., c] = torch.stack([torch.einsum("bp,bpd->bd", weights[:, t], v_pools[t][..., c])
                                       for t in range(width)], 1)
    return ln(mod.LayerNorm, drop(context) + x)


def mlsa4rec_reference(variant: str, axis: str):
    def reference(m, seq, lengths, drop):
        if variant == "faithful":
            lsa = test_mlsa4rec.lsa_reference
        elif variant == "masked":
            lsa = partial(lsa_masked, lengths=lengths, axis=axis)
        else:
            lsa = partial(lsa_causal, axis=axis)
        return test_mlsa4rec.transcription(m, seq, m.config.n_heads, drop, lsa=lsa)
    return reference


# case -> (model, settings, reference(m, seq, lengths, drop) -> B x L x D at least at real positions)
REFERENCES = {
    "sasrec": ("sasrec", {}, lambda m, s, n, drop: sasrec(m, s, rate(drop, 0.3), rate(drop, 0.2))),
    "bert4rec": ("bert4rec", {}, lambda m, s, n, drop: test_bert4rec.transcription(
        m, s, n, drop if isinstance(drop, Replay) else None)),
    "lightsans": ("lightsans", {}, lambda m, s, n, drop: test_lightsans.transcription(m, s, m.config.n_heads, drop)),
    "linrec": ("linrec", {}, lambda m, s, n, drop: test_linrec.transcription(m, s, drop)),
    "performer": ("performer", {}, lambda m, s, n, drop: test_performer.transcription(m, s, drop)),
    "gru4rec": ("gru4rec", {}, lambda m, s, n, drop: gru4rec(m, s, drop)),
    "gru4rec-2-layers": ("gru4rec", {"num_layers": 2}, lambda m, s, n, drop: gru4rec(m, s, drop)),
    "mamba4rec": ("mamba4rec", {}, lambda m, s, n, drop: test_mamba4rec.transcription(m, s, drop)),
    "lrurec": ("lrurec", {}, lambda m, s, n, drop: test_lrurec.transcription(m, s, rate(drop, 0.3), rate(drop, 0.2))),
    "mlsa4rec": ("mlsa4rec", {}, mlsa4rec_reference("faithful", "sequence")),
    "mlsa4rec-masked": ("mlsa4rec", {"variant": "masked"}, mlsa4rec_reference("masked", "sequence")),
    "mlsa4rec-masked-interests": ("mlsa4rec", {"variant": "masked", "attn_softmax": "interests"},
                                  mlsa4rec_reference("masked", "interests")),
    "mlsa4rec-causal": ("mlsa4rec", {"variant": "causal"}, mlsa4rec_reference("causal", "interests")),
    "mlsa4rec-causal-sequence": ("mlsa4rec", {"variant": "causal", "attn_softmax": "sequence"},
                                 mlsa4rec_reference("causal", "sequence")),
}


def build(case: str, training: bool):
    name, kw, _ = REFERENCES[case]
    torch.manual_seed(0)
    m = create(name, N_ITEMS, MAX_ITEM_LIST_LENGTH=12, **DROPOUT[name], **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # off the init: zero biases would hide a missing term
    return m.train(training)


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (len(LENGTHS), WIDTH), generator=g)
    for b, n in enumerate(LENGTHS):
        seq[b, n:] = 0
    return seq, torch.tensor(LENGTHS)


def real_positions(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return h[torch.arange(h.shape[1])[None, :] < lengths[:, None]]


def test_every_registered_model_has_a_reference_and_dropout_settings() -> None:
    """A new model must come with its transcription here, and the dropout settings it has."""
    assert {name for name, _, _ in REFERENCES.values()} == set(available()) == set(DROPOUT)
    for name in available():
        fields = set(vars(create(name, 10).config))
        assert {k for k in fields if "dropout" in k} == set(DROPOUT[name]), name


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", REFERENCES)
def test_values_are_the_equations_with_the_models_own_dropout_masks(case, training) -> None:
    m = build(case, training)
    seq, lengths = padded_batch()
    torch.manual_seed(1)
    with recorded_dropout() as masks:
        got = m.encode(seq, lengths)
    assert bool(masks) == training  # dropout draws masks in training mode only
    replay = Replay(masks)
    with torch.no_grad():
        want = REFERENCES[case][2](m, seq, lengths, replay if training else (lambda x: x))
    assert replay.exhausted, f"the model drew {len(masks)} masks, the equations used {replay.position}"
    got = got.detach()[..., :want.shape[-1]]  # BERT4Rec and LRURec append a constant 1 for their bias
    torch.testing.assert_close(real_positions(got, lengths), real_positions(want, lengths), rtol=1e-10, atol=1e-10)
    if training:  # the masks mattered: without them the output is another
        with torch.no_grad():
            plain = m.eval().encode(seq, lengths)[..., :want.shape[-1]]
        assert float((real_positions(plain - got, lengths)).abs().max()) > 1e-2


CAUSAL = [case for case in REFERENCES if build(case, False).causal]


def test_the_causal_cases_are_the_causal_models() -> None:
    assert set(CAUSAL) == {"sasrec", "gru4rec", "gru4rec-2-layers", "linrec", "performer", "mamba4rec", "lrurec",
                           "mlsa4rec-causal", "mlsa4rec-causal-sequence"}


@pytest.mark.parametrize("case", CAUSAL)
@torch.no_grad()
def test_causal_in_training_mode_with_dropout(case) -> None:
    """Same seed before each forward (and the same shapes), so both draw the same dropout masks:
    outputs before t must not move when the items at t and after change."""
    model = build(case, training=True)
    seq, lengths = padded_batch()

    def encode(items: torch.Tensor, seed: int = 3) -> torch.Tensor:
        m = copy.deepcopy(model)  # the same module state each time (Performer counts its calls)
        torch.manual_seed(seed)
        return m.encode(items, lengths)

    out = encode(seq)
    for t in (1, 4, 7):
        changed = seq.clone()
        changed[:, t:] = (seq[:, t:] % N_ITEMS) + 1  # a different item at every position from t on
        other = encode(changed)
        torch.testing.assert_close(other[:, :t], out[:, :t], rtol=0, atol=1e-12)
        assert float((other[:, t:] - out[:, t:]).abs().max()) > 1e-3  # and the change did reach position t
    assert float((encode(seq, seed=4) - out).abs().max()) > 1e-2  # dropout is on: another seed, other outputs
