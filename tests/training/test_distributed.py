"""Distributed training and evaluation: the pieces in one process, then real 2-process gloo runs.

The in-process tests check the arithmetic that makes N ranks equal one process: shards cover a
global batch exactly once, per-rank losses and gradients add up to the whole batch's, gradient
summing keeps "no gradient" parameters untouched, and the evaluation round-robin puts every user's
rank back in place. The subprocess test launches torchrun for real, with a bounded timeout so a
hang fails instead of blocking CI.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mlsa4rec.cli import _without_nproc
from mlsa4rec.config import build_config
from mlsa4rec.data import load_dataset
from mlsa4rec.data.sampling import TrainSampler
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation import split_ranks
from mlsa4rec.evaluation.evaluator import merge_round_robin
from mlsa4rec.evaluation.runs import evaluate_run
from mlsa4rec.models import create
from mlsa4rec.runs import checkpoint
from mlsa4rec.runs.directory import staging_dir
from mlsa4rec.training import Trainer, distributed
from mlsa4rec.training.distributed import DistContext, pack_gradients, shard_rows, touched_rows, unpack_gradients
from mlsa4rec.training.run import train

HERE = Path(__file__).resolve().parent
TINY = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 8}


# one torch thread, as each rank and subprocess has (OMP_NUM_THREADS=1): floats are summed in the
# same order in this process as there (and a tiny model pays no thread hand-offs)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NoCommGroup(DistContext):
    """A rank of a pretend group: enough for the trainer's arithmetic, no process group needed."""

    def broadcast_module(self, module: torch.nn.Module) -> None:
        pass


