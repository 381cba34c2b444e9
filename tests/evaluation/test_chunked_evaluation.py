"""The evaluator's chunked ranking (forward @ item_table().T, item_chunk items at a time) gives the
ranks of the whole full_sort_scores matrix, for every registered model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlsa4rec.data.dataset import build_sequences
from mlsa4rec.data.readers import Interactions
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation import split_ranks
from mlsa4rec.evaluation.evaluator import scores_are_dot_products
from mlsa4rec.models import create, registry

SMALL = {"hidden_size": 8}
CONFIGS = [(name, {}) for name in registry.available()] + [
    ("sasrec", {"similarity": "cosine"}),      # item_table normalises its rows
    ("lrurec", {"output_bias": False}),        # item_table without the bias column
    ("mlsa4rec", {"variant": "causal"}),
    ("mlsa4rec", {"variant": "masked"}),
]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 20, size=40)
    users = np.repeat(np.arange(40), lengths)
    items = rng.integers(1, 46, size=users.shape[0])  # repeats: a target may be in its own history
    return build_sequences(Interactions(users, items, np.arange(users.shape[0], dtype=float)), "t",
                           "[0,inf)", "[0,inf)")


def whole_matrix(model: torch.nn.Module) -> torch.nn.Module:
    """The same model, scored through its own full_sort_scores (the evaluator's other path)."""
    cls = type(model)
    model.__class__ = type(f"Whole{cls.__name__}", (cls,), {
        "full_sort_scores": lambda self, item_seq, lengths: cls.full_sort_scores(self, item_seq, lengths)})
    return model


@pytest.mark.parametrize(("name", "overrides"), CONFIGS, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}"
                                                               for n, o in CONFIGS])
def test_chunked_ranks_equal_full_sort_scores(data, name: str, overrides: dict, one_torch_thread) -> None:
    torch.manual_seed(0)
    model = create(name, data.n_items, **SMALL, **overrides)
    assert scores_are_dot_products(model)
    got = {(split, ex, chunk): split_ranks(model, data, split, 12, batch_size=7, exclude_history=ex, item_chunk=chunk)
           for split in ("valid", "test") for ex in (False, True) for chunk in (65536, 0, 10, 1)}
    whole_matrix(model)
    assert not scores_are_dot_products(model)
    for (split, ex, chunk), ranks in got.items():
        want = split_ranks(model, data, split, 12, batch_size=7, exclude_history=ex)
        assert ranks.tolist() == want.tolist(), (split, ex, chunk)
    assert any((got[(s, True, 0)] < got[(s, False, 0)]).any() for s in ("valid", "test"))  # the rule matters here


def test_chunked_ranks_through_evaluate_split_and_a_bad_chunk(data) -> None:
    from mlsa4rec.evaluation import evaluate_split
    from mlsa4rec.settings import TrainConfig

    torch.manual_seed(0)
    model = create("gru4rec", data.n_items, **SMALL)
    one = evaluate_split(model, data, "test", TrainConfig(max_seq_length=12, eval_batch_size=5))
    chunked = evaluate_split(model, data, "test", TrainConfig(max_seq_length=12, eval_batch_size=5, eval_item_chunk=3))
    assert one == chunked
    with pytest.raises(MLSA4RecError, match="eval_item_chunk"):
        split_ranks(model, data, "test", 12, item_chunk=-1)


@pytest.mark.parametrize(("name", "overrides"), CONFIGS, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}"
                                                               for n, o in CONFIGS])
def test_a_batch_run_in_pieces_gives_the_same_outputs_and_ranks(data, name: str, overrides: dict) -> None:
    """On a CPU evaluation runs the model on at most CPU_FORWARD_TOKENS positions a call: each row
    is the row of the whole batch (up to float rounding) and no rank moves."""
    from mlsa4rec.data.sampling import eval_batches
    from mlsa4rec.evaluation.evaluator import CPU_FORWARD_TOKENS, forward_tokens, in_pieces

    torch.manual_seed(0)
    model = create(name, data.n_items, **SMALL, **overrides).eval()
    trim = bool(getattr(model, "padding_invariant", False))
    assert forward_tokens(model, "cpu") == (CPU_FORWARD_TOKENS if trim else None)  # faithful: its own grouping
    assert forward_tokens(model, "cuda") is None
    calls = []
    counted = lambda s, n: calls.append(s.shape) or model(s, n)  # noqa: E731
    with torch.inference_mode():
        for batch in eval_batches(data, "test", 12, 16, trim=trim):
            whole, width = model(batch.item_seq, batch.lengths), batch.item_seq.shape[1]
            for tokens in (1, 25, 1000):  # 1 row a call (fewer positions than a row), 2, all
                calls.clear()
                got = in_pieces(counted, batch.item_seq, batch.lengths, tokens)
                torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
                assert sum(s[0] for s in calls) == len(whole)
                assert all(s[0] * width <= max(tokens, width) for s in calls)
                assert len(calls) == max(1, -(-len(whole) // max(1, tokens // width)))
    want = split_ranks(model, data, "valid", 12, batch_size=7, tokens_per_call=0)
    for tokens in (30, None):  # None: the CPU's bound
        assert split_ranks(model, data, "valid", 12, batch_size=7, tokens_per_call=tokens).tolist() == want.tolist()
    whole_matrix(model)  # the model's own full_sort_scores, in pieces too
    assert split_ranks(model, data, "valid", 12, batch_size=7, tokens_per_call=12).tolist() == want.tolist()
