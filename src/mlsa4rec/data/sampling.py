"""Batches of (history, length, target) built by vectorised gathers from the flat item array.

Two training schemes (``MLSA4REC.md`` section 5):

* **prefix** - the protocol's samples: every training target with the (at most L) items before
  it as input, one sample each. Works for any model.
* **all_positions** - each user's training targets cut, from the most recent backwards, into
  windows of at most L; the window's input is the (at most L) items before its last target, and
  the loss is taken at every position. Only for causal models, whose output at position t sees only items
  <= t: the output at t of a window is then exactly the model's output on the prefix ending at t
  (minus whatever history falls before the window), so the supervision is the same kind as the
  prefix scheme's and every training target is used once per epoch, but one forward pass serves
  up to L targets. It is far cheaper on long sequences (ML-1M: ~10k windows vs ~980k prefixes).

Histories are right-padded with 0; a model that declares itself padding-invariant gets batches
trimmed to their longest history, and batches are formed from length-sorted chunks of a shuffled
order (bucketing) so that little of each batch is padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mlsa4rec.data.dataset import SequenceData


@dataclass
class Batch:
    item_seq: torch.Tensor   # B x L' long, right-padded with 0
    lengths: torch.Tensor    # B long, >= 1
    targets: torch.Tensor    # B (prefix / eval) or B x L' (all_positions, 0 = no target)
    rows: np.ndarray         # index of each row in the sampler's samples (eval: in the split's target list)


def gather(items: np.ndarray, start: np.ndarray, end: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows items[start_i:end_i] (each <= width long), right-padded with 0 to ``width``."""
    lengths = end - start
    idx = start[:, None] + np.arange(width)[None, :]
    mask = np.arange(width)[None, :] < lengths[:, None]
    out = np.where(mask, items[np.minimum(idx, items.shape[0] - 1)], 0)
    return out, lengths


