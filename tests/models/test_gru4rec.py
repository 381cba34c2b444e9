"""GRU4Rec: RecBole's layers and init."""

from __future__ import annotations

import torch

from mlsa4rec.models import create


def test_forward_is_recbole() -> None:
    torch.manual_seed(0)
    m = create("gru4rec", 30).eval()
    seq = torch.randint(1, 31, (2, 7))
    gru = m.gru_layers
    h = torch.zeros(2, 128)
    outs = []
    for t in range(7):  # PyTorch's GRU equations without biases
        x = m.item_embedding.weight[seq[:, t]]
        r = torch.sigmoid(x @ gru.weight_ih_l0[:128].T + h @ gru.weight_hh_l0[:128].T)
        z = torch.sigmoid(x @ gru.weight_ih_l0[128:256].T + h @ gru.weight_hh_l0[128:256].T)
        n = torch.tanh(x @ gru.weight_ih_l0[256:].T + r * (h @ gru.weight_hh_l0[256:].T))
        h = (1 - z) * n + z * h
        outs.append(m.dense(h))
    torch.testing.assert_close(m.encode(seq, torch.full((2,), 7)), torch.stack(outs, 1), rtol=1e-5, atol=1e-5)


def test_shapes_and_init() -> None:
    torch.manual_seed(0)
    m = create("gru4rec", 5000)
    assert m.gru_layers.bias is False
    assert m.dense.in_features == 128 and m.dense.out_features == 64
    std = float(m.item_embedding.weight.detach().std())  # xavier normal: sqrt(2 / (5001 + 64))
    assert abs(std - (2 / 5065) ** 0.5) < 0.002
