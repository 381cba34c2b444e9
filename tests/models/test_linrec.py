"""LinRec: its equations (causal L2-normalised ELU linear attention in SASRec's block), the
chunked prefix sums, causality, padding invariance, streaming and parameter count."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from equations import sasrec_blocks

from mlsa4rec.config import build_config
from mlsa4rec.errors import ConfigError
from mlsa4rec.layers.linear_attention import causal_linear_attention
from mlsa4rec.models import available, build_model, create, get_class

L = 80  # past one chunk (64), so the carried sums across chunks are exercised


def model(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    m = create("linrec", 30, MAX_ITEM_LIST_LENGTH=L, **kw).to(dtype).eval()
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


def transcription(m, seq, drop=lambda x: x):
    """The module docstring's equations, one head and one position at a time (no prefix sums)."""

    def head(att, q, k, v):
        q = F.elu(q) / F.elu(q).norm(dim=-1, keepdim=True)
        k = F.elu(k) / F.elu(k).norm(dim=-1, keepdim=True)
        context = torch.zeros_like(v)
        for t in range(q.shape[1]):
            weights = torch.einsum("bd,bjd->bj", q[:, t], k[:, :t + 1]) / math.sqrt(q.shape[-1])   # j <= t
            context[:, t] = torch.einsum("bj,bjd->bd", weights, v[:, :t + 1])
        return context

    return sasrec_blocks(m, seq, drop, head)


def test_registry_flags_and_settings() -> None:
    assert "linrec" in available()
    m = create("linrec", 10)
    assert m.causal and m.padding_invariant and m.streams and m.preferred_scheme == "all_positions"
    with pytest.raises(ConfigError, match="unknown config key 'attn_dropout_prob'"):
        create("linrec", 10, attn_dropout_prob=0.2)   # the linear attention has no attention dropout
    with pytest.raises(ConfigError, match="divisible"):
        create("linrec", 10, hidden_size=63)
    with pytest.raises(ConfigError, match="n_layers must be >= 1"):
        create("linrec", 10, n_layers=0)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "log_scale"])
@pytest.mark.parametrize("n, chunk", [(5, 64), (64, 64), (150, 64), (150, 7), (13, 4)])
def test_chunked_prefix_sums_equal_the_masked_quadratic_form(n, chunk, scaled) -> None:
    """The shared kernel (LinRec; Performer with its running stabiliser c as ``log_scale``)."""
    g = torch.Generator().manual_seed(n)
    qf, kf = (torch.randn(2, 3, n, 6, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, n, 5, generator=g, dtype=torch.float64)
    scores = torch.einsum("bhtm,bhjm->bhtj", qf, kf).tril()
    c = None
    if scaled:  # any nondecreasing c: out_t = sum_{j<=t} (qf_t . kf_j) exp(c_j - c_t) v_j
        c = (torch.randn(2, 3, n, generator=g, dtype=torch.float64) * 3).cummax(-1).values
        scores = scores * (c[..., None, :] - c[..., :, None]).exp().tril()
    torch.testing.assert_close(causal_linear_attention(qf, kf, v, chunk, log_scale=c), scores @ v,
                               rtol=1e-12, atol=1e-12)


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
    assert state.position.dtype == torch.int64 and all(s.dtype == dtype for s in state.layers)
    for t in range(L):
        out, state = m.step(seq[:, t], state)
        torch.testing.assert_close(out, h[:, t], rtol=tol, atol=tol)
    assert state.position.tolist() == [L] * 3


@torch.no_grad()
def test_step_refuses_to_go_past_the_learned_positions() -> None:
    torch.manual_seed(0)
    m = create("linrec", 30, MAX_ITEM_LIST_LENGTH=4).eval()
    state = m.initial_state(2)
    for _ in range(4):
        _, state = m.step(torch.tensor([1, 2]), state)
    with pytest.raises(ValueError, match="MAX_ITEM_LIST_LENGTH=4 events.*re-encode the most recent 4"):
        m.step(torch.tensor([1, 2]), state)


def test_half_precision_keeps_fp32_sums() -> None:
    torch.manual_seed(0)
    m = create("linrec", 30, MAX_ITEM_LIST_LENGTH=L).to(torch.bfloat16).eval()
    seq, lengths = padded([L, 70, 9], L)
    assert m(seq, lengths).dtype == torch.bfloat16
    state = m.initial_state(3)
    assert all(s.dtype == torch.float32 for s in state.layers)
    h, state = m.step(seq[:, 0], state)
    assert h.dtype == torch.bfloat16 and torch.isfinite(h).all()


def test_parameters_are_sasrecs() -> None:
    linrec, sasrec = create("linrec", 100, MAX_ITEM_LIST_LENGTH=50), create("sasrec", 100, MAX_ITEM_LIST_LENGTH=50)
    d, inner, layers = 64, 256, 2
    per_layer = 4 * (d * d + d) + 2 * d + (d * inner + inner) + (inner * d + d) + 2 * d
    assert linrec.num_parameters() == 101 * d + 50 * d + 2 * d + layers * per_layer == sasrec.num_parameters()
    # same names and shapes: a SASRec state dict loads as it is (only the attention differs)
    assert {k: v.shape for k, v in linrec.state_dict().items()} == {k: v.shape for k, v in sasrec.state_dict().items()}
    linrec.load_state_dict(sasrec.state_dict())
    assert abs(float(linrec.item_embedding.weight.detach().std()) - 0.02) < 0.003


def test_released_preset() -> None:
    config = build_config("linrec", files=["linrec-ml-1m"])
    m = build_model(get_class("linrec"), 3416, config.model_kwargs(), config["MAX_ITEM_LIST_LENGTH"])
    assert (config["hidden_size"], config["n_heads"], config["inner_size"], config["n_layers"]) == (128, 8, 256, 2)
    assert config["hidden_dropout_prob"] == 0.2 and config["MAX_ITEM_LIST_LENGTH"] == 200
    assert (config["train_batch_size"], config["learning_rate"], config["train_scheme"]) == (2048, 0.001, "prefix")
    assert m.layers[0].attention.head_size == 16
