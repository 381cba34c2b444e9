"""Gate health: the gate read at each user's scoring position, and its summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlsa4rec.data import load_dataset
from mlsa4rec.data.sampling import eval_batches
from mlsa4rec.evaluation.gate import gate_summary, gate_values
from mlsa4rec.models import create


@pytest.mark.parametrize(("variant", "act"), [("causal", "gelu"), ("masked", "sigmoid"), ("faithful", "gelu")])
def test_the_gate_is_read_at_each_users_last_history_item(successor_file: Path, variant: str, act: str) -> None:
    data = load_dataset(str(successor_file))
    torch.manual_seed(0)
    model = create("mlsa4rec", data.n_items, variant=variant, gate_act=act, hidden_size=16, n_heads=2,
                   MAX_ITEM_LIST_LENGTH=10).train()
    ((pre, gate),) = gate_values(model, data, "test", 10, batch_size=64)
    assert pre.shape == gate.shape == (len(data.eval_targets("test")), 16) and model.training
    # independently: the interaction layer's LSA output A at the last item, through W1 and act
    layer = model.interaction_layers[0]
    expected = []
    model.eval()
    with torch.no_grad():
        for batch in eval_batches(data, "test", 10, 64, trim=variant != "faithful"):
            h0 = model.embed(batch.item_seq)
            m = layer.LayerNorm1(layer.mamba(h0) + h0)
            a = layer.lsa(m, batch.lengths)[torch.arange(len(batch.lengths)), batch.lengths - 1]
            expected.append(F.linear(a, layer.gate.weight, layer.gate.bias))
    expected = torch.cat(expected).numpy()
    np.testing.assert_allclose(pre, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gate, layer.gate.act(torch.from_numpy(expected)).numpy(), rtol=1e-5, atol=1e-6)


def test_a_model_without_a_gate_is_refused(successor_file: Path) -> None:
    data = load_dataset(str(successor_file))
    for model in (create("mlsa4rec", data.n_items, gate_act="none", MAX_ITEM_LIST_LENGTH=10),
                  create("sasrec", data.n_items, MAX_ITEM_LIST_LENGTH=10)):
        with pytest.raises(ValueError, match="no gate"):
            gate_values(model, data, "test", 10)


def test_the_summary_counts_what_it_says() -> None:
    pre = np.array([[-5.0, -1.0, 0.0, 0.01], [1.0, 2.0, 4.0, 10.0]])
    gate = F.gelu(torch.from_numpy(pre)).numpy()
    s = gate_summary(pre, gate)
    assert s["values"] == 8 and s["mean"] == pytest.approx(gate.mean())
    assert s["near_zero"] == pytest.approx(3 / 8)  # gelu(-5) ~ -1.4e-6, gelu(0), gelu(0.01)
    assert (s["saturated_low"], s["saturated_high"]) == (1 / 8, None)  # GELU is the identity above: not flat
    sig = gate_summary(pre, torch.sigmoid(torch.from_numpy(pre)).numpy(), act="sigmoid")
    assert (sig["saturated_low"], sig["saturated_high"]) == (1 / 8, 1 / 8)  # -5; 10 (4 is not past 4.6)
    assert sum(s["histogram"]["counts"]) == 8 and s["quantiles"]["0.5"] == pytest.approx(np.median(gate))
    shared = gate_summary(pre, gate, bins=np.linspace(-1, 11, 13))
    assert shared["histogram"]["edges"][0] == -1 and len(shared["histogram"]["counts"]) == 12
