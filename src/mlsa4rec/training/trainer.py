"""The training loop: full-softmax cross-entropy, Adam, early stopping on a validation metric.

The loss of one step is the mean cross-entropy over all of its targets, whichever the scheme:
one target per sample for ``prefix``, one per real position for ``all_positions``, one per
predicted mask for ``cloze``. Logits are
taken against the real items only (the padding row of the item table is never a class).
``loss_type`` other than CE (``training.losses``: a sampled softmax, gBCE) replaces the full
softmax over those same targets; their negatives are drawn from the run's seed and the step.

With several ranks (torchrun) every rank draws the same global batches; each computes the rows
``shard_rows`` gives it and the loss ``sum of CE over its targets / targets in the global batch``;
gradients are summed over ranks, so a distributed step applies the gradient a single process
would compute on the whole global batch (up to float summation order) and ``train_batch_size``
keeps its meaning. The loop's position, early-stopping state and random states can be saved and
restored (``state_dict`` / ``load_state_dict``) so that a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mlsa4rec.config import Config
from mlsa4rec.data.dataset import SequenceData
from mlsa4rec.data.sampling import Batch, Cloze, TrainSampler
from mlsa4rec.errors import MLSA4RecError, TimeBudgetSpent
from mlsa4rec.evaluation import evaluate_split
from mlsa4rec.models.base import SequentialRecommender
from mlsa4rec.runs import checkpoint
from mlsa4rec.runtime import peak_rss_bytes, reset_peak_rss
from mlsa4rec.settings import TrainConfig
from mlsa4rec.training import stop
from mlsa4rec.training.distributed import DistContext, rank_seed, shard_rows
from mlsa4rec.training.losses import TrainingLoss, full_softmax_cross_entropy

log = logging.getLogger("mlsa4rec")


# batches of similar-length samples are formed inside chunks of this many batches (bucket_batches)
BUCKET_CHUNKS = 50


class NonFiniteLoss(MLSA4RecError):
    """The loss became NaN or infinite: the run stops and keeps its last good checkpoint (resuming
    it unchanged would diverge again, so the message says what to change)."""


def resolve_scheme(model: SequentialRecommender, requested: str) -> str:
    scheme = model.preferred_scheme if requested == "auto" else requested
    if scheme == "all_positions" and not model.causal:
        raise MLSA4RecError(
            f"model {type(model).name!r} is not causal, so it cannot train with train_scheme=all_positions "
            "(its output at a position would see later items); use train_scheme=prefix"
        )
    if scheme == "cloze" and not model.cloze:
        raise MLSA4RecError(
            f"model {type(model).name!r} has no mask token, so it cannot train with train_scheme=cloze "
            "(BERT4Rec's masked-item task); use train_scheme=prefix or auto"
        )
    return scheme


def cloze_settings(model: SequentialRecommender, scheme: str) -> Cloze | None:
    if scheme != "cloze":
        return None
    return Cloze(mask_token=model.mask_token, mask_ratio=model.mask_ratio, ft_ratio=model.ft_ratio)


def cross_entropy(model: SequentialRecommender, batch: Batch, scheme: str, device: torch.device,
                  loss: TrainingLoss | None = None, step: int = 0) -> torch.Tensor:
    """Mean full-softmax CE over the batch's targets; classes are the real items 1..N. ``loss``
    (the run's ``TrainingLoss``; None: CE) takes the same targets instead, ``step`` seeding its
    negatives."""
    seq, lengths, targets = batch.item_seq.to(device), batch.lengths.to(device), batch.targets.to(device)
    if scheme == "prefix":
        hidden = model(seq, lengths)
    else:
        mask = targets > 0
        hidden = model.encode(seq, lengths)[mask]
        targets = targets[mask]
        if targets.numel() == 0:  # a cloze batch can draw no target: a zero loss, not 0 / 0
            return model.item_table().sum() * 0.0
    if loss is None:
        return full_softmax_cross_entropy(hidden, model.item_table()[1:], targets - 1)
    return loss(hidden, model.item_table()[1:], targets - 1, step)


def training_loss(settings: TrainConfig, data: SequenceData) -> TrainingLoss:
    """The run's loss from its settings (``config.train``); the popularity and in-batch samplers
    get each item's count among ``data``'s training targets."""
    counts = None
    if str(settings.loss_type).lower() == "sampled_softmax" and settings.negative_sampler != "uniform":
        counts = torch.from_numpy(np.bincount(data.items[data.train_targets()], minlength=data.n_items + 1)[1:])
    return TrainingLoss(settings.loss_type, data.n_items, negatives=settings.negatives,
                        sampler=settings.negative_sampler, logq_correction=settings.logq_correction,
                        gbce_t=settings.gbce_t, seed=settings.seed, counts=counts)


def peak_memory_bytes(device: torch.device) -> int | None:
    """The epoch's peak memory for its history row: on CUDA the most PyTorch allocated on ``device``,
    elsewhere the process's peak resident set (``runtime.peak_rss_bytes``), both since the epoch
    began (``fit`` resets them; where the resident peak cannot be reset, since the process began)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def lr_factor(name: str, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the learning rate after ``step`` optimiser steps (reaches 0 at the end)."""
    total = max(total_steps, 1)
    if name == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if name == "linear":
        return lambda step: 1.0 - min(step, total) / total
    return lambda step: 1.0


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    epochs_run: int
    stopped_early: bool
    train_seconds: float
    eval_seconds: float
    history: list[dict] = field(default_factory=list)

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / max(self.epochs_run, 1)


@dataclass
class Progress:
    """Where training stands: everything of the loop that a checkpoint must carry (plain JSON)."""

    epoch: int = 1                      # the epoch in progress (1-based)
    step: int = 0                       # optimiser steps done in that epoch
    global_step: int = 0                # optimiser steps done in all
    epoch_loss: float = 0.0             # sum of that epoch's step losses so far
    empty_steps: int = 0                # that epoch's batches without a target (cloze), skipped
    epoch_seconds: float = 0.0          # training seconds of that epoch so far
    sampler_state: dict | None = None   # the shuffling generator at the start of that epoch
    best_score: float = -math.inf
    best_epoch: int = 0
    best_valid: dict = field(default_factory=dict)
    bad_epochs: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Trains ``model`` on ``data``'s training samples, validating every ``eval_step`` epochs.

    Hooks: ``on_improve(model, epoch)`` after a better validation (rank 0 only);
    ``on_checkpoint(state)`` with a checkpoint state at the end of every epoch and every
    ``checkpoint_steps`` steps (give it on every rank or none: gathering the ranks' random states
    is collective; it is called on rank 0 only); ``on_step(epoch, step)`` after every optimiser
    step (and any checkpoint at that step); ``on_epoch(row)`` with each epoch's history row (loss,
    seconds, the validation metrics when it validated, the learning rate, ``peak_memory_bytes``:
    see ``peak_memory_bytes``; rank 0 only). ``on_epoch`` may return a reason to pause (a string):
    in one process, training then pauses there as at a spent deadline, unless that epoch was its last.

    ``deadline`` (``time.monotonic()`` seconds): past it, training checkpoints and raises
    ``TimeBudgetSpent``, so a long run goes in slices; every rank stops at the same step.
    """

    def __init__(self, model: SequentialRecommender, data: SequenceData, config: Config,
                 device: torch.device, on_improve: Callable[[SequentialRecommender, int], None] | None = None, *,
                 group: DistContext | None = None, on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None,
                 on_epoch: Callable[[dict[str, Any]], str | None] | None = None,
                 deadline: float | None = None) -> None:
        self.model = model.to(device)
        self.data = data
        self.config = config
        self.device = device
        self.group = group or DistContext()
        t = config.train  # the shared settings; the model's own went into its constructor
        self.scheme = resolve_scheme(model, t.train_scheme)
        self.sampler = TrainSampler(
            data, self.scheme, t.max_seq_length, t.train_batch_size, t.seed,
            trim=model.padding_invariant, stride=t.all_positions_stride,
            bucket_chunks=BUCKET_CHUNKS if t.bucket_batches else 1,  # 1: a batch is a uniform draw
            cloze=cloze_settings(model, self.scheme),
        )
        if self.sampler.n_samples == 0:
            raise MLSA4RecError(f"{data.name} has no training samples after filtering; every user needs at "
                                "least 2 events (4 for a validation target); loosen user_inter_num_interval")
        if len(data.eval_targets("valid")) == 0:
            raise MLSA4RecError(f"{data.name} has no user with a validation target (users need 4+ events); "
                                "early stopping needs one: loosen the filters or use a bigger dataset")
        if self.group.active:  # same start on every rank, then a dropout stream of its own per rank
            self.group.broadcast_module(self.model)
            torch.manual_seed(rank_seed(t.seed, self.group.rank))
        self.criterion = training_loss(t, data)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=t.learning_rate,
                                          weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(t.lr_scheduler, t.epochs * len(self.sampler)))
        self.on_improve = on_improve
        self.on_checkpoint = on_checkpoint
        self.on_step = on_step
        self.on_epoch = on_epoch
        self.deadline = deadline
        self.progress = Progress(sampler_state=self.sampler.rng_state)
        self.best_state: dict[str, torch.Tensor] | None = None
        # each training session of the run (the caller adds one as it starts): its code and where it began;
        # beside Progress in a checkpoint, which older code reads with Progress(**...) and would refuse
        self.segments: list[dict] = []

    def evaluate(self, split: str) -> dict[str, float]:
        return evaluate_split(self.model, self.data, split, self.config.train, self.device, self.group)

    def shard_loss(self, rows: np.ndarray) -> torch.Tensor | None:
        """This rank's share of the loss of the global batch ``rows`` (None for an empty shard):
        the sum of CE over its targets divided by the number of targets in the whole batch, so
        the shares of all ranks add up to the batch's mean CE. Sampled losses draw the negatives
        of the step ``global_step`` (the same on every rank; in-batch: the rank's own targets)."""
        shard = shard_rows(rows, self.group.rank, self.group.world_size)
        if len(shard) == 0:
            return None
        loss = cross_entropy(self.model, self.sampler.batch(shard), self.scheme, self.device,
                             loss=self.criterion, step=self.progress.global_step)
        if self.group.active:
            loss = loss * (self.sampler.targets_in(shard) / max(self.sampler.targets_in(rows), 1))
        return loss

    def train_step(self, rows: np.ndarray, epoch: int) -> float | None:
        """One optimiser step on the global batch ``rows``; returns its mean loss. A cloze batch
        that drew no target (with length-bucketing: a batch of one-item histories, whose only item
        is never a target) is skipped, as the same answer on every rank: no gradient to follow,
        and an Adam step on zero gradients would still move the weights by its momentum."""
        if self.scheme == "cloze" and self.sampler.targets_in(rows) == 0:
            return None
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.shard_loss(rows)
        if loss is not None:
            loss.backward()
        else:
            loss = torch.zeros((), device=self.device)
        value = self.group.sum_gradients(self.model.parameters(), loss)
        if not math.isfinite(value):  # every rank sees the same summed loss, so all stop here together
            raise NonFiniteLoss(f"the loss became {value} at epoch {epoch} (step {self.progress.step + 1})")
        if self.config.train.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return value

    def train_epoch(self, epoch: int) -> float:
        """Train (the rest of) epoch ``epoch``; returns the mean loss of its steps (skipped empty
        cloze batches do not count)."""
        p = self.progress
        self.model.train()
        self.sampler.rng_state = p.sampler_state  # a no-op, except right after a resume
        batches = self.sampler.epoch_batches()
        every = self.config.train.checkpoint_steps
        bar = tqdm(total=len(batches), initial=p.step, desc=f"epoch {epoch}", leave=False,
                   disable=None if self.group.is_main else True, dynamic_ncols=True)
        t0, seconds_before = time.perf_counter(), p.epoch_seconds
        for rows in batches[p.step:]:
            loss = self.train_step(rows, epoch)
            if loss is None:
                p.empty_steps += 1
            else:
                p.epoch_loss += loss
            p.step += 1
            p.global_step += 1
            p.epoch_seconds = seconds_before + time.perf_counter() - t0
            if every and p.global_step % every == 0 and p.step < len(batches):
                self.checkpoint()  # the epoch's last step is followed by the end-of-epoch one
            if self.on_step:
                self.on_step(epoch, p.step)
            if p.step < len(batches) and self.out_of_time():  # at the epoch's end, fit() checkpoints first
                bar.close()
                self.checkpoint()
                raise TimeBudgetSpent(f"{self._why_paused()} at epoch {epoch}, step {p.step}")
            bar.update()
            bar.set_postfix(loss=f"{p.epoch_loss / max(p.step - p.empty_steps, 1):.4f}", refresh=False)
        bar.close()
        return p.epoch_loss / max(len(batches) - p.empty_steps, 1)

    def fit(self) -> FitResult:
        t, p = self.config.train, self.progress
        key = t.valid_metric
        targets = "masks drawn per batch" if self.sampler.n_targets is None else f"{self.sampler.n_targets} targets"
        log.info("training %s with %s samples: %d samples (%s) per epoch, %d steps of %d%s",
                 type(self.model).name, self.scheme, self.sampler.n_samples, targets,
                 len(self.sampler), t.train_batch_size,
                 f" split over {self.group.world_size} processes" if self.group.active else "")
        while not p.stopped_early and p.epoch <= t.epochs:
            epoch = p.epoch
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                reset_peak_rss()
            loss = self.train_epoch(epoch)
            seconds = p.epoch_seconds
            p.train_seconds += seconds
            row = {"epoch": epoch, "loss": loss, "train_seconds": round(seconds, 3),
                   "lr": self.scheduler.get_last_lr()[0]}
            if epoch % t.eval_step == 0 or epoch == t.epochs:
                t1 = time.perf_counter()
                valid = self.evaluate("valid")
                eval_seconds = time.perf_counter() - t1
                p.eval_seconds += eval_seconds
                row.update(valid=valid, eval_seconds=round(eval_seconds, 3))
                improved = valid[key] >= p.best_score  # RecBole's rule: a tie is an improvement
                if improved:
                    p.best_score, p.best_epoch, p.best_valid = valid[key], epoch, valid
                    self.best_state = copy.deepcopy(self.model.state_dict())
                    p.bad_epochs = 0
                    if self.on_improve and self.group.is_main:
                        self.on_improve(self.model, epoch)
                else:
                    p.bad_epochs += 1
                shown = "  ".join(f"{k} {v:.4f}" for k, v in valid.items() if k.endswith("@10") or k == key)
                log.info("epoch %3d | loss %.4f | %.1f s | valid %s%s", epoch, loss, seconds, shown,
                         " | best" if improved else "")
            else:
                log.info("epoch %3d | loss %.4f | %.1f s", epoch, loss, seconds)
            row["peak_memory_bytes"] = peak_memory_bytes(self.device)
            p.history.append(row)
            if p.bad_epochs > t.stopping_step:
                p.stopped_early = True
                log.info("no better %s for %d validations: stopping; best epoch %d (%s %.4f)",
                         key, p.bad_epochs, p.best_epoch, key, p.best_score)
            if not self.group.identical_across_ranks(self.model):
                log.warning("rank %d: the model weights differ between ranks after epoch %d (a bug: "
                            "please report it)", self.group.rank, epoch)
            p.epoch, p.step, p.epoch_loss, p.epoch_seconds, p.empty_steps = epoch + 1, 0, 0.0, 0.0, 0
            p.sampler_state = self.sampler.rng_state
            self.checkpoint()
            asked = self.on_epoch(row) if self.on_epoch and self.group.is_main else None
            if not p.stopped_early and p.epoch <= t.epochs:
                # a hook's pause (a string: any other value a callback returns is ignored, as before);
                # in one process only, with no other rank to agree with
                if isinstance(asked, str) and asked and not self.group.active:
                    log.info("pausing after epoch %d: %s", epoch, asked)  # train.log says why it stopped
                    raise TimeBudgetSpent(f"{asked} after epoch {epoch}")
                if self.out_of_time():
                    raise TimeBudgetSpent(f"{self._why_paused()} after epoch {epoch}")
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return FitResult(p.best_epoch, p.best_valid, p.epoch - 1, p.stopped_early, p.train_seconds,
                         p.eval_seconds, p.history)

    def out_of_time(self) -> bool:
        """Whether the deadline has passed, decided alike on every rank (rank 0's clock rules: one
        all-reduce of a flag, so no rank stops a step before the others), or, in one process, a
        pause was asked for (``stop``: SIGTERM)."""
        if not self.group.active and stop.requested():
            return True
        if self.deadline is None:
            return False
        late = time.monotonic() >= self.deadline
        if self.group.active:
            flag = torch.tensor([float(late and self.group.is_main)], device=self.group.device)
            late = self.group.all_reduce_sum_(flag).item() > 0
        return late

    def _why_paused(self) -> str:
        if self.group.active:  # several processes pause only on the shared deadline (``out_of_time``)
            return stop.BUDGET_SPENT
        if stop.requested():
            log.warning("SIGTERM: pausing here, at a checkpoint")
        return stop.why_paused()

    def checkpoint(self) -> None:
        """Hand the current state to ``on_checkpoint`` (collective: every rank's random states)."""
        if self.on_checkpoint is None:
            return
        mine = json.dumps(checkpoint.capture_rng(self.device)).encode()
        rng = [json.loads(blob) for blob in self.group.all_gather_bytes(mine)]
        if self.group.is_main:
            self.on_checkpoint(self.state_dict(rng))

    def state_dict(self, rng: list[dict] | None = None) -> dict[str, Any]:
        """Everything a resumed run needs: weights, optimiser, schedule, loop position, early
        stopping, and the random states of every rank (this process's only if ``rng`` is None)."""
        meta = {"progress": asdict(self.progress), "world_size": self.group.world_size,
                "rng": rng if rng is not None else [checkpoint.capture_rng(self.device)],
                "config": self.config.to_dict(), "data_fingerprint": self.data.fingerprint,
                "scheme": self.scheme, "torch": torch.__version__, "segments": self.segments}
        return {"format": checkpoint.FORMAT, "meta": json.dumps(meta), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "best_model": self.best_state or {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a checkpoint of the same run and world size)."""
        meta = json.loads(state["meta"])
        if meta["world_size"] != self.group.world_size:
            raise MLSA4RecError(checkpoint.world_size_message(meta["world_size"], self.group.world_size))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best_state = state["best_model"] or None
        progress = dict(meta["progress"])
        inside = progress.pop("segments", None)  # where commit 03de733 kept them, for one hour of history
        self.progress = Progress(**progress)
        self.segments = list(meta.get("segments", inside or []))  # none in a checkpoint older than sessions
        checkpoint.restore_rng(meta["rng"][self.group.rank], self.device)
        log.info("resumed at epoch %d after step %d (%d steps done in all)", self.progress.epoch,
                 self.progress.step, self.progress.global_step)
