"""The training losses: the full softmax (``CE``, the protocol's), and for large catalogs a sampled
softmax and gSASRec's gBCE; ``TrainingLoss`` picks one from the run's ``loss_type``.

**CE**: full-softmax cross-entropy over the whole item table, fused with the output projection.

The plain ``F.cross_entropy(h @ W.T, t)`` materialises an N x n_items logit matrix (ML-1M: 6,400
targets x 3,416 items = 87 MB per step) and then streams it through memory four or five times
(softmax, gradient, two matmuls). On a CPU that traffic, not arithmetic, is the cost. The fused
version walks the targets in chunks whose logits stay in cache and computes the loss *and* both
gradients in one pass (as GPU "fused linear cross-entropy" kernels do), which measured 115 ms
instead of 184 ms for that step on the 2-core machine. The result is the same loss and the same
gradients up to float rounding (tested); it is used for training on CPU only.

**Sampled losses** (``sampled_softmax``, ``gBCE``): with 10^5 to 10^7 items even a chunk of CE
logits (256 x n_items) and the dense n_items x D gradient it writes per step cost gigabytes and
most of a step's time. These losses score each target against K sampled negatives instead. For
the uniform and popularity samplers one set of K negatives is drawn per step and shared by all of
its targets (logits ``hidden @ table[negatives].T``, N x K: one matmul, as in the usual large-vocabulary
sampled softmax). The draw is a pure function of the run's seed and the optimiser step
(``negative_generator``), so a run is reproducible, a resumed run draws exactly the negatives the
uninterrupted one would, and every torchrun rank draws the same ones. ``loss_memory_bytes`` estimates
what each loss holds per step, so that a run can be refused before it starts (``training.run``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlsa4rec.errors import ConfigError, MLSA4RecError


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_table = torch.zeros_like(table)
        total = hidden.new_zeros((), dtype=torch.float64)
        # one logits buffer for every chunk: a fresh 12 MB tensor per chunk (256 x 12,101) costs
        # as much in page faults as the softmax itself
        buffer = hidden.new_empty(min(chunk, n), table.shape[0])
        for lo in range(0, n, chunk):
            h, t = hidden[lo:lo + chunk], targets[lo:lo + chunk]
            rows = torch.arange(t.shape[0], device=t.device)
            logits = torch.mm(h, table.t(), out=buffer[:h.shape[0]])
            target_logit = logits[rows, t]
            # the softmax in place from amax, exp, a row sum and one division: logsumexp took longer (its
            # max with indices alone costs 10x amax, and it fills a temporary the size of the logits)
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()
            norm = probs.sum(dim=1, keepdim=True)
            lse = top.squeeze(1) + norm.squeeze(1).log()
            total += (lse - target_logit).sum(dtype=torch.float64)
            probs.div_(norm)
            probs[rows, t] -= 1.0                                  # d loss / d logits (times n)
            torch.mm(probs, table, out=grad_hidden[lo:lo + chunk])
            grad_table.addmm_(probs.t(), h)
        ctx.save_for_backward(grad_hidden, grad_table)
        ctx.n = n
        return (total / n).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_table = ctx.saved_tensors
        scale = grad_output / ctx.n
        return grad_hidden * scale, grad_table * scale, None, None


def full_softmax_cross_entropy(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                               chunk: int = 256) -> torch.Tensor:
    """Mean CE of ``hidden @ table.T`` against class ids ``targets`` (rows of ``table``)."""
    if hidden.device.type == "cpu" and torch.is_grad_enabled() and (hidden.requires_grad or table.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, table, targets, chunk)
    return F.cross_entropy(hidden @ table.t(), targets)


# --- losses for large catalogs ----------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_NEGATIVES_STREAM = 0x6E65676174697665  # "negative": keeps this stream apart from the seed's other uses


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def negative_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator that draws the negatives of optimiser step ``step`` (0-based, counted over
    the whole run) of a run seeded with ``seed``.

    Why derived and not carried: a pure function of (seed, step) needs no state in the checkpoint,
    so ``--resume`` draws the same negatives as the uninterrupted run; it does not depend on the
    rank, so every torchrun rank draws the same negatives and a distributed step is the one-process
    step; and it draws nothing from the global generators, so dropout and init are as without it.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(_splitmix64(_splitmix64(seed ^ _NEGATIVES_STREAM) ^ (step & _MASK64)))
    return g


def uniform_negatives(n_items: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` rows of the item table (0-based: item id - 1), uniform with replacement."""
    return torch.randint(0, n_items, (k,), generator=generator)


