"""The protocol reproduces RecBole 1.2's sequential split on a small .inter file with ties.

Expected values are written by hand from RecBole 1.2's rules (``MLSA4REC.md`` section 5):

* ``_filter_by_inter_num`` drops users and items outside ``[5,inf)`` together, repeatedly;
* ``SequentialDataset.data_augmentation`` sorts by (user, timestamp) with pandas' stable
  multi-column sort, so events with equal timestamps keep their file order, and then makes one
  sample per event after the first: (previous items, at most L) -> item;
* ``leave_one_out(leave_one_num=2)`` puts each user's last sample in test and the one before in
  valid; a user with two samples gets train + test, one with one sample gets only train.

The data: users u1..u5 each have 5+ events on items A..E (all items reach 5 events). User u6
has 4 events and is dropped by the user filter in the first round; that leaves item F (6 events,
3 of them u6's) below 5 events, so the second round drops F from u1's and u2's histories.
"""

from __future__ import annotations

from pathlib import Path

from mlsa4rec.data import load_dataset
from mlsa4rec.data.sampling import eval_batches, gather, history_bounds

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
ROWS = [
    # user, item, timestamp  (file order matters for the ties)
    ("u1", "B", 20), ("u1", "A", 10), ("u1", "C", 20), ("u1", "F", 25), ("u1", "D", 30), ("u1", "E", 30),
    ("u2", "A", 1), ("u2", "B", 2), ("u2", "C", 3), ("u2", "D", 4), ("u2", "E", 5),
    ("u3", "E", 7), ("u3", "D", 7), ("u3", "C", 7), ("u3", "B", 7), ("u3", "A", 7),   # all tied
    ("u4", "A", 5), ("u4", "C", 6), ("u4", "B", 9), ("u4", "E", 8), ("u4", "D", 9),
    ("u5", "D", 3), ("u5", "A", 1), ("u5", "E", 4), ("u5", "B", 2), ("u5", "C", 5),
    ("u6", "F", 1), ("u6", "F", 2), ("u6", "F", 3), ("u6", "A", 4),
    ("u1", "F", 26), ("u2", "F", 6),
]


def expected() -> dict[str, tuple[list[str], list[str], str, str]]:
    """Per user: (chronological items, training targets, valid target, test target)."""
    orders = {
        # u1: A@10, then B@20 and C@20 tied (file order B, C), F dropped, D@30 and E@30 (file order D, E)
        "u1": ["A", "B", "C", "D", "E"],
        "u2": ["A", "B", "C", "D", "E"],          # F@6 dropped with item F
        "u3": ["E", "D", "C", "B", "A"],          # all tied: file order
        "u4": ["A", "C", "E", "B", "D"],          # B@9 and D@9 tied: file order B, D
        "u5": ["A", "B", "D", "E", "C"],
    }
    return {u: (seq, seq[1:-2], seq[-2], seq[-1]) for u, seq in orders.items()}


def test_split_matches_recbole_rules(tmp_path: Path) -> None:
    path = tmp_path / "ties.inter"
    path.write_text(HEADER + "".join(f"{u}\t{i}\t1\t{t}\n" for u, i, t in ROWS))
    data = load_dataset(str(path))
    want = expected()
    assert data.n_users == 5 and data.n_items == 5
    users = data.user_tokens.tolist()
    assert users == ["u1", "u2", "u3", "u4", "u5"]
    tok = data.item_tokens
    for u, name in enumerate(users):
        seq, train, valid, test = want[name]
        assert tok[data.items[data.offsets[u]:data.offsets[u + 1]]].tolist() == seq, name
        train_t = [t for t in data.train_targets() if data.offsets[u] <= t < data.offsets[u + 1]]
        assert tok[data.items[train_t]].tolist() == train, name
    assert tok[data.items[data.eval_targets("valid")]].tolist() == [want[u][2] for u in users]
    assert tok[data.items[data.eval_targets("test")]].tolist() == [want[u][3] for u in users]

    # inputs: valid sees the training part, test sees training part + the valid item (last L=3)
    for split, cut in (("valid", -2), ("test", -1)):
        batch = next(eval_batches(data, split, max_seq_length=3, batch_size=10))
        for row, name in enumerate(users):
            history = want[name][0][:cut][-3:]
            got = tok[batch.item_seq[row, : batch.lengths[row]].numpy()].tolist()
            assert got == history, (split, name)

    # training samples: one per training target, history = everything before it (here < L)
    targets = data.train_targets()
    start, end = history_bounds(data, targets, 50)
    seqs, lengths = gather(data.items, start, end, 50)
    first_u1 = [tok[seqs[i, : lengths[i]]].tolist() for i in range(2)]
    assert first_u1 == [["A"], ["A", "B"]]