class ThreadGroup:
    """Ranks as threads of this process, gathering through shared memory."""

    def __init__(self, rank: int, world_size: int, slots: list, barrier: threading.Barrier) -> None:
        self.rank, self.world_size, self.slots, self.barrier = rank, world_size, slots, barrier

    def all_gather_array(self, array: np.ndarray) -> list[np.ndarray]:
        self.slots[self.rank] = array
        self.barrier.wait(timeout=30)
        return list(self.slots)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_a_global_batch_exactly_once(n: int, world: int) -> None:
    rows = np.arange(100, 100 + n)
    shards = [shard_rows(rows, r, world) for r in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == rows.tolist()
    assert [len(s) for s in shards] == [len(a) for a in np.array_split(rows, world)]  # balanced; empty if n < world


@pytest.mark.parametrize("n, batch, world", [(10, 3, 2), (9, 3, 2), (10, 3, 4), (2, 5, 3), (0, 4, 2), (7, 1, 3)])
def test_merge_round_robin_restores_user_order(n: int, batch: int, world: int) -> None:
    batches = [np.arange(lo, min(lo + batch, n)) for lo in range(0, n, batch)]
    parts = [np.concatenate(batches[r::world] or [np.zeros(0, dtype=np.int64)]) for r in range(world)]
    assert merge_round_robin(parts, n, batch).tolist() == list(range(n))


@pytest.mark.parametrize("world, batch_size", [(2, 64), (3, 64), (2, 1000)])
def test_distributed_evaluation_equals_one_process(successor_file: Path, world: int, batch_size: int) -> None:
    data = load_dataset(str(successor_file))
    torch.manual_seed(0)
    model = create("sasrec", data.n_items, **TINY)
    expected = split_ranks(model, data, "test", 8, batch_size)
    slots: list = [None] * world
    barrier, results = threading.Barrier(world), [None] * world

    def rank(r: int) -> None:
        group = ThreadGroup(r, world, slots, barrier)
        results[r] = split_ranks(copy.deepcopy(model), data, "test", 8, batch_size, group=group)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for got in results:
        assert got is not None and np.array_equal(got, expected)  # every user once, in order, same floats


@pytest.mark.parametrize("scheme, n_rows", [("prefix", 37), ("all_positions", 37), ("prefix", 1)])
def test_shard_losses_and_gradients_add_up_to_the_whole_batch(successor_file: Path, scheme: str, n_rows: int) -> None:
    data = load_dataset(str(successor_file))
    config = build_config("sasrec", overrides={**TINY, "train_scheme": scheme, "hidden_dropout_prob": 0.0,
                                               "attn_dropout_prob": 0.0, "train_batch_size": 64})
    torch.manual_seed(0)
    model = create("sasrec", data.n_items, **{k: config[k] for k in config.model_keys},
                   MAX_ITEM_LIST_LENGTH=8)
    one = Trainer(model, data, config, torch.device("cpu"))
    rows = one.sampler.epoch_batches()[0][:n_rows]

    def grads() -> list[torch.Tensor]:
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    model.zero_grad(set_to_none=True)
    whole = one.shard_loss(rows)
    whole.backward()
    expected = grads()
    model.zero_grad(set_to_none=True)
    total = 0.0
    for r in range(3):
        share = Trainer(model, data, config, torch.device("cpu"), group=NoCommGroup(rank=r, world_size=3))
        loss = share.shard_loss(rows)
        assert (loss is None) == (r >= n_rows)  # a batch smaller than the world leaves ranks empty
        if loss is not None:
            loss.backward()  # gradients accumulate: the sum over ranks, as all_reduce would give
            total += loss.item()
    assert total == pytest.approx(whole.item(), rel=1e-6)
    for got, want in zip(grads(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_gradient_sum_treats_missing_gradients_as_zero() -> None:
    nets = [torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)) for _ in range(3)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    nets[0][1].weight.grad = torch.ones(1, 2)                  # rank 0: only this one
    nets[1][1].weight.grad = torch.full((1, 2), 2.0)           # rank 1: this one ...
    nets[1][0].bias.grad = torch.tensor([1.0, -1.0])           # ... and one rank 0 lacks
    buffers = [pack_gradients(list(net.parameters()), torch.tensor(v)) for net, v in zip(nets[:2], (0.5, 0.25))]
    target = list(nets[2].parameters())
    loss = unpack_gradients(target, buffers[0] + buffers[1])   # what all_reduce(SUM) hands every rank
    assert loss == 0.75
    assert target[0].grad is None and target[3].grad is None   # no rank had one: the optimiser skips them
    assert torch.equal(target[1].grad, torch.tensor([1.0, -1.0]))
    assert torch.equal(target[2].grad, torch.full((1, 2), 3.0))


def _any_rank_of(masks: list[torch.Tensor]):
    """What the group's OR over ranks hands every rank, for ranks simulated in one process."""
    return lambda _mine: torch.stack(masks).amax(dim=0)


@pytest.mark.parametrize("touched, sparse", [([[1, 4], [4, 7], []], True),
                                             ([[0, 1, 2, 3], [4, 5, 6, 7, 8], [9]], False)])
def test_row_sparse_exchange_equals_the_dense_sum(monkeypatch: pytest.MonkeyPatch, touched: list, sparse: bool) -> None:
    """A large table's gradient is sent by the rows any rank touched; summed and unpacked, it is
    the dense sum exactly (zeros elsewhere), and the small parameters ride along whole. A union of
    more than half the rows (a full softmax) falls back to the dense exchange."""
    monkeypatch.setattr(distributed, "ROW_SPARSE_MIN_ROWS", 10)
    g = torch.Generator().manual_seed(0)
    ranks = []
    for rows in touched:
        table, bias = torch.nn.Parameter(torch.zeros(10, 3)), torch.nn.Parameter(torch.zeros(3))
        if rows:  # the last rank of the first case has no gradient for the table at all
            table.grad = torch.zeros(10, 3)
            table.grad[rows] = torch.randn(len(rows), 3, generator=g)
        bias.grad = torch.randn(3, generator=g)
        ranks.append([table, bias])
    masks = [(r[0].grad != 0).any(dim=1).to(torch.uint8) if r[0].grad is not None
             else torch.zeros(10, dtype=torch.uint8) for r in ranks]
    layouts = [touched_rows(r, _any_rank_of(masks)) for r in ranks]
    if sparse:  # every rank gets the same layout
        assert all(torch.equal(lay[0], layouts[0][0]) for lay in layouts)
    else:
        assert all(lay[0] is None for lay in layouts)
    assert all(lay[1] is None for lay in layouts)
    if sparse:
        assert layouts[0][0].tolist() == [1, 4, 7]
    summed = sum(pack_gradients(r, torch.tensor(1.0), lay) for r, lay in zip(ranks, layouts))
    dense = sum(pack_gradients(r, torch.tensor(1.0)) for r in ranks)
    assert summed.numel() < dense.numel() if sparse else summed.numel() == dense.numel()
    expected = [torch.nn.Parameter(torch.zeros(10, 3)), torch.nn.Parameter(torch.zeros(3))]
    unpack_gradients(expected, dense)
    for r, lay in zip(ranks, layouts):  # each rank unpacks into its own parameters, its gradient overwritten
        assert unpack_gradients(r, summed, lay) == 3.0
        for got, want in zip(r, expected):
            assert torch.equal(got.grad, want.grad)


ROW_SPARSE_RANK = """
import sys, torch
from mlsa4rec.training import distributed
group, _ = distributed.init("cpu", 60)
table = torch.nn.Embedding(distributed.ROW_SPARSE_MIN_ROWS + 5, 4)
torch.nn.init.constant_(table.weight, 0.5)
ids = torch.tensor([[3, 65540], [3, 11]][group.rank])
(table(ids) * torch.arange(1.0, 5.0)).sum().mul(group.rank + 1).backward()
assert distributed.touched_rows([table.weight], group._any_rank)[0].tolist() == [3, 11, 65540]
loss = group.sum_gradients(table.parameters(), torch.tensor(float(group.rank)))
if group.rank == 0:
    torch.save({"grad": table.weight.grad, "loss": loss}, sys.argv[1])
distributed.destroy(group)
"""


def test_two_ranks_sum_an_item_table_by_its_touched_rows(tmp_path: Path) -> None:
    """Real gloo: the ranks agree on the rows either touched and sum only those; the result is the
    dense sum (rank 0 touched rows 3 and 65,540 with weight 1, rank 1 rows 3 and 11 with weight 2)."""
    script = tmp_path / "rank.py"
    script.write_text(ROW_SPARSE_RANK)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    expected = torch.zeros(distributed.ROW_SPARSE_MIN_ROWS + 5, 4)
    expected[3] = 3 * torch.arange(1.0, 5.0)
    expected[11] = 2 * torch.arange(1.0, 5.0)
    expected[65540] = torch.arange(1.0, 5.0)
    assert got["loss"] == 1.0 and torch.equal(got["grad"], expected)


def test_single_process_context_is_a_no_op() -> None:
    group = DistContext()
    assert not group.active and group.is_main
    assert group.broadcast_bytes(b"abc") == b"abc" and group.run_on_main(lambda: b"x") == b"x"
    assert [a.tolist() for a in group.all_gather_array(np.arange(3))] == [[0, 1, 2]]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    assert group.sum_gradients([p], torch.tensor(1.5, requires_grad=True)) == 1.5 and torch.equal(p.grad, torch.ones(2))


def test_nproc_is_removed_from_the_relaunched_command() -> None:
    argv = ["-q", "train", "--model", "sasrec", "--nproc", "2", "--set", "epochs=1", "--npr=3", "--json"]
    assert _without_nproc(argv) == ["-q", "train", "--model", "sasrec", "--set", "epochs=1", "--json"]


def test_two_processes_train_evaluate_exactly_and_resume(successor_file: Path, tmp_path: Path) -> None:
    """Real 2-process gloo runs: (1) a run's distributed metrics equal a 1-process evaluation of
    its saved weights exactly; (2) a 2-process run SIGKILLed mid-epoch and resumed equals an
    uninterrupted one exactly (every rank's random state is restored; and so the same seed gives
    the same distributed run); (3) the last global batch has 1 row, so rank 1 gets an empty shard;
    (4) so does a run paused by --time-budget and resumed."""
    data = load_dataset(str(successor_file))
    n = TrainSampler(data, "prefix", 8, 1, 0).n_samples
    batch = next(b for b in range(150, n) if n % b == 1)
    overrides = {**TINY, "train_scheme": "prefix", "train_batch_size": batch, "eval_batch_size": 64, "epochs": 2,
                 "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2, "learning_rate": 0.01, "seed": 3,
                 "checkpoint_steps": 2, "stopping_step": 100}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    killed = subprocess.run([*torchrun, str(HERE / "kill_run.py"), str(successor_file), str(tmp_path / "run"),
                             "2", "3", json.dumps(overrides)], capture_output=True, text=True, timeout=120, env=env)
    assert killed.returncode != 0
    stage = staging_dir(tmp_path / "run")
    assert json.loads(checkpoint.load(stage / checkpoint.CHECKPOINT)["meta"])["world_size"] == 2
    with pytest.raises(MLSA4RecError, match="trained with 2 process.*--nproc 2"):
        train("sasrec", str(successor_file), tmp_path / "run", overrides=overrides, resume=True)
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    # rank 0 finds the interrupted run in the way: rank 1 must hear of it, not wait for rank 0 forever
    refused = subprocess.run([*torchrun, "-m", "mlsa4rec", "train", "--model", "sasrec", "--dataset",
                              str(successor_file), "--output-dir", str(tmp_path / "run"), *sets],
                             capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode != 0
    assert refused.stderr.count("error: ") == 1 and "error: an interrupted run" in refused.stderr  # once, by rank 0
    def nproc_train(name: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlsa4rec", "train", "--nproc", "2", "--model", "sasrec",
                               "--dataset", str(successor_file), "--output-dir", str(tmp_path / name), "--json",
                               *sets, *extra], capture_output=True, text=True, timeout=120, env=env)

    # (4) a time budget pauses both ranks at one step: exit 75, said once, and --resume continues exactly
    paused = nproc_train("paused", "--time-budget", "0.001")
    assert paused.returncode == 75, paused.stderr[-3000:]
    assert paused.stderr.count("paused: ") == 1 and "Traceback" not in paused.stderr
    assert not (tmp_path / "paused").exists() and (staging_dir(tmp_path / "paused") / checkpoint.CHECKPOINT).is_file()
    for name, extra in (("run", ["--resume"]), ("paused", ["--resume"]), ("whole", [])):
        done = nproc_train(name, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "differ between ranks" not in done.stderr
    a, p, b = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("run", "paused", "whole"))
    assert a["world_size"] == b["world_size"] == 2 and b["epochs_run"] == 2
    for resumed in (a, p):
        assert resumed["resumed"]
        assert (resumed["valid"], resumed["test"], resumed["best_epoch"]) == (b["valid"], b["test"], b["best_epoch"])
        assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in b["history"]]
    single = evaluate_run(tmp_path / "whole")
    assert single["valid"] == b["valid"] and single["test"] == b["test"]


def test_nproc_reports_a_config_error_once_with_exit_2(successor_file: Path, tmp_path: Path) -> None:
    """A setting the model cannot be built with is found before the ranks start: one line, exit 2."""
    done = subprocess.run([sys.executable, "-m", "mlsa4rec", "train", "--nproc", "2", "--model", "sasrec",
                           "--dataset", str(successor_file), "--output-dir", str(tmp_path / "run"),
                           "--set", "n_heads=3", "--set", "epochs=1"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: cannot build model 'sasrec': hidden_size (64) must be divisible by n_heads (3)"]
    assert "Traceback" not in done.stderr and "exitcode" not in done.stderr and "launching" not in done.stderr
    assert not (tmp_path / "run").exists()