def popularity_negatives(cdf: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` rows drawn with replacement, row i with probability ``cdf[i] - cdf[i - 1]`` (``cdf``:
    float64, non-decreasing, ending at 1). Inverting the CDF costs O(k log n) per step, where
    ``torch.multinomial`` would walk all n items every step."""
    u = torch.rand(k, generator=generator, dtype=torch.float64)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)


def sampled_softmax_loss(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                         log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over targets of the softmax CE over [the target, K negatives]: for row n with target t,
    ``logsumexp([s_t, s_j - log_q_j for j in negatives, j != t]) - s_t``, s = ``hidden[n] @ table.T``.

    Why: the full softmax needs every item's logit; the softmax over the target and K sampled
    items is its standard estimate (Jean et al. 2015; Bengio & Senecal 2008). ``negatives``
    (K rows of ``table``) are shared by all N targets, so the logits are one N x K matmul. A
    negative equal to the row's own target (an *accidental hit*) would be scored as both the right
    and a wrong answer, so its logit is -inf (it drops out). ``log_q`` (K, or None) is the log of
    each negative's expected count under the sampler: subtracting it (*log-Q correction*, Yi et al.
    2019) makes ``sum_j exp(s_j - log_q_j)`` an unbiased estimate of the sum over all items, so a
    popular item is not pushed down merely for being drawn often. The target's own logit is not
    corrected. ``targets`` and ``negatives`` are 0-based rows of ``table``.
    """
    positive = (hidden * table[targets]).sum(-1)                              # N
    logits = hidden @ table[negatives].t()                                     # N x K
    if log_q is not None:
        logits = logits - log_q.to(logits.dtype)
    logits = logits.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    return (torch.logsumexp(torch.cat([positive[:, None], logits], 1), 1) - positive).mean()


def gbce_beta(n_items: int, k: int, t: float) -> float:
    """gSASRec's exponent: ``beta = alpha (t (1 - 1/alpha) + 1/alpha)`` with sampling rate
    ``alpha = k / (n_items - 1)`` (Petrov & Macdonald, RecSys 2023, as the authors' gsasrec
    repository states it); written here as the equal ``1 + t (alpha - 1)``, which needs no
    1/alpha. t = 0 gives beta = 1 (plain BCE), t = 1 gives beta = alpha (fully calibrated)."""
    if n_items < 2:
        raise MLSA4RecError(f"gBCE needs at least 2 items to draw negatives from; this data has {n_items}")
    alpha = k / (n_items - 1)
    return 1.0 + t * (alpha - 1.0)


def gbce_loss(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
              beta: float) -> torch.Tensor:
    """gSASRec's generalised binary cross-entropy (Petrov & Macdonald, "gSASRec: Reducing
    Overconfidence in Sequential Recommendation Trained with Negative Sampling", RecSys 2023):
    per target ``-log(sigmoid(s+)^beta) - sum_{j in negatives, j != target} log(1 - sigmoid(s_j))``,
    mean over targets, computed stably as ``beta softplus(-s+) + sum_j softplus(s_j)``.

    Why: BCE with K sampled negatives raises the share of positives the model sees, so its scores
    become overconfident, which gSASRec found to cost accuracy; raising the positive's sigmoid to
    the power ``beta`` (``gbce_beta``) undoes that. Negatives equal to the target (accidental hits)
    are dropped from the sum. The paper's loss also divides by K + 1 (the mean over the K + 1
    binary terms); this one is their sum, as specified for this project: a constant factor, to
    which Adam's steps are nearly invariant.
    """
    positive = (hidden * table[targets]).sum(-1)                              # N
    logits = hidden @ table[negatives].t()                                     # N x K
    keep = negatives[None, :] != targets[:, None]
    negative = torch.where(keep, F.softplus(logits), logits.new_zeros(())).sum(1)
    return (beta * F.softplus(-positive) + negative).mean()


class TrainingLoss:
    """The loss a run trains with: ``loss(hidden, table, targets, step)`` dispatches on ``loss_type``.

    ``hidden`` is N x D (one row per target of the step, whatever the training scheme), ``table``
    the n_items x D table of the real items, ``targets`` 0-based rows of it (item id - 1), ``step``
    the optimiser step (0-based, over the run) that seeds the negatives. ``counts`` (n_items, the
    item's count among the training targets) is needed by the popularity and in-batch samplers.
    """

    def __init__(self, loss_type: str, n_items: int, *, negatives: int = 1024, sampler: str = "uniform",
                 logq_correction: bool = True, gbce_t: float = 0.75, seed: int = 0,
                 counts: torch.Tensor | None = None) -> None:
        self.kind = str(loss_type).lower()
        if self.kind not in ("ce", "sampled_softmax", "gbce"):
            raise ConfigError(f"loss_type must be one of CE, sampled_softmax, gBCE; got {loss_type!r}")
        self.n_items, self.k, self.sampler, self.seed = n_items, negatives, sampler, seed
        self.logq_correction = logq_correction
        self.beta = gbce_beta(n_items, negatives, gbce_t) if self.kind == "gbce" else None
        self.log_p: torch.Tensor | None = None
        self.cdf: torch.Tensor | None = None
        if self.kind == "sampled_softmax" and sampler in ("popularity", "in_batch"):
            if counts is None or counts.numel() != n_items:
                raise ValueError(f"the {sampler} sampler needs the {n_items} items' training counts")
            counts = counts.to(torch.float64)
            if not counts.sum() > 0:
                raise MLSA4RecError(f"negative_sampler={sampler} needs training targets to count; there are none")
            # log probability of each item; an item never a target (never drawn by popularity, never
            # a target in a batch) counts as one, so that its log stays finite
            self.log_p = counts.clamp(min=1.0).log() - counts.sum().log()
            if sampler == "popularity":
                cdf = (counts / counts.sum()).cumsum(0)
                cdf[-1] = 1.0
                self.cdf = cdf

    def negatives_of(self, step: int) -> torch.Tensor:
        """The K negatives (0-based rows, CPU) of step ``step``: uniform or by popularity."""
        g = negative_generator(self.seed, step)
        if self.cdf is not None:
            return popularity_negatives(self.cdf, self.k, g)
        return uniform_negatives(self.n_items, self.k, g)

    def _log_p_on(self, device: torch.device) -> torch.Tensor:
        """The items' log probabilities on ``device``, moved there once (10^7 items: 80 MB)."""
        if self.log_p.device != device:
            self.log_p = self.log_p.to(device)
        return self.log_p

    def __call__(self, hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, step: int) -> torch.Tensor:
        if self.kind == "ce":
            return full_softmax_cross_entropy(hidden, table, targets)
        if self.kind == "sampled_softmax" and self.sampler == "in_batch":
            negatives, log_q = targets, None
            if self.logq_correction:  # expected count of item j among the step's N targets: N p_j
                log_q = math.log(targets.numel()) + self._log_p_on(targets.device)[targets]
            return sampled_softmax_loss(hidden, table, targets, negatives, log_q)
        negatives = self.negatives_of(step).to(targets.device)
        if self.kind == "gbce":
            return gbce_loss(hidden, table, targets, negatives, self.beta)
        log_q = None
        if self.logq_correction:  # expected count of each negative among the K draws: K q_j
            if self.log_p is None:
                log_q = torch.full((self.k,), math.log(self.k) - math.log(self.n_items), dtype=torch.float64,
                                   device=targets.device)
            else:
                log_q = math.log(self.k) + self._log_p_on(targets.device)[negatives]
        return sampled_softmax_loss(hidden, table, targets, negatives, log_q)


def targets_per_step(scheme: str, batch_size: int, width: int, mask_ratio: float = 0.0) -> int:
    """The most targets one step's loss takes: B (prefix), B x L (all_positions), B x the cloze cap."""
    if scheme == "all_positions":
        return batch_size * width
    if scheme == "cloze":
        return batch_size * max(1, int(mask_ratio * width))
    return batch_size


def loss_memory_bytes(loss_type: str, device_type: str, n_items: int, hidden_size: int, targets: int,
                      negatives: int = 1024, sampler: str = "uniform", chunk: int = 256) -> int:
    """Bytes (float32) the loss of one step of ``targets`` targets holds at its peak, beyond the
    model, its gradients and the batch's hidden states.

    CE on the CPU (the fused kernel): a chunk of ``chunk`` rows of logits over every item plus its
    own dense n_items x D gradient of the table. CE elsewhere (``F.cross_entropy``): logits,
    log-softmax and their gradient, three N x n_items matrices. Sampled losses: the same three
    matrices over K + 1 columns (in_batch: N + 1), and the gathered K x D negative rows with their
    gradient.
    """
    kind = str(loss_type).lower()
    if kind == "ce":
        if device_type == "cpu":
            return 4 * (min(targets, chunk) * n_items + n_items * hidden_size)
        return 4 * 3 * targets * n_items
    columns = targets if kind == "sampled_softmax" and sampler == "in_batch" else negatives
    return 4 * (3 * targets * (columns + 1) + 2 * columns * hidden_size)


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:,.1f} GiB"


def check_loss_memory(available: int | None, *, loss_type: str, device: str, n_items: int, hidden_size: int,
                      targets: int, negatives: int = 1024, sampler: str = "uniform") -> None:
    """Refuse (``ConfigError``, one line: the estimate, the memory available and the settings that
    fit) a loss whose step does not fit in ``available`` bytes when a sampled loss would; pure, so
    it is tested with made-up numbers. ``available`` None (unknown) checks nothing. When no
    smaller loss fits either, it returns: the run's overall check names what else to lower."""
    if available is None:
        return
    device_type = device.split(":")[0]
    need = loss_memory_bytes(loss_type, device_type, n_items, hidden_size, targets, negatives, sampler)
    if need <= available:
        return
    kind = str(loss_type).lower()
    in_batch = kind == "sampled_softmax" and sampler == "in_batch"
    if kind == "ce":
        what, other, most = f"the full softmax (loss_type={loss_type}) over {n_items:,} items", \
            ["loss_type=sampled_softmax"], 1024
    elif in_batch:
        what, other, most = f"loss_type={loss_type} with in-batch negatives", ["negative_sampler=uniform"], 1024
    else:
        what, other, most = f"loss_type={loss_type} with {negatives:,} negatives", [], negatives - 1
    sampled = "gbce" if kind == "gbce" else "sampled_softmax"
    # the most negatives that fit: a power of two up to 1024 (and, for a sampled loss, fewer than now)
    fit = next((k for k in (2 ** e for e in range(10, -1, -1)) if k <= most
                and loss_memory_bytes(sampled, device_type, n_items, hidden_size, targets, k) <= available), None)
    if fit is None:
        return
    fits = [*other, f"negatives={fit}"]
    raise ConfigError(f"{what} needs about {_gib(need)} per training step on {device} ({targets:,} targets per step) "
                      f"but {_gib(available)} is available; train with "
                      + " ".join(f"--set {f}" for f in fits))
