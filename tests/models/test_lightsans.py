"""LightSANs against RecBole's equations (MLSA4REC.md section 3), its parameter names and init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from equations import lin, ln, softmax

from mlsa4rec.models import create
from mlsa4rec.models.base import gather_last


def model(**kw):
    torch.manual_seed(0)
    m = create("lightsans", 30, MAX_ITEM_LIST_LENGTH=12, **kw).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m



def transcription(m, seq, n_heads=2, drop=lambda x: x):
    """RecBole 1.2's LightSANs forward, one head at a time."""
    x = drop(ln(m.LayerNorm, m.item_embedding.weight[seq]))
    pos = m.position_embedding.weight[: seq.shape[1]]
    d_h = x.shape[-1] // n_heads
    for layer in m.trm_encoder.layer:
        att = layer.multi_head_attention
        q, k, v = lin(att.query, x), lin(att.key, x), lin(att.value, x)
        k_pool = torch.einsum("blp,bld->bpd", softmax(k @ att.attpooling_key.theta, 1), k)
        v_pool = torch.einsum("blp,bld->bpd", softmax(v @ att.attpooling_value.theta, 1), v)
        p = ln(att.pos_ln, pos)
        context = torch.zeros_like(x)
        for h in range(n_heads):
            c = slice(h * d_h, (h + 1) * d_h)
            items = drop(softmax(q[..., c] @ k_pool[..., c].transpose(1, 2) / math.sqrt(d_h), 1)) @ v_pool[..., c]
            q_p = lin(att.pos_q_linear, p)[:, c] * (2 * d_h) ** -0.5
            k_p = lin(att.pos_k_linear, p)[:, c]
            positions = softmax(q_p @ k_p.T / math.sqrt(d_h), 0) @ v[..., c]     # over the query axis
            context[..., c] = items + positions
        h1 = ln(att.LayerNorm, drop(lin(att.dense, context)) + x)
        ff = layer.feed_forward
        x = ln(ff.layer_norm, drop(lin(ff.dense_2, F.gelu(lin(ff.dense_1, h1)))) + h1)
    return x


def test_forward_is_recboles() -> None:
    m = model()
    seq = torch.randint(1, 31, (3, 12))
    seq[1, 7:] = 0
    torch.testing.assert_close(m.encode(seq, torch.tensor([12, 7, 12])), transcription(m, seq))


def test_dropout_sits_where_recbole_puts_it() -> None:
    m = model().train()
    for module in m.modules():
        if type(module).__name__ == "Dropout":
            module.forward = lambda x: 0.5 * x
    seq = torch.randint(1, 31, (2, 8))
    torch.testing.assert_close(m.encode(seq, torch.full((2,), 8)), transcription(m, seq, drop=lambda x: 0.5 * x))


def test_recbole_names_count_and_init() -> None:
    torch.manual_seed(0)
    m = create("lightsans", 100)
    names = set(dict(m.named_parameters()))
    att = "trm_encoder.layer.1.multi_head_attention."
    for name in ("query.weight", "attpooling_key.theta", "attpooling_value.theta", "pos_q_linear.weight",
                 "pos_k_linear.bias", "pos_ln.weight", "dense.weight", "LayerNorm.bias"):
        assert att + name in names
    # per layer: Q, K, V, 2 Theta (64 x 5), position q/k, pos LN, dense, LN, FFN 64-256-64, LN;
    # plus 50 positions and the embedding LN
    assert m.num_parameters(exclude_embeddings=True) == 2 * 59_072 + 50 * 64 + 128
    assert abs(float(m.trm_encoder.layer[0].multi_head_attention.attpooling_key.theta.detach().std()) - 1) < 0.2
    assert abs(float(m.item_embedding.weight.detach().std()) - 0.02) < 0.003
    assert not m.trm_encoder.layer[0].multi_head_attention.dense.bias.any()
    assert not (m.causal or m.padding_invariant) and m.preferred_scheme == "prefix"


@pytest.mark.parametrize("train", [False, True])
def test_forward_is_encode_at_the_last_item_with_its_gradients(train: bool) -> None:
    """forward computes the last layer at each row's last item only; it must equal the full encode
    gathered there, outputs and every parameter's gradient (dropout made deterministic in training)."""
    m = model(n_layers=3)
    if train:
        m.train()
        for module in m.modules():
            if type(module).__name__ == "Dropout":
                module.forward = lambda x: 0.5 * x
    seq = torch.randint(1, 31, (4, 12))
    lengths = torch.tensor([12, 7, 1, 3])
    for row, n in enumerate(lengths.tolist()):
        seq[row, n:] = 0
    outputs, grads = [], []
    for compute in (lambda: m(seq, lengths), lambda: gather_last(m.encode(seq, lengths), lengths)):
        m.zero_grad()
        out = compute()
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outputs.append(out)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert outputs[0].shape == (4, m.config.hidden_size)
    torch.testing.assert_close(outputs[0], outputs[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(m.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
