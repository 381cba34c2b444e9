"""BERT4Rec: its equations (bidirectional Transformer, output head, bias folded into the table),
the mask appended at prediction (ours and RecBole's), parameter count and cloze training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from equations import lin, ln, softmax

from mlsa4rec.errors import ConfigError, MLSA4RecError
from mlsa4rec.models import available, create

N = 30


def model(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    m = create("bert4rec", N, MAX_ITEM_LIST_LENGTH=8, **kw).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # off the init: zero biases would hide a missing term
    return m


def transcription(m, seq: torch.Tensor, lengths: torch.Tensor, drop=None) -> torch.Tensor:
    """The module docstring's equations, one row and one head at a time: B x L x D (no constant 1).
    ``drop``: the dropouts, as an ``equations.Replay`` of the model's masks (replayed row by row)."""
    out = []
    for b, (row, n) in enumerate(zip(seq, lengths.tolist())):
        width = row.shape[0]
        dr = (lambda x: x) if drop is None else drop.row(b)
        x = dr(ln(m.layer_norm, m.item_embedding.weight[row] + m.position_embedding.weight[:width]))
        for layer in m.layers:
            att = layer.attention
            d = x.shape[-1] // att.n_heads
            q, k, v = lin(att.query, x), lin(att.key, x), lin(att.value, x)
            context = torch.zeros_like(x)
            for h in range(att.n_heads):
                c = slice(h * d, (h + 1) * d)
                weights = softmax(q[:, c] @ k[:n, c].T / math.sqrt(d), dim=-1)     # every real key, both sides
                weights = F.pad(weights, (0, width - n))                            # 0 for the padded keys
                context[:, c] = dr(weights) @ v[:, c]
            a = ln(att.layer_norm, dr(lin(att.dense, context)) + x)
            ff = layer.feed_forward
            x = ln(ff.layer_norm, dr(lin(ff.dense_2, F.gelu(lin(ff.dense_1, a)))) + a)
        out.append(ln(m.output_norm, F.gelu(lin(m.output_dense, x))))
    return torch.stack(out)


def test_registry_and_settings() -> None:
    assert "bert4rec" in available()
    m = create("bert4rec", N)
    assert (m.causal, m.padding_invariant, m.cloze, m.streams) == (False, True, True, False)
    assert m.mask_token == N + 1 and m.item_embedding.weight.shape[0] == N + 2
    with pytest.raises(ConfigError, match="mask_ratio must be in"):
        create("bert4rec", N, mask_ratio=0.2, MAX_ITEM_LIST_LENGTH=4)  # int(0.8) = 0 targets per sample
    with pytest.raises(ConfigError, match="ft_ratio must be in"):
        create("bert4rec", N, ft_ratio=1.5)


@torch.no_grad()
def test_encode_is_its_equations_in_float64() -> None:
    m = model()
    seq = torch.tensor([[3, 4, N + 1, 6, 7, 0, 0], [N + 1, 9, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, N + 1]])
    lengths = torch.tensor([5, 2, 7])
    got = m.encode(seq, lengths)
    want = transcription(m, seq, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[b, :n, :-1], want[b, :n], rtol=1e-12, atol=1e-12)
    assert (got[..., -1] == 1).all()
    # scores: [O, 1] . [Emb, bias] = O . Emb + bias, the mask row never scored
    table = m.item_table()
    assert table.shape == (N + 1, 65)
    torch.testing.assert_close(table[:, :-1], m.item_embedding.weight[:N + 1])
    torch.testing.assert_close(table[:, -1], m.output_bias)


@torch.no_grad()
def test_prediction_reads_a_mask_appended_after_the_history() -> None:
    m = model()
    seq = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8], [9, 0, 0, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([3, 8, 1])
    M = N + 1
    ours, ours_len = m.append_mask(seq, lengths)
    assert ours.tolist() == [[3, 4, 5, M, 0, 0, 0, 0], [2, 3, 4, 5, 6, 7, 8, M], [9, M, 0, 0, 0, 0, 0, 0]]
    assert ours_len.tolist() == [4, 8, 2]
    # with trimmed batches the width grows by one where the mask fits
    trimmed, _ = m.append_mask(seq[[0, 2], :3], lengths[[0, 2]])
    assert trimmed.tolist() == [[3, 4, 5, M], [9, M, 0, 0]]
    scores = m.full_sort_scores(seq, lengths)
    want = transcription(m, ours, ours_len)[torch.arange(3), ours_len - 1] @ m.item_embedding.weight[1:N + 1].T
    torch.testing.assert_close(scores[:, 1:], want + m.output_bias[1:], rtol=1e-12, atol=1e-12)
    assert torch.isneginf(scores[:, 0]).all()


def recbole_reconstruct_test_data(item_seq: torch.Tensor, item_seq_len: torch.Tensor, mask: int) -> torch.Tensor:
    """RecBole 1.2.1's BERT4Rec.reconstruct_test_data, transcribed."""
    padding = torch.zeros(item_seq.size(0), dtype=torch.long)
    item_seq = torch.cat((item_seq, padding.unsqueeze(-1)), dim=-1)
    for batch_id, last_position in enumerate(item_seq_len):
        item_seq[batch_id][last_position] = mask
    return item_seq[:, 1:]


@torch.no_grad()
def test_recbole_eval_shift_reproduces_recbole() -> None:
    m = model(recbole_eval_shift=True)
    seq = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8], [9, 0, 0, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([3, 8, 1])
    shifted, new_len = m.append_mask(seq, lengths)
    assert torch.equal(shifted, recbole_reconstruct_test_data(seq, lengths, N + 1))
    assert torch.equal(new_len, lengths)  # RecBole gathers at item_seq_len - 1
    assert shifted[0].tolist() == [4, 5, N + 1, 0, 0, 0, 0, 0]  # the oldest item is gone though the mask fit


def test_parameter_count() -> None:
    m = create("bert4rec", 100, MAX_ITEM_LIST_LENGTH=50)
    d, inner, layers = 64, 256, 2
    per_layer = 4 * (d * d + d) + 2 * d + (d * inner + inner) + (inner * d + d) + 2 * d
    embeddings = 102 * d + 50 * d + 2 * d                   # items, padding and [M]; positions; input LN
    head = d * d + d + 2 * d + 101                           # output dense, output LN, bias per item id
    assert m.num_parameters() == embeddings + layers * per_layer + head


def test_cloze_training_learns_and_other_models_refuse_it(successor_file: Path, tmp_path: Path) -> None:
    from mlsa4rec.training.run import train

    results = train("bert4rec", str(successor_file), tmp_path / "run",
                    overrides={"epochs": 6, "train_batch_size": 64, "MAX_ITEM_LIST_LENGTH": 10, "mask_ratio": 0.3,
                               "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "learning_rate": 0.003,
                               "eval_step": 6, "device": "cpu"})
    assert results["train_scheme"] == "cloze"
    assert results["test"]["hit@5"] > 0.9, results["test"]  # the successor, read from both sides
    with pytest.raises(MLSA4RecError, match="no mask token"):
        train("sasrec", str(successor_file), tmp_path / "sas",
              overrides={"epochs": 1, "train_scheme": "cloze", "device": "cpu"})
