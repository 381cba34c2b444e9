"""Batches of (history, length, target) built by vectorised gathers from the flat item array.

The training schemes (``MLSA4REC.md`` section 5 for the first two):

* **prefix** - the protocol's samples: every training target with the (at most L) items before
  it as input, one sample each. Works for any model.
* **all_positions** - each user's training targets cut, from the most recent backwards, into
  windows of at most L; the window's input is the (at most L) items before its last target, and
  the loss is taken at every position. Only for causal models, whose output at position t sees only items
  <= t: the output at t of a window is then exactly the model's output on the prefix ending at t
  (minus whatever history falls before the window), so the supervision is the same kind as the
  prefix scheme's and every training target is used once per epoch, but one forward pass serves
  up to L targets. It is far cheaper on long sequences (ML-1M: ~10k windows vs ~980k prefixes).

* **cloze** - BERT4Rec's masked-item task, with RecBole 1.2.1's semantics (its
  ``MaskItemSequence`` transform): the samples are the prefix samples' histories (their targets are
  not used). Per batch a coin with probability ``ft_ratio`` picks one of two kinds:
  a *fine-tuning* batch masks each history's last item, the one target (none where that item is
  the first); otherwise each history item is masked with probability ``mask_ratio``, and the last
  ``int(mask_ratio * L)`` masked positions of a sample are its targets, except position 0
  (RecBole pads the list of masked positions with 0, so a mask at position 0 takes no loss;
  masked items past the cap stay masked in the input). Masks are a pure function of an
  epoch key, the sample and the position (``cloze_uniforms``), so every rank of a distributed step
  and a resumed epoch draw the same ones.

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
    item_seq: torch.Tensor   # B x L' long, right-padded with 0 (cloze: masked items replaced by the mask token)
    lengths: torch.Tensor    # B long, >= 1
    targets: torch.Tensor    # B (prefix / eval) or B x L' (all_positions, cloze; 0 = no target)
    rows: np.ndarray         # index of each row in the sampler's samples (eval: in the split's target list)


def gather(items: np.ndarray, start: np.ndarray, end: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows items[start_i:end_i] (each <= width long), right-padded with 0 to ``width``."""
    lengths = end - start
    idx = start[:, None] + np.arange(width)[None, :]
    mask = np.arange(width)[None, :] < lengths[:, None]
    out = np.where(mask, items[np.minimum(idx, items.shape[0] - 1)], 0)
    return out, lengths


