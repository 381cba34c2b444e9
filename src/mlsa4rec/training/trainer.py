"""The training loop: full-softmax cross-entropy, Adam, early stopping on a validation metric.

The loss of one step is the mean cross-entropy over all of its targets, whichever the scheme:
one target per sample for ``prefix``, one per real position for ``all_positions``. Logits are
taken against the real items only (the padding row of the item table is never a class).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from mlsa4rec.config import Config
from mlsa4rec.data.dataset import SequenceData
from mlsa4rec.data.sampling import Batch, TrainSampler
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation import evaluate_split
from mlsa4rec.models.base import SequentialRecommender
from mlsa4rec.training.losses import full_softmax_cross_entropy

log = logging.getLogger("mlsa4rec")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_scheme(model: SequentialRecommender, requested: str) -> str:
    scheme = model.preferred_scheme if requested == "auto" else requested
    if scheme == "all_positions" and not model.causal:
        raise MLSA4RecError(
            f"model {type(model).name!r} is not causal, so it cannot train with train_scheme=all_positions "
            "(its output at a position would see later items); use train_scheme=prefix"
        )
    return scheme


def cross_entropy(model: SequentialRecommender, batch: Batch, scheme: str, device: torch.device) -> torch.Tensor:
    """Mean full-softmax CE over the batch's targets; classes are the real items 1..N."""
    seq, lengths, targets = batch.item_seq.to(device), batch.lengths.to(device), batch.targets.to(device)
    if scheme == "prefix":
        hidden = model(seq, lengths)
    else:
        mask = targets > 0
        hidden = model.encode(seq, lengths)[mask]
        targets = targets[mask]
    return full_softmax_cross_entropy(hidden, model.item_table()[1:], targets - 1)


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


class Trainer:
    """Trains ``model`` on ``data``'s training samples, validating every ``eval_step`` epochs."""

    def __init__(self, model: SequentialRecommender, data: SequenceData, config: Config,
                 device: torch.device, on_improve: Callable[[SequentialRecommender, int], None] | None = None) -> None:
        self.model, self.data, self.config, self.device = model.to(device), data, config, device
        self.scheme = resolve_scheme(model, config["train_scheme"])
        self.sampler = TrainSampler(
            data, self.scheme, config["MAX_ITEM_LIST_LENGTH"], config["train_batch_size"], config["seed"],
            trim=model.padding_invariant, stride=config["all_positions_stride"],
        )
        if self.sampler.n_samples == 0:
            raise MLSA4RecError(f"{data.name} has no training samples after filtering; every user needs at "
                                "least 2 events (4 for a validation target); loosen user_inter_num_interval")
        if len(data.eval_targets("valid")) == 0:
            raise MLSA4RecError(f"{data.name} has no user with a validation target (users need 4+ events); "
                                "early stopping needs one: loosen the filters or use a bigger dataset")
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"],
                                          weight_decay=config["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(config["lr_scheduler"], config["epochs"] * len(self.sampler)))
        self.on_improve = on_improve

    def evaluate(self, split: str) -> dict[str, float]:
        return evaluate_split(self.model, self.data, split, self.config, self.device)

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        total, steps = 0.0, 0
        bar = tqdm(self.sampler, total=len(self.sampler), desc=f"epoch {epoch}", leave=False,
                   disable=None, dynamic_ncols=True)
        for batch in bar:
            loss = cross_entropy(self.model, batch, self.scheme, self.device)
            if not torch.isfinite(loss):
                raise MLSA4RecError(
                    f"the loss became {loss.item()} at epoch {epoch}; lower learning_rate or set clip_grad_norm"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config["clip_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config["clip_grad_norm"])
            self.optimizer.step()
            self.scheduler.step()
            total += loss.item()
            steps += 1
            bar.set_postfix(loss=f"{total / steps:.4f}", refresh=False)
        return total / max(steps, 1)

    def fit(self) -> FitResult:
        c = self.config
        key = c["valid_metric"]
        log.info("training %s with %s samples: %d samples (%d targets) per epoch, %d steps of %d",
                 type(self.model).name, self.scheme, self.sampler.n_samples, self.sampler.n_targets,
                 len(self.sampler), c["train_batch_size"])
        best_score, best_epoch, best_state, best_valid = -math.inf, 0, None, {}
        history: list[dict] = []
        train_seconds = eval_seconds = 0.0
        bad_epochs, stopped_early, epoch = 0, False, 0
        for epoch in range(1, c["epochs"] + 1):
            t0 = time.perf_counter()
            loss = self.train_epoch(epoch)
            t1 = time.perf_counter()
            train_seconds += t1 - t0
            row = {"epoch": epoch, "loss": loss, "train_seconds": round(t1 - t0, 3)}
            if epoch % c["eval_step"] == 0 or epoch == c["epochs"]:
                valid = self.evaluate("valid")
                eval_seconds += time.perf_counter() - t1
                row.update(valid=valid, eval_seconds=round(time.perf_counter() - t1, 3))
                improved = valid[key] >= best_score  # RecBole's rule: a tie is an improvement
                if improved:
                    best_score, best_epoch, best_valid = valid[key], epoch, valid
                    best_state = copy.deepcopy(self.model.state_dict())
                    bad_epochs = 0
                    if self.on_improve:
                        self.on_improve(self.model, epoch)
                else:
                    bad_epochs += 1
                shown = "  ".join(f"{k} {v:.4f}" for k, v in valid.items() if k.endswith("@10") or k == key)
                log.info("epoch %3d | loss %.4f | %.1f s | valid %s%s", epoch, loss, t1 - t0, shown,
                         " | best" if improved else "")
            else:
                log.info("epoch %3d | loss %.4f | %.1f s", epoch, loss, t1 - t0)
            history.append(row)
            if bad_epochs > c["stopping_step"]:
                stopped_early = True
                log.info("no better %s for %d validations: stopping; best epoch %d (%s %.4f)",
                         key, bad_epochs, best_epoch, key, best_score)
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return FitResult(best_epoch, best_valid, epoch, stopped_early, train_seconds, eval_seconds, history)