def history_bounds(data: SequenceData, targets: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Input range [start, end) of each target: the (at most ``max_len``) items right before it."""
    start = np.maximum(data.history_start(targets), targets - max_len)
    return start, targets


def all_position_windows(data: SequenceData, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Target ranges [a, b) of the all-positions windows: each user's training targets cut into
    pieces of at most ``stride``, the last piece ending at the user's last training target."""
    first, end = data.train_target_range()
    n = end - first
    per_user = -(-n // stride)                      # ceil division; 0 for users with no targets
    user = np.repeat(np.arange(data.n_users), per_user)
    k = np.arange(int(per_user.sum())) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    b = end[user] - k * stride
    a = np.maximum(first[user], b - stride)
    return a, b


class TrainSampler:
    """Shuffled training batches for one scheme; iterate once per epoch."""

    def __init__(
        self,
        data: SequenceData,
        scheme: str,
        max_len: int,
        batch_size: int,
        seed: int,
        trim: bool = False,
        stride: int = 0,
        bucket_chunks: int = 50,
    ) -> None:
        if scheme not in ("prefix", "all_positions"):
            raise ValueError(f"unknown training scheme {scheme!r}")
        self.data, self.scheme, self.max_len, self.batch_size = data, scheme, max_len, batch_size
        self.trim, self.bucket_chunks = trim, bucket_chunks
        self.rng = np.random.default_rng(seed)
        if scheme == "prefix":
            self.targets = data.train_targets()
            self.start, self.end = history_bounds(data, self.targets, max_len)
            self.n_targets = self.n_samples
        else:
            # targets [a, b) in pieces of `stride`; the input is the (up to L) items before b, so
            # with stride < L each window re-reads L - stride items of context it takes no loss on
            a, b = all_position_windows(data, min(stride or max_len, max_len))
            self.start, self.end = history_bounds(data, b - 1, max_len)
            self.loss_start = a - 1
            self.n_targets = int((b - a).sum())
        self.sample_lengths = self.end - self.start
        # targets each sample contributes to the loss (a distributed step needs a batch's total)
        self.sample_targets = (np.ones(self.n_samples, dtype=np.int64) if scheme == "prefix"
                               else self.end - self.loss_start)

    @property
    def n_samples(self) -> int:
        return int(self.start.shape[0])

    def __len__(self) -> int:
        return -(-self.n_samples // self.batch_size)

    @property
    def rng_state(self) -> dict:
        """The shuffling generator's state (plain JSON values): saved at the start of an epoch,
        it lets a resumed run draw the same batches again."""
        return self.rng.bit_generator.state

    @rng_state.setter
    def rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def targets_in(self, rows: np.ndarray) -> int:
        """Number of loss targets in the samples ``rows``."""
        return int(self.sample_targets[rows].sum())

    def epoch_batches(self) -> list[np.ndarray]:
        """Sample indices of each batch of one epoch (draws from the generator)."""
        order = self.rng.permutation(self.n_samples)
        size = self.batch_size
        if not self.trim:
            return np.split(order, range(size, len(order), size))
        # bucketing: sort by length inside chunks of many batches, then shuffle the batches
        chunk = size * self.bucket_chunks
        pieces = [o[np.argsort(self.sample_lengths[o], kind="stable")]
                  for o in np.split(order, range(chunk, len(order), chunk))]
        batches = [b for p in pieces for b in np.split(p, range(size, len(p), size))]
        return [batches[i] for i in self.rng.permutation(len(batches))]

    def batch(self, rows: np.ndarray) -> Batch:
        """The tensors of the samples ``rows`` (trimmed to their longest history if ``trim``)."""
        items = self.data.items
        start, end = self.start[rows], self.end[rows]
        width = int((end - start).max()) if self.trim else self.max_len
        seq, lengths = gather(items, start, end, width)
        if self.scheme == "prefix":
            targets = torch.from_numpy(items[end])
        else:  # the item after each input position; 0 where no loss is taken
            targets = gather(items, start + 1, end + 1, width)[0]
            context_only = start[:, None] + np.arange(width)[None, :] < self.loss_start[rows, None]
            targets = torch.from_numpy(np.where(context_only, 0, targets))
        return Batch(torch.from_numpy(seq), torch.from_numpy(lengths), targets, rows)

    def __iter__(self) -> Iterator[Batch]:
        for rows in self.epoch_batches():
            yield self.batch(rows)


def eval_order(data: SequenceData, split: str, max_len: int, trim: bool = False) -> np.ndarray:
    """The order in which ``eval_batches`` scores the users of ``split`` (indices into its targets):
    user order, or - when batches are trimmed - by history length, so that each batch is about as
    wide as its histories instead of as wide as its longest one (a stable sort: deterministic)."""
    targets = data.eval_targets(split)
    if not trim:
        return np.arange(len(targets))
    start, end = history_bounds(data, targets, max_len)
    return np.argsort(end - start, kind="stable")


def eval_batches(
    data: SequenceData, split: str, max_len: int, batch_size: int, trim: bool = False, part: tuple[int, int] = (0, 1)
) -> Iterator[Batch]:
    """Validation or test batches: input = the user's events before the target, in ``eval_order``
    (``Batch.rows`` says which users each batch holds).

    ``part=(rank, world_size)`` yields only batches ``rank, rank + world_size, ...`` of that
    sequence: each is built exactly as in one process, so distributed scores are bit-identical.
    """
    rank, world_size = part
    targets = data.eval_targets(split)
    order = eval_order(data, split, max_len, trim)
    start, end = history_bounds(data, targets, max_len)
    for lo in range(rank * batch_size, len(targets), batch_size * world_size):
        rows = order[lo:lo + batch_size]
        s, e = start[rows], end[rows]
        width = int((e - s).max()) if trim else max_len
        seq, lengths = gather(data.items, s, e, width)
        yield Batch(torch.from_numpy(seq), torch.from_numpy(lengths), torch.from_numpy(data.items[e]), rows)