def history_bounds(data: SequenceData, targets: np.ndarray, max_seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Input range [start, end) of each target: the (at most ``max_seq_length``) items right before it."""
    start = np.maximum(data.history_start(targets), targets - max_seq_length)
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


@dataclass(frozen=True)
class Cloze:
    """What the cloze scheme takes from the model (BERT4Rec's hyperparameters)."""
    mask_token: int     # the id written in place of a masked item (n_items + 1)
    mask_ratio: float   # probability that a history item is masked
    ft_ratio: float     # probability that a batch masks only each history's last item


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def cloze_uniforms(key: int, rows: np.ndarray, width: int) -> np.ndarray:
    """len(rows) x width uniforms in [0, 1): splitmix64 of (key, row, position), so the draw for a
    sample does not depend on which batch or shard holds it."""
    counter = rows.astype(np.uint64)[:, None] * np.uint64(1 << 20) + np.arange(width, dtype=np.uint64)[None, :]
    x = np.uint64(key) + (counter + np.uint64(1)) * _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def cloze_masks(lengths: np.ndarray, width: int, fine_tune: np.ndarray, uniforms: np.ndarray, mask_ratio: float,
                max_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """(masked, is_target), both B x width bool, for histories of ``lengths``: RecBole's rule
    (module docstring). ``fine_tune`` (B bool) marks the rows of a fine-tuning batch."""
    position = np.arange(width)[None, :]
    masked = np.where(fine_tune[:, None], position == lengths[:, None] - 1,
                      (position < lengths[:, None]) & (uniforms < mask_ratio))
    masked_from_here = np.cumsum(masked[:, ::-1], axis=1)[:, ::-1]    # masked positions at or after each one
    return masked, masked & (masked_from_here <= max_targets) & (position > 0)


class TrainSampler:
    """Shuffled training batches for one scheme; iterate once per epoch."""

    def __init__(
        self,
        data: SequenceData,
        scheme: str,
        max_seq_length: int,
        batch_size: int,
        seed: int,
        trim: bool = False,
        stride: int = 0,
        bucket_chunks: int = 50,
        cloze: Cloze | None = None,
    ) -> None:
        if scheme not in ("prefix", "all_positions", "cloze"):
            raise ValueError(f"unknown training scheme {scheme!r}")
        if (scheme == "cloze") != (cloze is not None):
            raise ValueError("the cloze scheme needs its Cloze settings, and only it takes them")
        self.data = data
        self.scheme = scheme
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.trim = trim
        self.bucket_chunks = bucket_chunks
        self.cloze = cloze
        self.rng = np.random.default_rng(seed)
        self.n_targets: int | None = None  # cloze: drawn per batch
        if scheme in ("prefix", "cloze"):
            self.targets = data.train_targets()
            self.start, self.end = history_bounds(data, self.targets, max_seq_length)
            if scheme == "prefix":
                self.n_targets = self.n_samples
            else:
                self.max_targets = int(cloze.mask_ratio * max_seq_length)  # RecBole's mask_item_length
                self.epoch_key = 0
                self.fine_tune = np.zeros(self.n_samples, dtype=bool)
        else:
            # targets [a, b) in pieces of `stride`; the input is the (up to L) items before b, so
            # with stride < L each window re-reads L - stride items of context it takes no loss on
            a, b = all_position_windows(data, min(stride or max_seq_length, max_seq_length))
            self.start, self.end = history_bounds(data, b - 1, max_seq_length)
            self.loss_start = a - 1
            self.n_targets = int((b - a).sum())
        self.sample_lengths = self.end - self.start
        # targets each sample contributes to the loss (a distributed step needs a batch's total)
        if scheme == "prefix":
            self.sample_targets = np.ones(self.n_samples, dtype=np.int64)
        elif scheme == "all_positions":
            self.sample_targets = self.end - self.loss_start

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
        if self.scheme == "cloze":
            return int(self._cloze(rows, self.max_seq_length)[1].sum())
        return int(self.sample_targets[rows].sum())

    def epoch_batches(self) -> list[np.ndarray]:
        """Sample indices of each batch of one epoch (draws from the generator)."""
        order = self.rng.permutation(self.n_samples)
        size = self.batch_size
        if not self.trim:
            batches = np.split(order, range(size, len(order), size))
        else:
            # bucketing: sort by length inside chunks of many batches, then shuffle the batches
            chunk = size * self.bucket_chunks
            pieces = [o[np.argsort(self.sample_lengths[o], kind="stable")]
                      for o in np.split(order, range(chunk, len(order), chunk))]
            batches = [b for p in pieces for b in np.split(p, range(size, len(p), size))]
            batches = [batches[i] for i in self.rng.permutation(len(batches))]
        if self.scheme == "cloze":  # the epoch's masks: one key, one coin per batch
            self.epoch_key = int(self.rng.integers(2 ** 63))
            coins = self.rng.random(len(batches)) < self.cloze.ft_ratio
            for rows, coin in zip(batches, coins):
                self.fine_tune[rows] = coin
        return batches

    def _cloze(self, rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        lengths = self.sample_lengths[rows]
        return cloze_masks(lengths, width, self.fine_tune[rows], cloze_uniforms(self.epoch_key, rows, width),
                           self.cloze.mask_ratio, self.max_targets)

    def batch(self, rows: np.ndarray) -> Batch:
        """The tensors of the samples ``rows`` (trimmed to their longest history if ``trim``)."""
        items = self.data.items
        start, end = self.start[rows], self.end[rows]
        width = int((end - start).max()) if self.trim else self.max_seq_length
        seq, lengths = gather(items, start, end, width)
        if self.scheme == "prefix":
            targets = torch.from_numpy(items[end])
        elif self.scheme == "cloze":  # the masked items that take a loss; 0 elsewhere
            masked, is_target = self._cloze(rows, width)
            targets = torch.from_numpy(np.where(is_target, seq, 0))
            seq = np.where(masked, self.cloze.mask_token, seq)
        else:  # the item after each input position; 0 where no loss is taken
            targets = gather(items, start + 1, end + 1, width)[0]
            context_only = start[:, None] + np.arange(width)[None, :] < self.loss_start[rows, None]
            targets = torch.from_numpy(np.where(context_only, 0, targets))
        return Batch(torch.from_numpy(seq), torch.from_numpy(lengths), targets, rows)

    def __iter__(self) -> Iterator[Batch]:
        for rows in self.epoch_batches():
            yield self.batch(rows)


def eval_order(data: SequenceData, split: str, max_seq_length: int, trim: bool = False) -> np.ndarray:
    """The order in which ``eval_batches`` scores the users of ``split`` (indices into its targets):
    user order, or - when batches are trimmed - by history length, so that each batch is about as
    wide as its histories instead of as wide as its longest one (a stable sort: deterministic)."""
    targets = data.eval_targets(split)
    if not trim:
        return np.arange(len(targets))
    start, end = history_bounds(data, targets, max_seq_length)
    return np.argsort(end - start, kind="stable")


def eval_batches(
    data: SequenceData, split: str, max_seq_length: int, batch_size: int, trim: bool = False,
    part: tuple[int, int] = (0, 1),
) -> Iterator[Batch]:
    """Validation or test batches: input = the user's events before the target, in ``eval_order``
    (``Batch.rows`` says which users each batch holds).

    ``part=(rank, world_size)`` yields only batches ``rank, rank + world_size, ...`` of that
    sequence: each is built exactly as in one process, so distributed scores are bit-identical.
    """
    rank, world_size = part
    targets = data.eval_targets(split)
    order = eval_order(data, split, max_seq_length, trim)
    start, end = history_bounds(data, targets, max_seq_length)
    for lo in range(rank * batch_size, len(targets), batch_size * world_size):
        rows = order[lo:lo + batch_size]
        s, e = start[rows], end[rows]
        width = int((e - s).max()) if trim else max_seq_length
        seq, lengths = gather(data.items, s, e, width)
        yield Batch(torch.from_numpy(seq), torch.from_numpy(lengths), torch.from_numpy(data.items[e]), rows)
