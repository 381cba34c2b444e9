"""Weights saved by the authors' RecBole code load into our models and give identical outputs."""

from __future__ import annotations

import pytest
import torch

from mlsa4rec.convert import ConversionError, from_recbole
from mlsa4rec.models import create

# The released MLSA4Rec's parameter names (MLSA4REC.md, issue 4), written out here rather than
# derived from the converter's rules. Each maps to our name, or to None for a module the released
# forward pass never uses.
MAMBA = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
         "A_log", "D", "out_proj.weight"]
LN = ["weight", "bias"]
RELEASED = {
    **{f"item_embedding.{p}": f"item_embedding.{p}" for p in ["weight"]},
    **{f"LayerNorm.{p}": f"LayerNorm.{p}" for p in LN},
    **{f"models.0.mambas.0.{p}": f"interaction_layers.0.mamba.{p}" for p in MAMBA},
    **{f"models.0.mlp1.{p}": f"interaction_layers.0.gate.{p}" for p in LN},
    **{f"models.0.mlp2.{p}": f"interaction_layers.0.fuse.{p}" for p in LN},
    **{f"models.0.mlp3.{p}": f"interaction_layers.0.skip.{p}" for p in LN},
    **{f"models.0.LayerNorm{i}.{p}": f"interaction_layers.0.LayerNorm{i}.{p}" for i in (1, 2, 3) for p in LN},
    **{f"models.0.trm_encoder.{m}.{p}": f"interaction_layers.0.lsa.{m}.{p}"
       for m in ("query", "key", "value", "LayerNorm") for p in LN},
    "models.0.trm_encoder.attpooling_key.theta": "interaction_layers.0.lsa.attpooling_key.theta",
    "models.0.trm_encoder.attpooling_value.theta": "interaction_layers.0.lsa.attpooling_value.theta",
    **{f"mamba_layers.{j}.mamba.{p}": f"mamba_layers.{j}.mamba.{p}" for j in (0, 1) for p in MAMBA},
    **{f"mamba_layers.{j}.LayerNorm.{p}": f"mamba_layers.{j}.LayerNorm.{p}" for j in (0, 1) for p in LN},
    # built, never used
    **{f"mamba.{p}": None for p in MAMBA},
    **{f"models.0.trm_encoder.{m}.{p}": None for m in ("pos_q_linear", "pos_k_linear", "pos_ln", "dense")
       for p in LN},
}


def trained(name: str, n_items: int, seed: int):
    """A model whose every tensor is its own: at init the LayerNorms, the biases, A_log and D of
    any two models coincide, so weights loaded into the wrong one of them would go unseen."""
    torch.manual_seed(seed)
    m = create(name, n_items).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def assert_loaded(fresh, source) -> None:
    """``fresh`` now holds ``source``'s weights, each under its own name."""
    ours, theirs = fresh.state_dict(), source.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def assert_all_distinct(model) -> None:
    tensors = list(model.state_dict().items())
    for i, (a, x) in enumerate(tensors):
        for b, y in tensors[i + 1:]:
            assert x.shape != y.shape or not torch.equal(x, y), (a, b)


def released_checkpoint(model) -> dict:
    """A RecBole checkpoint as the released code writes it, holding ``model``'s weights."""
    ours = model.state_dict()
    state = {}
    for released, mine in RELEASED.items():
        state[released] = ours[mine].clone() if mine else torch.randn(3, 3)
    return {"config": None, "epoch": 7, "state_dict": state, "other_parameter": None}


def test_released_mlsa4rec_weights_give_identical_outputs() -> None:
    source = trained("mlsa4rec", 50, seed=1)
    assert_all_distinct(source)
    checkpoint = released_checkpoint(source)
    assert set(RELEASED.values()) - {None} == set(source.state_dict())  # the list above is complete
    fresh = trained("mlsa4rec", 50, seed=2)
    fresh.load_state_dict(from_recbole(checkpoint, fresh))
    assert_loaded(fresh, source)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, 51, (4, 50), generator=g)
    lengths = torch.tensor([50, 20, 3, 1])
    scores = fresh.full_sort_scores(seq, lengths)
    assert torch.equal(scores, source.full_sort_scores(seq, lengths))
    assert not torch.equal(scores, trained("mlsa4rec", 50, seed=2).full_sort_scores(seq, lengths))


def test_mamba4rec_weights_pass_through() -> None:
    source = trained("mamba4rec", 40, seed=1)
    assert_all_distinct(source)
    fresh = trained("mamba4rec", 40, seed=2)
    fresh.load_state_dict(from_recbole({"state_dict": source.state_dict()}, fresh))
    assert_loaded(fresh, source)
    g = torch.Generator().manual_seed(0)
    seq, lengths = torch.randint(1, 41, (2, 9), generator=g), torch.tensor([9, 4])
    assert torch.equal(fresh(seq, lengths), source(seq, lengths))


def test_mismatches_are_named() -> None:
    model = create("mlsa4rec", 50)
    checkpoint = released_checkpoint(model)["state_dict"]
    with pytest.raises(ConversionError, match="shapes differ.*item_embedding.weight"):
        from_recbole(checkpoint, create("mlsa4rec", 60))
    del checkpoint["models.0.mlp2.weight"]
    checkpoint["models.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="lacks: interaction_layers.0.fuse.weight") as err:
        from_recbole(checkpoint, model)
    assert "models.0.mystery.weight" in str(err.value)
    with pytest.raises(ConversionError, match="variant=faithful"):
        from_recbole(checkpoint, create("mlsa4rec", 50, variant="causal"))
    with pytest.raises(ConversionError, match="sasrec"):
        from_recbole(checkpoint, create("sasrec", 50))


def test_settings_that_change_outputs_are_refused_unless_not_strict() -> None:
    checkpoint = released_checkpoint(trained("mlsa4rec", 50, seed=1))
    differ = r"attn_softmax='interests' \(released: 'sequence'\), gate_act='sigmoid' \(released: 'gelu'\)"
    with pytest.raises(ConversionError, match=differ):
        from_recbole(checkpoint, create("mlsa4rec", 50, gate_act="sigmoid", attn_softmax="interests"))
    masked = create("mlsa4rec", 50, variant="masked").eval()
    masked.load_state_dict(from_recbole(checkpoint, masked, strict=False))
    faithful = create("mlsa4rec", 50).eval()
    faithful.load_state_dict(from_recbole(checkpoint, faithful))
    full = torch.randint(1, 51, (2, 50))  # no padding: the masked model computes what the faithful one does
    torch.testing.assert_close(masked(full, torch.full((2,), 50)), faithful(full, torch.full((2,), 50)))
    # a state dict already in our names passes through
    again = from_recbole(faithful.state_dict(), create("mlsa4rec", 50))
    assert all(torch.equal(again[k], v) for k, v in faithful.state_dict().items())
