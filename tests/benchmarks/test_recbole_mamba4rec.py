"""The oracle's Mamba4Rec (benchmarks/recbole_mamba4rec.py) computes what ours computes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mlsa4rec.models.mamba4rec import Mamba4Rec, Mamba4RecConfig

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("recbole_mamba4rec", REPO / "benchmarks" / "recbole_mamba4rec.py")
rm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rm)

N_ITEMS, L = 40, 12


def _pair(num_layers: int, seed: int = 0) -> tuple[Mamba4Rec, torch.nn.Module]:
    config = Mamba4RecConfig(hidden_size=16, num_layers=num_layers, dropout_prob=0.3, d_state=4, d_conv=3, expand=2)
    torch.manual_seed(seed)
    ours = Mamba4Rec(N_ITEMS, L, config)
    torch.manual_seed(seed + 1)
    theirs = rm.Mamba4RecNetwork(N_ITEMS + 1, config.hidden_size, num_layers, config.dropout_prob, config.d_state,
                                 config.d_conv, config.expand, config.initializer_range)
    return ours, theirs


@pytest.mark.parametrize("num_layers", [1, 2])
def test_same_weights_give_the_same_hidden_states(num_layers):
    ours, theirs = _pair(num_layers)
    theirs.load_state_dict(ours.state_dict())  # strict: the same parameter names, as released
    ours.eval(), theirs.eval()
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([1, 5, L, 7])
    seq = torch.randint(1, N_ITEMS + 1, (4, L), generator=g)
    seq[torch.arange(L)[None, :] >= lengths[:, None]] = 0  # right padding
    with torch.no_grad():
        want = ours.encode(seq, lengths)
        got = theirs(seq)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the one-layer case really has no residual around the block
        ours.mamba_layers[0].mamba.out_proj.weight.zero_()
        theirs.mamba_layers[0].mamba.out_proj.weight.zero_()
        torch.testing.assert_close(theirs(seq), ours.encode(seq, lengths), rtol=1e-5, atol=1e-5)


def test_released_init_zeroes_every_linear_bias_and_draws_weights_at_0_02():
    _, theirs = _pair(1)
    mamba = theirs.mamba_layers[0].mamba
    assert torch.count_nonzero(mamba.dt_proj.bias) == 0  # Delta starts at softplus(0) = ln 2
    torch.manual_seed(0)
    big = rm.Mamba4RecNetwork(5000, 64, 1, 0.2, 32, 4, 2, 0.02)
    assert big.item_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.count_nonzero(big.item_embedding.weight[0]) == 64  # re-drawn over padding_idx, as released
    assert big.mamba_layers[0].ffn.w_1.weight.std().item() == pytest.approx(0.02, rel=0.02)
    torch.testing.assert_close(big.mamba_layers[0].mamba.A_log.exp()[0].detach(), torch.arange(1.0, 33.0))  # untouched
