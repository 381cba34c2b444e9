"""Mamba4Rec against its reference equations, init and released parameter names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlsa4rec.models import create


def model(num_layers: int):
    torch.manual_seed(0)
    return create("mamba4rec", 30, num_layers=num_layers, MAX_ITEM_LIST_LENGTH=20).double().eval()


def transcription(m, seq, drop=lambda x: x):
    """MLSA4REC.md section 4, reusing only the Mamba blocks; ``drop`` stands for every dropout."""
    ln = lambda mod, x: F.layer_norm(x, x.shape[-1:], mod.weight, mod.bias, 1e-12)  # noqa: E731
    x = ln(m.LayerNorm, drop(m.item_embedding.weight[seq]))
    n = len(m.mamba_layers)
    for layer in m.mamba_layers:
        h = drop(layer.mamba(x))
        h = ln(layer.LayerNorm, h) if n == 1 else ln(layer.LayerNorm, h + x)
        f = layer.ffn
        inner = drop(F.gelu(F.linear(h, f.w_1.weight, f.w_1.bias)))
        x = ln(f.LayerNorm, drop(F.linear(inner, f.w_2.weight, f.w_2.bias)) + h)
    return x


@pytest.mark.parametrize("num_layers", [1, 2])
def test_forward_is_the_reference(num_layers) -> None:
    m = model(num_layers)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move off the init (zero biases would hide a missing term)
    seq = torch.randint(1, 31, (3, 9))
    torch.testing.assert_close(m.encode(seq, torch.full((3,), 9)), transcription(m, seq))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_dropout_sits_where_the_released_code_puts_it(num_layers) -> None:
    """Training mode with every dropout replaced by a fixed scaling: any missing, extra or moved
    dropout changes the output."""
    m = model(num_layers).train()
    for module in m.modules():
        if type(module).__name__ == "Dropout":
            module.forward = lambda x: 0.5 * x
    seq = torch.randint(1, 31, (2, 7))
    expected = transcription(m, seq, drop=lambda x: 0.5 * x)
    torch.testing.assert_close(m.encode(seq, torch.full((2,), 7)), expected)


def test_single_layer_flag() -> None:
    """Only a stack of layers has the residual around Mamba (the output check is
    test_forward_is_the_reference[1])."""
    assert not model(1).mamba_layers[0].residual and model(2).mamba_layers[0].residual


def test_released_initialisation() -> None:
    torch.manual_seed(0)
    m = create("mamba4rec", 2000)
    assert abs(float(m.item_embedding.weight.detach().std()) - 0.02) < 0.001
    layer = m.mamba_layers[0]
    assert abs(float(layer.mamba.in_proj.weight.detach().std()) - 0.02) < 0.001
    assert abs(float(layer.ffn.w_1.weight.detach().std()) - 0.02) < 0.002
    for bias in (layer.mamba.dt_proj.bias, layer.ffn.w_1.bias, layer.ffn.w_2.bias, m.LayerNorm.bias):
        assert float(bias.detach().abs().max()) == 0.0
    torch.testing.assert_close(layer.mamba.A_log[0].detach(), torch.log(torch.arange(1.0, 33.0)))  # untouched
    assert float(layer.mamba.conv1d.bias.detach().abs().max()) > 0  # conv keeps PyTorch's own init


def test_released_parameter_names_and_count() -> None:
    m = create("mamba4rec", 100)
    names = set(m.state_dict())
    for name in ("item_embedding.weight", "LayerNorm.weight", "mamba_layers.0.mamba.A_log",
                 "mamba_layers.0.mamba.in_proj.weight", "mamba_layers.0.LayerNorm.bias",
                 "mamba_layers.0.ffn.w_1.weight", "mamba_layers.0.ffn.w_2.bias", "mamba_layers.0.ffn.LayerNorm.weight"):
        assert name in names
    d = 64
    ffn = (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * d
    assert m.num_parameters(exclude_embeddings=True) == 2 * d + 38_784 + 2 * d + ffn
