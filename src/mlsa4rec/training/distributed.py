"""Glue between the trainer and ``torch.distributed``, with a no-op path for one process.

``torchrun`` starts one process per rank and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``). Everything the trainer and
the evaluator need from the group goes through a :class:`DistContext`; without torchrun (or with
a world of one) every method returns at once, so single-process code never touches
``torch.distributed`` and its results stay bit-for-bit what they were before DDP existed.

Gradients are summed by one ``all_reduce`` of a flat buffer after ``backward`` rather than by
``DistributedDataParallel``: a rank whose shard of a global batch is empty (a last batch smaller
than the world) then simply contributes zeros instead of having to run a forward pass on nothing,
parameters that get no gradient need no ``find_unused_parameters`` machinery, and the step loss
and per-parameter "has a gradient" flags ride along in the same buffer. The price is that
communication does not overlap ``backward`` (DDP's bucketing); for the models here the gradient
is a few MB and the step is compute-bound.

A large catalogue changes that: the item table's gradient is dense (``nn.Embedding`` without
``sparse``, so that Adam stays Adam) but a sampled loss touches only the rows of the step's
histories, targets and negatives. A table of 10^6 items × 64 is 244 MiB, and summing it whole took
longer than the step's computation (``benchmarks/ddp_step.py``). So a parameter with at least
:data:`ROW_SPARSE_MIN_ROWS` rows is exchanged by rows: the ranks first agree on the rows any of
them touched (one all-reduce of a byte per row), then sum only those. Every other row is zero on
every rank, so the summed gradient is the dense sum exactly; a full softmax touches every row and
keeps the dense exchange.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as tdist

from mlsa4rec.errors import MLSA4RecError, PeerFailed
from mlsa4rec.runtime import check_device, env_rank, launched_by_torchrun, resolve_device  # noqa: F401 (env_rank: part of this API)

log = logging.getLogger("mlsa4rec")


def rank_seed(seed: int, rank: int) -> int:
    """A seed for ``rank``'s dropout stream: distinct per rank, fixed for a (seed, rank) pair."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def shard_rows(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The rows of a global batch that ``rank`` computes: every world_size-th one.

    Strided rather than contiguous (``np.array_split``): the sampler sorts a batch's rows by
    length (bucketing), so contiguous pieces would hand the longest sequences to the last rank
    and make every other rank wait for it. Strided pieces have the same length mix. A batch with
    fewer rows than ranks leaves the last ranks an empty shard.
    """
    return rows[rank::world_size]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group; the defaults describe a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run
    owns_group: bool = False  # this context initialised the process group (and destroys it)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (on the collective device) and return it."""
        if self.active:
            on_device = tensor.to(self.device)
            tdist.all_reduce(on_device, op=tdist.ReduceOp.SUM)
            if on_device is not tensor:
                tensor.copy_(on_device)
        return tensor

    def all_gather_array(self, array: np.ndarray) -> list[np.ndarray]:
        """Every rank's 1-D ``array`` (lengths may differ), in rank order, on every rank."""
        array = np.ascontiguousarray(array).reshape(-1)
        if not self.active:
            return [array]
        local = torch.from_numpy(array.copy()).to(self.device)
        size = torch.tensor([local.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        tdist.all_gather(sizes, size)
        counts = [int(s.item()) for s in sizes]
        padded = torch.zeros(max(max(counts), 1), dtype=local.dtype, device=self.device)
        padded[:local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        tdist.all_gather(parts, padded)
        return [p[:n].cpu().numpy() for p, n in zip(parts, counts)]

    def all_gather_bytes(self, blob: bytes) -> list[bytes]:
        return [p.tobytes() for p in self.all_gather_array(np.frombuffer(blob, dtype=np.uint8))]

    def broadcast_bytes(self, blob: bytes) -> bytes:
        """Rank 0's ``blob`` on every rank (the other ranks' argument is ignored)."""
        if not self.active:
            return blob
        size = torch.tensor([len(blob) if self.is_main else 0], dtype=torch.int64, device=self.device)
        tdist.broadcast(size, src=0)
        n = int(size.item())
        if self.is_main:
            data = torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy()).to(self.device)
        else:
            data = torch.empty(n, dtype=torch.uint8, device=self.device)
        if n:
            tdist.broadcast(data, src=0)
        return data.cpu().numpy().tobytes()

    def run_on_main(self, fn: Callable[[], bytes]) -> bytes:
        """Run ``fn`` on rank 0 only and hand its bytes to every rank; if it fails, every rank
        raises (rank 0 the original error, the others an ``MLSA4RecError`` with its message)
        instead of the others hanging in their next collective."""
        if not self.active:
            return fn()
        blob, failure = b"", None
        if self.is_main:
            try:
                blob = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below after telling the others
                failure = exc
        message = b"" if failure is None else (str(failure) or type(failure).__name__).encode()
        flag = self.broadcast_bytes((b"E" + message) if failure is not None else (b"K" + blob))
        if failure is not None:
            raise failure
        if flag[:1] == b"E":
            raise PeerFailed(flag[1:].decode(errors="replace"))
        return flag[1:]

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (same start whatever the seeding)."""
        if not self.active:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                on_device = tensor.data.to(self.device)
                tdist.broadcast(on_device, src=0)
                if on_device is not tensor.data:
                    tensor.data.copy_(on_device)

    def sum_gradients(self, params: Iterable[torch.nn.Parameter], loss: torch.Tensor) -> float:
        """Sum every parameter's gradient and the step ``loss`` over ranks; returns the summed loss.

        A missing gradient counts as zero; a parameter that has none on *every* rank keeps
        ``grad = None`` so that the optimiser skips it exactly as it would in one process.
        """
        if not self.active:
            return float(loss.detach())
        params = list(params)
        rows = touched_rows(params, self._any_rank)
        buffer = pack_gradients(params, loss, rows).to(self.device)
        tdist.all_reduce(buffer, op=tdist.ReduceOp.SUM)
        return unpack_gradients(params, buffer, rows)

    def _any_rank(self, mask: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a uint8 ``mask`` over ranks."""
        on_device = mask.to(self.device)
        tdist.all_reduce(on_device, op=tdist.ReduceOp.MAX)
        return on_device.cpu()

    def identical_across_ranks(self, module: torch.nn.Module) -> bool:
        """Whether every rank holds bit-identical weights (a cheap float64 fingerprint)."""
        if not self.active:
            return True
        with torch.no_grad():
            mine = np.array([[float(p.double().sum()), float(p.double().abs().sum())] for p in module.parameters()])
        views = self.all_gather_array(mine)
        return all(np.array_equal(views[0], v) for v in views[1:])


ROW_SPARSE_MIN_ROWS = 65_536  # a 2-D gradient with this many rows (an item table) is summed by its touched rows


def touched_rows(params: list[torch.nn.Parameter],
                 any_rank: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor | None]:
    """For each parameter, the sorted indices of the rows to exchange, or None for all of it.

    Only 2-D parameters of at least :data:`ROW_SPARSE_MIN_ROWS` rows are candidates: their rows
    with a non-zero gradient on this rank are OR-ed over ranks by ``any_rank`` (every rank gets
    the same union, so every rank packs the same layout). Where the union holds more than half the
    rows (a full softmax) the whole parameter is exchanged: indexing would cost more than it saves.
    """
    rows: list[torch.Tensor | None] = [None] * len(params)
    big = [i for i, p in enumerate(params) if p.dim() == 2 and p.shape[0] >= ROW_SPARSE_MIN_ROWS]
    if not big:
        return rows
    masks = [_nonzero_rows(params[i].grad).cpu() if params[i].grad is not None
             else torch.zeros(params[i].shape[0], dtype=torch.bool) for i in big]
    union = any_rank(torch.cat(masks).to(torch.uint8)).bool()
    offset = 0
    for i in big:
        n = params[i].shape[0]
        mine = union[offset:offset + n]
        offset += n
        if int(mine.sum()) <= n // 2:
            rows[i] = mine.nonzero().squeeze(1)
    return rows


def _nonzero_rows(grad: torch.Tensor) -> torch.Tensor:
    """Which rows of a 2-D gradient have a non-zero bit: read as 64-bit words where a row's bytes
    allow, twice as fast as comparing floats (a -0.0 counts as touched; sending it is harmless)."""
    g = grad.detach().contiguous()
    if (g.shape[1] * g.element_size()) % 8 == 0:
        return g.view(torch.uint8).view(torch.int64).any(dim=1)
    return g.ne(0).any(dim=1)


def pack_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor,
                   rows: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """One flat float buffer: every gradient (zeros where missing; only the listed ``rows`` of a
    parameter that has them), one has-grad flag per parameter, then the loss; summing these
    buffers over ranks sums all three."""
    rows = rows or [None] * len(params)
    parts = [_grad_part(p, r) for p, r in zip(params, rows)]
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    device = params[0].device if params else torch.device("cpu")
    tail = torch.cat([flags.to(device), loss.detach().reshape(1).float().to(device)])
    return torch.cat([*parts, tail])


def _grad_part(p: torch.nn.Parameter, rows: torch.Tensor | None) -> torch.Tensor:
    """The flat float32 piece of ``p``'s gradient that :func:`pack_gradients` sends."""
    shape = (p.numel(),) if rows is None else (len(rows) * math.prod(p.shape[1:]),)
    if p.grad is None:
        return torch.zeros(shape, device=p.device)
    grad = p.grad.detach() if rows is None else p.grad.detach().index_select(0, rows.to(p.grad.device))
    return grad.reshape(-1).float()


def unpack_gradients(params: list[torch.nn.Parameter], buffer: torch.Tensor,
                     rows: list[torch.Tensor | None] | None = None) -> float:
    """Write a summed :func:`pack_gradients` buffer (made with the same ``rows``) back into
    ``.grad``, zeros in the rows not sent; returns the loss."""
    rows = rows or [None] * len(params)
    sizes = [p.numel() if r is None else len(r) * math.prod(p.shape[1:]) for p, r in zip(params, rows)]
    n = sum(sizes)
    flags, loss = buffer[n:n + len(params)], float(buffer[-1])
    offset = 0
    for p, r, size, flag in zip(params, rows, sizes, flags.tolist()):
        piece = buffer[offset:offset + size]
        offset += size
        if flag == 0:
            p.grad = None
        elif r is None:
            p.grad = piece.view_as(p).to(device=p.device, dtype=p.dtype).clone()
        else:  # the rank's own gradient is overwritten in place: a fresh table-sized tensor costs page faults
            own = p.grad
            if own is None or own.shape != p.shape or own.dtype != p.dtype or not own.is_contiguous():
                own = torch.empty_like(p)
            own.detach().zero_().index_copy_(0, r.to(p.device), piece.view(len(r), *p.shape[1:]).to(own))
            p.grad = own
    return loss


def device_for(name: str, local_rank: int) -> torch.device:
    """The device of one rank: with CUDA, rank r on a node uses GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(name)
    if not (name == "cpu" or name.startswith("cuda")):  # said before any rank starts (preflight calls this)
        raise MLSA4RecError(f"distributed training runs on cpu or cuda, not {name}; use --set device=cpu")
    if name.startswith("cuda"):
        if ":" in name:
            raise MLSA4RecError(f"--set device={name} would put every rank on one GPU; under torchrun use "
                                "--set device=cuda (rank r then uses GPU LOCAL_RANK) or CUDA_VISIBLE_DEVICES")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init(device_name: str, timeout_s: float) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA) and return this
    rank's context and device; outside torchrun, a single-process context and no group.

    ``timeout_s`` bounds every collective, so a rank that dies or hangs makes the others fail
    with an error after that long instead of waiting forever.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistContext(), resolve_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device_for(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type not in ("cpu", "cuda"):
        raise MLSA4RecError(f"distributed training runs on cpu or cuda, not {device.type}; use --set device=cpu")
    owns = not tdist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            tdist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                     device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MLSA4RecError(f"rank {rank} could not join the process group ({backend}): {first}; check "
                                "MASTER_ADDR/MASTER_PORT or the torchrun --rdzv-endpoint") from None
    log.debug("rank %d of %d joined the %s group on %s", rank, world, backend, device)
    comm = device if backend == "nccl" else torch.device("cpu")
    return DistContext(rank, world, local_rank, comm, owns), device


def destroy(ctx: DistContext) -> None:
    """Leave the process group if ``ctx`` created it (quietly: the run's outcome is decided)."""
    if ctx.owns_group and tdist.is_initialized():
        tdist.destroy_process_group()
