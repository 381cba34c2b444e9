"""The item table sharded over ranks with TorchRec: what one rank holds and how long a training step takes.

    /tmp/torchrec-venv/bin/python benchmarks/sharded_table.py                  # 10^6 items, dim 64, 1 and 2 ranks
    /tmp/torchrec-venv/bin/python benchmarks/sharded_table.py --items 1e5 --nproc 2 --sharding row_wise table_wise
    /tmp/torchrec-venv/bin/python benchmarks/sharded_table.py --optimizer adagrad --json

This is what a user reaches for when the item table no longer fits one device: an existing library's sharded
embeddings (TorchRec + FBGEMM's CPU kernels), not anything in mlsa4rec. It needs its own environment, since
TorchRec pins its own torch; the pair that loads next to torch 2.13.0+cpu is torchrec 1.8.0 with
fbgemm-gpu-cpu 1.8.0 (fbgemm-gpu-cpu 1.9.0 fails to load its kernels: an undefined torch symbol).

Each setting starts ``torchrun --standalone --nproc_per_node N`` on this script (gloo, CPU, ``--threads``
threads per rank, 1 by default). Every rank builds a TorchRec ``EmbeddingCollection`` with one table of
``items`` rows x ``dim`` on the meta device, so no rank ever allocates the whole table, and shards it with
``DistributedModelParallel`` and a plan from ``EmbeddingShardingPlanner`` (``compute_device="cpu"``) held to
one sharding type: ``row_wise`` (rows split evenly) or ``table_wise`` (the whole table on one rank, the
comparison: one table cannot be spread that way). ``data_parallel`` (a replica per rank) does not run on CPU
with an ``EmbeddingCollection``: FBGEMM's CPU dense lookup ignores ``PoolingMode.NONE`` and returns one pooled
row per bag (``split_with_sizes expects split_sizes to sum exactly to 384``; pytorch/FBGEMM#4586); the
replicated table is what ``benchmarks/ddp_step.py`` measures with the project's own code. The table is
updated by FBGEMM's fused optimizer inside backward, on the rows the step looked up only. FBGEMM's CPU kernels
have no fused Adam (``Optimizer OptimType.ADAM is not supported in CPU mode``: only exact Adagrad, exact
row-wise Adagrad and exact SGD), so ``--optimizer`` is ``rowwise_adagrad`` (default: one state float per row),
``adagrad`` (a state as large as the table) or ``sgd``.

The step is a stand-in for the encoder, kept simple on purpose: one fixed global batch of B = 256 histories of
L random ids plus one target id each, split over the ranks by strided rows, and K shared negative ids drawn
per step from (seed, step), the same on every rank. The history vectors are looked up and mean-pooled (no
transformer), and the loss is a sampled softmax of the target against the K negatives (no logQ correction, no
removal of accidental hits), the mean over the rank's rows: TorchRec divides the embeddings' gradients by the
world size on their way back (``comm_ops.GRADIENT_DIVISION``, on by default, DDP's convention), so the owners
get the batch mean. Then backward, which runs the all-to-alls back to the rows' owners and the fused update. The
table's rows are set deterministically from their global index, so every sharding and rank count starts from
the same table, and the loss after the last step (printed) shows they follow the same trajectory up to float
rounding. The first step (allocations, optimizer state) is not timed; the median of the rest is, split into
forward (input all-to-all, lookup, output all-to-all, loss) and backward (gradient all-to-all, fused update).
Peak memory is each rank's resident maximum (``ru_maxrss``), next to what the rank held before the table was
built (torch, fbgemm and the process group).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from common import run_as_rank, torchrun_self


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30


def child(params: dict[str, Any]) -> None:
    """One rank: shard, run the steps; rank 0 writes every rank's numbers to ``params['out']``."""
    import torch
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    before_gib = peak_gib()
    n_items, dim, length, batch, negatives = (params[k] for k in ("items", "dim", "length", "batch", "negatives"))
    sharding, optimizer_name, lr = params["sharding"], params["optimizer"], params["lr"]

    table = EmbeddingConfig(name="item_table", embedding_dim=dim, num_embeddings=n_items,
                            feature_names=["history", "target", "negatives"])
    collection = EmbeddingCollection(tables=[table], device=torch.device("meta"))
    kinds = {"rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
             "sgd": EmbOptimType.EXACT_SGD}
    fused = {"optimizer": kinds[optimizer_name], "learning_rate": lr, "eps": 1e-8}
    sharders = [EmbeddingCollectionSharder(fused_params=fused)]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        constraints={"item_table": ParameterConstraints(sharding_types=[sharding])})
    plan = planner.collective_plan(collection, sharders, dist.GroupMember.WORLD)
    model = DistributedModelParallel(collection, device=torch.device("cpu"), plan=plan, sharders=sharders)

    # every rank's part of the table set from the global row index: the same start for any sharding
    rows_held = 0
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not name.endswith("item_table.weight"):
                continue
            shards = [(s.metadata.shard_offsets[0], s.tensor) for s in tensor.local_shards()] \
                if hasattr(tensor, "local_shards") else [(0, tensor)]
            for offset, local in shards:
                for start in range(0, local.shape[0], 2 ** 14):  # in chunks: no table-sized temporaries
                    part = local[start:start + 2 ** 14]
                    index = torch.arange(offset + start, offset + start + part.shape[0], dtype=torch.float64)
                    part.copy_(0.1 * torch.sin(0.7 * (index[:, None] * dim + torch.arange(dim, dtype=torch.float64))))
                rows_held += local.shape[0]

    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, n_items, (batch, length + 1), generator=g)
    mine = seq[torch.arange(rank, batch, world)]
    b = mine.shape[0]
    per_row = -(-negatives // b)  # the K negatives ride in the local rows' bags of the "negatives" feature
    neg_lengths = torch.full((b,), per_row).clamp(max=torch.clamp(negatives - per_row * torch.arange(b), min=0))
    lengths = torch.cat([torch.full((b,), length), torch.ones(b, dtype=torch.long), neg_lengths])
    phases: dict[str, list[float]] = {"forward": [], "backward": []}
    loss_value = float("nan")
    for step in range(params["steps"] + 1):
        negs = torch.randint(0, n_items, (negatives,), generator=torch.Generator().manual_seed(1000 + step))
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["history", "target", "negatives"], values=torch.cat([mine[:, :-1].reshape(-1), mine[:, -1], negs]),
            lengths=lengths)
        dist.barrier()  # every rank starts the step together, so a rank's wait is the others' work
        t0 = time.perf_counter()
        out = model(features)
        history = out["history"].values().view(b, length, dim).mean(1)  # the encoder's stand-in
        target = out["target"].values()
        negative = out["negatives"].values()
        logits = torch.cat([(history * target).sum(-1, keepdim=True), history @ negative.T], 1)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(b, dtype=torch.long))  # TorchRec averages
        t1 = time.perf_counter()
        loss.backward()  # the fused optimizer updates the looked-up rows in here: there is no optimizer.step()
        t2 = time.perf_counter()
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        loss_value = float(summed) / world
        if step:
            phases["forward"].append(t1 - t0)
            phases["backward"].append(t2 - t1)
    numbers: dict[str, Any] = {name: sorted(v)[len(v) // 2] for name, v in phases.items()}
    numbers.update(rank=rank, rows=rows_held, before_gib=before_gib, peak_gib=peak_gib())
    views: list[Any] = [None] * world
    dist.all_gather_object(views, numbers)
    if rank == 0:
        Path(params["out"]).write_text(json.dumps({"ranks": views, "loss_after": loss_value}))
    dist.barrier()  # leave together: a rank that tears gloo down while rank 0 still writes can abort it
    dist.destroy_process_group()


def run_one(nproc: int, sharding: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    params = {"items": int(float(args.items)), "dim": args.dim, "length": args.length, "batch": args.batch,
              "negatives": args.negatives, "steps": args.steps, "sharding": sharding, "optimizer": args.optimizer,
              "lr": args.lr, "out": str(out)}
    row = torchrun_self(__file__, nproc, params, args.threads, args.timeout, f"nproc={nproc} {sharding}")
    return {"nproc": nproc, "sharding": sharding, **row}


def main() -> None:
    run_as_rank(child)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="1e6", help="catalogue size (default 1e6)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--length", type=int, default=50, help="history length L")
    parser.add_argument("--batch", type=int, default=256, help="the global batch (the ranks split it)")
    parser.add_argument("--negatives", type=int, default=1024, help="shared sampled negatives K")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sharding", nargs="+", choices=["row_wise", "table_wise"],
                        default=["row_wise", "table_wise"],
                        help="sharding types to compare for N > 1 (N = 1 runs the first only)")
    parser.add_argument("--optimizer", choices=["rowwise_adagrad", "adagrad", "sgd"], default="rowwise_adagrad",
                        help="the fused update (FBGEMM's CPU kernels have no Adam)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after one untimed)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank (default 1)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per setting")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: an fbgemm built for another torch fails to load its kernels
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        sys.exit(f"error: TorchRec is not usable here ({first}); make its own environment: python3.11 -m venv "
                 "/tmp/torchrec-venv && /tmp/torchrec-venv/bin/pip install torch==2.13.0 numpy tensordict "
                 "torchmetrics==1.0.3 tqdm pyre-extensions && /tmp/torchrec-venv/bin/pip install --no-deps "
                 "fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0")
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="sharded-table-") as tmp:
        for n in args.nproc:
            for sharding in args.sharding if n > 1 else args.sharding[:1]:
                rows.append(run_one(n, sharding, args, Path(tmp) / f"rank0-{n}-{sharding}.json"))
                step = rows[-1]["ranks"][0]["forward"] + rows[-1]["ranks"][0]["backward"]
                print(f"nproc={n} {sharding}: {step:.3f} s/step (rank 0)", file=sys.stderr, flush=True)
    import fbgemm_gpu
    import torch
    import torchrec

    items = int(float(args.items))
    table_mib = items * args.dim * 4 / 2 ** 20
    print(f"TorchRec {torchrec.__version__}, fbgemm-gpu-cpu {fbgemm_gpu.__version__}, torch {torch.__version__}; "
          f"{items:,} items x {args.dim} (table {table_mib:.0f} MiB), B = {args.batch}, L = {args.length}, "
          f"{args.negatives} shared negatives, {args.optimizer}; {args.threads} thread(s)/rank, "
          f"{os.cpu_count()} cores; median of {args.steps} steps")
    print(f"{'nproc':>5} {'sharding':>13} {'rank':>4} {'rows held':>10} {'forward s':>9} {'backward s':>10} "
          f"{'step s':>7} {'base GiB':>8} {'peak GiB':>8} {'loss after':>10}")
    for r in rows:
        for v in r["ranks"]:
            print(f"{r['nproc']:>5} {r['sharding']:>13} {v['rank']:>4} {v['rows']:>10,} {v['forward']:>9.3f} "
                  f"{v['backward']:>10.3f} {v['forward'] + v['backward']:>7.3f} {v['before_gib']:>8.2f} "
                  f"{v['peak_gib']:>8.2f} {r['loss_after']:>10.5f}")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
