"""RecBole 1.2.1 beside mlsa4rec on identical data: a parity oracle you can rerun.

Both libraries read the same RecBole atomic file, exported from our processed dataset (after our
k-core filtering), train the same model with the same settings (prefix samples, batch, learning
rate, dropout, L, seed) and report per-epoch validation curves and the best epoch's test metrics.
Not part of CI (it trains two models); the export (``mlsa4rec.interop.recbole``) is tested in
``tests/interop/``, this script's pieces in ``tests/benchmarks/``.

    # once: RecBole's own virtual environment in .venv-recbole/ (git-ignored; about 1 GB)
    python benchmarks/recbole_parity.py setup

    # the parity run: JSON + Markdown + plot in docs/results/recbole_parity.{json,md,png}
    python benchmarks/recbole_parity.py run --model sasrec --dataset amazon-beauty \\
        --data-dir ../shared/data --set epochs=50 --seeds 2020 2021

    # RecBole alone, one epoch (seconds per epoch and the data it sees), report elsewhere
    python benchmarks/recbole_parity.py run --model sasrec --dataset amazon-beauty \\
        --data-dir ../shared/data --set epochs=1 --skip-ours --out /tmp/beauty-recbole

    # a long run in parts: stop after an epoch that leaves < 1 h, rerun the same command to continue
    python benchmarks/recbole_parity.py run --model mamba4rec --dataset amazon-beauty \\
        --data-dir ../shared/data --set epochs=300 --skip-ours --time-budget 3600

    # only the export (what both libraries read), or a report redrawn from its JSON
    python benchmarks/recbole_parity.py export --dataset amazon-beauty --data-dir ../shared/data --out runs/x
    python benchmarks/recbole_parity.py report docs/results/recbole_parity.json

Settings are ours (packaged defaults < ``--config`` files < ``--set key=value``) with
``train_scheme=prefix``, ``device=cpu`` and RecBole's default ``train_batch_size=2048`` unless
``--set`` says otherwise; they are translated key by key into RecBole's config (the names are
RecBole's already). A setting RecBole cannot mirror (``lr_scheduler`` other than constant,
``exclude_history``) is refused. Models: ``sasrec``, ``gru4rec``, ``lightsans``, ``bert4rec`` (RecBole's own)
and ``mamba4rec``: RecBole has none, so ``recbole_mamba4rec.py`` restates the authors' RecBole model
file with our Mamba block in place of mamba-ssm's (CUDA-only), and RecBole's data, trainer and
evaluator drive it.

The export (``mlsa4rec.interop.recbole.export_recbole``) writes each user's events in our chronological order with
``timestamp`` = the event's position in the user's sequence (1..n), so there are no ties for
RecBole's sort to break; users appear in our user order. RecBole reads it with filtering set to
our intervals (a no-op on filtered data), ``eval_args`` LS ``valid_and_test`` with order ``TO``
(RecBole's sequential datasets refuse ``RO``), full ranking, CE loss, no negative sampling. The
run checks that RecBole's users, items, interactions and every train/valid/test sample (user,
history truncated to L, target) equal ours, by a digest of the samples in token space, and fails
if not.

A RecBole run can be stopped and continued: after every epoch the worker saves the model,
optimiser, trainer counters, best weights, random states (global, and the train loader's
shuffling generator) and curve so far in its run dir. A run killed, or paused by ``--time-budget``
or ``--pause-after`` (exit 75), continues from its last finished epoch when the same command is
run again, on any machine (threads and paths may differ; every setting must not), and ends where
an uninterrupted run ends (tested); ``--rerun`` starts it over.

RecBole runs in a subprocess of the venv's Python, through its data/model/trainer objects exactly
as ``recbole.quick_start.run_recbole`` does (including the FLOPs count, whose forward pass draws
dropout masks and so moves the random state), but without importing ``ray``. Quirks of RecBole
1.2.1 on a current stack, handled by the worker: numpy 2 lacks ``np.float_``, ``np.complex_``,
``np.unicode_`` and ``np.bool8`` (aliased before RecBole is imported), torch >= 2.6 loads
checkpoints with ``weights_only=True`` (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``), tensorboard needs
``pkg_resources`` (``setuptools<81``). RecBole's per-epoch loss is the sum of its batch losses;
the report divides it by the number of batches, which is our per-epoch loss (the mean).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Only the standard library (and common.py, which imports only it) at the top: the worker runs this
# file in RecBole's venv, where mlsa4rec is not installed; mlsa4rec is imported inside the functions
# that run in ours.
from common import REPO, command, git_commit, load_or_exit, machine, write_json, write_text

DEFAULT_VENV = REPO / ".venv-recbole"
DEFAULT_OUT = REPO / "docs" / "results" / "recbole_parity"
DEFAULT_WORK = REPO / "runs" / "recbole-parity"

# The venv recipe, installed in this order. torch first: the CPU build lies on this machine's disk,
# and a plain torch requirement would pull a CUDA build of several GB. RecBole itself goes in with
# --no-deps: its metadata asks for ray<=2.6.3, which only its hyper-parameter tuning imports.
TORCH_PIN = "torch==2.13.0"
RECBOLE_PIN = "recbole==1.2.1"
VENV_PINS = (
    "setuptools<81",             # tensorboard imports pkg_resources, which setuptools 81 removed
    "numpy==2.2.6",
    "pandas==2.3.3",             # pandas 3's copy-on-write breaks RecBole's chained in-place fillna
    "scipy==1.16.3",
    "scikit-learn==1.6.1",
    "tensorboard==2.21.0",       # torch.utils.tensorboard, imported by recbole.utils
    "colorlog==4.7.2",           # RecBole's exact pins
    "colorama==0.4.4",
    "thop==0.1.1.post2209072238",  # FLOPs count, as run_recbole does
    "texttable==1.7.0",
    "tabulate==0.9.0",
    "psutil==7.2.2",
    "tqdm==4.70.1",
    "PyYAML==6.0.3",
    "matplotlib==3.10.9",        # the plot, where the project's venv has no matplotlib
    "numba==0.68.1",             # our Mamba block's CPU scan, for mamba4rec (recbole_mamba4rec.py)
)
NUMPY_ALIASES = {"bool8": "bool_", "float_": "float64", "complex_": "complex128", "unicode_": "str_"}

RECBOLE_MODELS = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "lightsans": "LightSANs", "bert4rec": "BERT4Rec",
                  "mamba4rec": "Mamba4Rec"}
# models RecBole lacks: class name -> the module beside this script that defines it for RecBole
OUTSIDE_RECBOLE = {"Mamba4Rec": "recbole_mamba4rec"}
RECBOLE_METRICS = {"hit": "Hit", "ndcg": "NDCG", "mrr": "MRR", "recall": "Recall", "precision": "Precision"}
PARITY_DEFAULTS = {"train_batch_size": 2048, "device": "cpu"}  # RecBole's default batch of prefix samples
FORCED = {"train_scheme": "prefix"}                             # RecBole's one sample per prefix
# BERT4Rec: RecBole's masked-item task on the same prefix histories, and its prediction, which
# drops the oldest history item (recbole_eval_shift); neither is a RecBole setting
FORCED_BY_MODEL = {"bert4rec": {"train_scheme": "cloze", "recbole_eval_shift": True}}
OURS_ONLY = ("recbole_eval_shift",)
# our settings that RecBole's config takes under the same name
SHARED_KEYS = ("MAX_ITEM_LIST_LENGTH", "train_batch_size", "eval_batch_size", "learning_rate", "weight_decay",
               "epochs", "stopping_step", "eval_step", "seed", "user_inter_num_interval", "item_inter_num_interval")
SPLITS = ("train", "valid", "test")
# A RecBole run saves its whole state after every epoch, so a stopped one continues where it was
# (across sessions, or across 10-minute device commands): RESUME_FILE holds the model, optimiser,
# trainer counters, best weights, random states and curve so far; PROGRESS_FILE the curve as JSON.
RESUME_FILE, PROGRESS_FILE = "resume.pt", "progress.json"
PAUSED_EXIT = 75   # the worker stopped early on request (EX_TEMPFAIL): rerun the same command
MACHINE_KEYS = ("threads", "data_path", "checkpoint_dir")  # may differ between the parts of one resumed run

log = logging.getLogger("recbole_parity")


# --- the venv ----------------------------------------------------------------------------------
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def recipe_digest() -> str:
    return hashlib.sha256("\n".join((TORCH_PIN, *VENV_PINS, RECBOLE_PIN)).encode()).hexdigest()[:16]


def setup_venv(venv: Path = DEFAULT_VENV, python: str | None = None, force: bool = False) -> Path:
    """Create (or reuse, when its marker matches the recipe) RecBole's venv; returns its Python."""
    marker = venv / f".installed-{recipe_digest()}"
    py = venv_python(venv)
    if marker.is_file() and py.is_file() and not force:
        log.info("reusing %s", venv)
        return py
    base = python or getattr(sys, "_base_executable", None) or sys.executable
    steps = [
        [base, "-m", "venv", *(["--clear"] if venv.exists() else []), str(venv)],
        [str(py), "-m", "pip", "install", "--quiet", TORCH_PIN],
        [str(py), "-m", "pip", "install", "--quiet", *VENV_PINS],
        [str(py), "-m", "pip", "install", "--quiet", "--no-deps", RECBOLE_PIN],
        [str(py), "-c", _IMPORT_CHECK],
    ]
    for cmd in steps:
        log.info("$ %s", shlex.join(cmd))
        subprocess.run(cmd, check=True)
    marker.write_text("\n".join((TORCH_PIN, *VENV_PINS, RECBOLE_PIN)) + "\n")
    return py


_IMPORT_CHECK = (
    "import numpy as np\n"
    + "".join(f"np.{a} = getattr(np, {a!r}, np.{b})\n" for a, b in NUMPY_ALIASES.items())
    + "import recbole, recbole.config, recbole.data, recbole.trainer, recbole.utils\n"
    + "print('recbole', recbole.__version__, 'numpy', np.__version__)\n"
)


# --- the samples each library sees, as a digest in token space ---------------------------------
# These stay here rather than in mlsa4rec.interop: they exist to check this comparison, and the same
# code must run in RecBole's venv (``_recbole_samples``), which has numpy but not mlsa4rec.
def canonical_ranks(tokens: Any) -> Any:
    """Rank of each token among ``tokens`` sorted as strings: an id both libraries agree on."""
    import numpy as np

    t = np.asarray([str(x) for x in tokens], dtype=str)
    ranks = np.empty(len(t), dtype=np.int64)
    ranks[np.argsort(t, kind="stable")] = np.arange(len(t))
    return ranks


def tokens_digest(tokens: Any) -> str:
    return hashlib.sha256("\n".join(sorted(str(t) for t in tokens)).encode()).hexdigest()


def samples_digest(users: Any, targets: Any, histories: Any) -> dict[str, Any]:
    """Count and order-free SHA-256 of samples (user, target, history padded with -1 to width L),
    all as canonical ranks; the same code runs in both venvs."""
    import numpy as np

    rows = np.column_stack([np.asarray(users), np.asarray(targets), np.asarray(histories)]).astype("<i4")
    if len(rows):
        rows = rows[np.lexsort(rows.T[::-1])]
    return {"count": int(rows.shape[0]), "sha256": hashlib.sha256(rows.tobytes()).hexdigest()}


def our_data_summary(data: Any, max_len: int) -> dict[str, Any]:
    """Users, items, interactions and the digest of every split's samples of ``data``."""
    import numpy as np

    from mlsa4rec.data.sampling import gather, history_bounds

    user_rank = canonical_ranks(data.user_tokens)
    item_rank = np.concatenate([[-1], canonical_ranks(data.item_tokens[1:])])  # id 0 (padding) -> -1
    out: dict[str, Any] = {"users": data.n_users, "items": data.n_items, "interactions": data.n_interactions,
                           "user_tokens": tokens_digest(data.user_tokens),
                           "item_tokens": tokens_digest(data.item_tokens[1:]), "samples": {}}
    for split in SPLITS:
        targets = data.train_targets() if split == "train" else data.eval_targets(split)
        start, end = history_bounds(data, targets, max_len)
        hist, _ = gather(data.items, start, end, max_len)
        users = np.searchsorted(data.offsets, targets, side="right") - 1
        out["samples"][split] = samples_digest(user_rank[users], item_rank[data.items[targets]], item_rank[hist])
    return out


def data_mismatches(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    keys = ("users", "items", "interactions", "user_tokens", "item_tokens")
    bad = [f"{k}: ours {ours[k]} vs RecBole {theirs.get(k)}" for k in keys if ours[k] != theirs.get(k)]
    bad += [f"{s} samples: ours {ours['samples'][s]} vs RecBole {theirs.get('samples', {}).get(s)}"
            for s in SPLITS if ours["samples"][s] != theirs.get("samples", {}).get(s)]
    return bad


# --- settings ----------------------------------------------------------------------------------
def forced(model: str) -> dict[str, Any]:
    """The settings that make our run RecBole's: its training scheme (and BERT4Rec's prediction)."""
    return FORCED_BY_MODEL.get(model, FORCED)


def parity_config(model: str, config_files: list[str], sets: dict[str, Any], dataset: str = "parity") -> Any:
    """Our validated config for both libraries: defaults < files < PARITY_DEFAULTS < --set < FORCED."""
    from mlsa4rec.config import build_config

    if model not in RECBOLE_MODELS:
        raise SystemExit(f"error: RecBole 1.2.1 has no {model!r}; choose from {', '.join(RECBOLE_MODELS)}")
    config = build_config(model, config_files, {**PARITY_DEFAULTS, **sets, **forced(model)}, extra={"dataset": dataset})
    if config["lr_scheduler"] != "constant":
        raise SystemExit("error: RecBole keeps the learning rate constant; drop lr_scheduler")
    if config.get("similarity", "dot") != "dot":
        raise SystemExit("error: RecBole's SASRec scores by dot product; drop similarity")
    if config["exclude_history"]:
        raise SystemExit("error: RecBole's sequential evaluation ranks history items too; drop exclude_history")
    return config


def recbole_config(config: Any, name: str, data_path: Path, work_dir: Path, threads: int) -> dict[str, Any]:
    """RecBole's ``config_dict`` for our ``config`` (a mlsa4rec ``Config``) on export ``name``."""
    c = config.to_dict()
    cuda = str(c["device"]).startswith("cuda")
    metric, _, k = c["valid_metric"].partition("@")
    out = {
        "model": RECBOLE_MODELS[c["model"]],
        "dataset": name,
        "data_path": str(data_path),
        "checkpoint_dir": str(work_dir / "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "train_neg_sample_args": None,
        "loss_type": "CE",
        "metrics": [RECBOLE_METRICS[m] for m in c["metrics"]],
        "topk": list(c["topk"]),
        "valid_metric": f"{RECBOLE_METRICS[metric]}@{k}",
        "clip_grad_norm": {"max_norm": c["clip_grad_norm"]} if c["clip_grad_norm"] > 0 else None,
        "use_gpu": cuda,
        "gpu_id": (str(c["device"]).partition(":")[2] or "0") if cuda else "",
        "reproducibility": True,
        "show_progress": False,
        "log_wandb": False,
        "state": "INFO",
        "worker": 0,
        "threads": threads,  # read by our worker, not by RecBole
    }
    out.update({k: c[k] for k in SHARED_KEYS})
    out.update({k: c[k] for k in config.model_keys if k not in OURS_ONLY})
    return out


def mirrored_settings(config: Any) -> dict[str, Any]:
    """The settings both libraries run with (the rest of our config has no RecBole counterpart)."""
    keys = ("train_scheme", *SHARED_KEYS, *config.model_keys, "loss_type", "metrics", "topk", "valid_metric",
            "clip_grad_norm", "lr_scheduler", "exclude_history", "device")
    return {k: config[k] for k in keys}


# --- RecBole, in its venv ----------------------------------------------------------------------
def finished_with(spec_path: Path, out_path: Path, spec: dict[str, Any]) -> bool:
    """Whether ``out_path`` holds a finished RecBole run of exactly ``spec`` (a 5-minute epoch is worth keeping)."""
    try:
        return json.loads(spec_path.read_text()) == spec and "test" in json.loads(out_path.read_text())
    except (OSError, ValueError):
        return False


def resume_key(spec: dict[str, Any]) -> dict[str, Any]:
    """What must not change between the parts of a resumed run: every setting, not the machine's paths."""
    return {k: v for k, v in spec.items() if k not in MACHINE_KEYS}


def resumable(spec_path: Path, spec: dict[str, Any]) -> bool:
    """Whether the stopped run in ``spec_path``'s folder was started with the same settings as ``spec``."""
    try:
        return resume_key(json.loads(spec_path.read_text())) == resume_key(spec)
    except (OSError, ValueError):
        return False


class RecBolePaused(Exception):
    """The worker stopped after an epoch on request; its state is saved and the same command continues it."""

    def __init__(self, progress: dict[str, Any]) -> None:
        super().__init__(f"stopped after epoch {progress.get('epoch')}")
        self.progress = progress


def run_recbole(py: Path, spec: dict[str, Any], work_dir: Path, reuse: bool = True,
                time_budget: float | None = None, pause_after: int | None = None) -> dict[str, Any]:
    """Train and test RecBole's model per ``spec`` in a subprocess of ``py``; returns its JSON.

    A finished run of the same spec in ``work_dir`` is reused, and a stopped one (killed, or paused
    by ``time_budget`` seconds or ``pause_after`` epochs) continues from its last epoch, unless
    ``reuse`` is false. A pause raises ``RecBolePaused``.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work_dir / "spec.json", work_dir / "result.json"
    state_path, progress_path = work_dir / RESUME_FILE, work_dir / PROGRESS_FILE
    if reuse and finished_with(spec_path, out_path, spec):
        log.info("RecBole %s, seed %s: reusing the finished run in %s", spec["model"], spec["seed"], work_dir)
        return json.loads(out_path.read_text())
    if state_path.exists() and not (reuse and resumable(spec_path, spec)):
        log.info("RecBole %s, seed %s: discarding the stopped run in %s (%s)", spec["model"], spec["seed"],
                 work_dir, "--rerun" if not reuse else "other settings")
        state_path.unlink()
        progress_path.unlink(missing_ok=True)
    out_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONNOUSERSITE": "1",
           "OMP_NUM_THREADS": str(spec["threads"])}
    env.pop("PYTHONPATH", None)
    cmd = [str(py), str(Path(__file__).resolve()), "_recbole-worker", str(spec_path), str(out_path)]
    if time_budget is not None:
        cmd += ["--time-budget", str(time_budget)]
    if pause_after is not None:
        cmd += ["--pause-after", str(pause_after)]
    log.info("RecBole %s, seed %s: %s", spec["model"], spec["seed"], shlex.join(cmd))
    rc = subprocess.run(cmd, cwd=work_dir, env=env).returncode
    if rc == PAUSED_EXIT:
        raise RecBolePaused(json.loads(progress_path.read_text()))
    if rc:
        raise subprocess.CalledProcessError(rc, cmd)
    return json.loads(out_path.read_text())


def _atomic_write(path: Path, write: Any) -> None:
    """``write(tmp)`` then rename over ``path``: a kill leaves the old file or the new, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def recbole_worker(spec_path: str, out_path: str, time_budget: float | None = None,
                   pause_after: int | None = None) -> None:
    """Inside RecBole's venv: ``run_recbole`` step by step, recording every epoch.

    After every epoch the whole state goes to ``RESUME_FILE`` beside ``out_path`` (see
    ``after_epoch``), and a worker started where that file exists continues from it. It stops
    with ``PAUSED_EXIT`` after ``pause_after`` epochs, or when another epoch (and the test) would
    not fit in ``time_budget`` seconds from its start.
    """
    started = time.perf_counter()
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import random

    import numpy as np

    for alias, target in NUMPY_ALIASES.items():  # before RecBole (and tensorboard) are imported
        if not hasattr(np, alias):
            setattr(np, alias, getattr(np, target))
    import importlib

    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.data.transform import construct_transform
    from recbole.utils import get_flops, get_model, get_trainer, init_logger, init_seed

    spec = json.loads(Path(spec_path).read_text())
    key = resume_key(spec)
    torch.set_num_threads(int(spec.pop("threads")))
    model_name, dataset_name = spec.pop("model"), spec.pop("dataset")
    if model_name in OUTSIDE_RECBOLE:  # restated for RecBole beside this script; it imports from src/
        sys.path.insert(0, str(REPO / "src"))
        model_class = getattr(importlib.import_module(OUTSIDE_RECBOLE[model_name]), model_name)
    else:
        model_class = get_model(model_name)
    config = Config(model=model_class, dataset=dataset_name, config_dict=spec)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    t0 = time.perf_counter()
    dataset = create_dataset(config)
    data = {"users": dataset.user_num - 1, "items": dataset.item_num - 1, "interactions": dataset.inter_num}
    train_data, valid_data, test_data = data_preparation(config, dataset)
    data_seconds = time.perf_counter() - t0
    data.update(_recbole_samples(dataset, (train_data, valid_data, test_data), config["MAX_ITEM_LIST_LENGTH"]))

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = model_class(config, train_data._dataset).to(config["device"])
    flops = get_flops(model, dataset, config["device"], logging.getLogger(), construct_transform(config))
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    history: list[dict[str, Any]] = []
    n_batches = math.ceil(data["samples"]["train"]["count"] / config["train_batch_size"])
    train_epoch, valid_epoch = trainer._train_epoch, trainer._valid_epoch

    def timed_train(train_data, epoch_idx, *args, **kwargs):
        t = time.perf_counter()
        loss = train_epoch(train_data, epoch_idx, *args, **kwargs)
        total = float(sum(loss) if isinstance(loss, tuple) else loss)
        history.append({"epoch": epoch_idx + 1, "loss": total / n_batches, "loss_sum": total,
                        "train_seconds": round(time.perf_counter() - t, 3)})
        return loss

    def timed_valid(valid_data, *args, **kwargs):
        t = time.perf_counter()
        score, result = valid_epoch(valid_data, *args, **kwargs)
        history[-1].update(valid={k: float(v) for k, v in result.items()},
                           eval_seconds=round(time.perf_counter() - t, 3))
        return score, result

    state_path = Path(out_path).with_name(RESUME_FILE)
    progress_path = Path(out_path).with_name(PROGRESS_FILE)
    generator = train_data.generator  # the train loader's shuffling draws from it, once an epoch
    resumed_at: list[int] = []
    parts = [{"first_epoch": 1, "threads": torch.get_num_threads()}]  # one per worker that trained
    best: dict[str, Any] = {}
    if state_path.exists():
        # on the CPU: random states must stay CPU tensors; weights and moments are copied to the model's device
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["spec"] != key:
            raise SystemExit(f"error: {state_path} was saved with other settings; delete it or pass --rerun")
        model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.start_epoch = state["epoch"]  # 0-based index of the next epoch = epochs done
        trainer.cur_step, trainer.best_valid_score = state["cur_step"], state["best_valid_score"]
        trainer.best_valid_result = state["best_valid_result"]
        history[:], best, resumed_at = state["history"], state["best"], [*state["resumed_at"], state["epoch"] + 1]
        parts = [*state.get("parts", [{"first_epoch": 1, "threads": None}]),
                 {"first_epoch": state["epoch"] + 1, "threads": torch.get_num_threads()}]
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["generator"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        # RecBole's test reloads its best checkpoint from this trainer's (new) file name
        torch.save({"config": config, "epoch": best["epoch"] - 1, "cur_step": 0,
                    "best_valid_score": trainer.best_valid_score, "state_dict": best["state_dict"],
                    "other_parameter": model.other_parameter(), "optimizer": {}}, trainer.saved_model_file)
        logging.getLogger().info("resumed from %s after epoch %d", state_path, state["epoch"])

    def after_epoch(epoch_idx: int, valid_score: float) -> None:
        """RecBole's end-of-epoch callback (after early stopping's bookkeeping): save, then maybe pause."""
        if trainer.cur_step == 0:  # this epoch is the new best
            best.update(epoch=epoch_idx + 1, state_dict={k: v.detach().clone() for k, v in model.state_dict().items()})
        state = {"spec": key, "epoch": epoch_idx + 1, "cur_step": trainer.cur_step,
                 "best_valid_score": trainer.best_valid_score, "best_valid_result": trainer.best_valid_result,
                 "model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(), "best": best,
                 "history": history, "resumed_at": resumed_at, "parts": parts,
                 "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state(),
                         "numpy": np.random.get_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
        _atomic_write(state_path, lambda tmp: torch.save(state, tmp))
        progress = {"epoch": epoch_idx + 1, "best_epoch": best["epoch"], "resumed_at": resumed_at,
                    "history": history}
        _atomic_write(progress_path, lambda tmp: tmp.write_text(json.dumps(progress, indent=2)))
        finishing = trainer.cur_step > trainer.stopping_step or epoch_idx + 1 >= trainer.epochs
        last = history[-1]
        needed = last["train_seconds"] + 2 * last.get("eval_seconds", 0.0)  # one more epoch, then the test
        if not finishing and (
                (pause_after is not None and len(history) - (resumed_at[-1] - 1 if resumed_at else 0) >= pause_after)
                or (time_budget is not None and time.perf_counter() - started + needed > time_budget)):
            logging.getLogger().info("pausing after epoch %d; the same command continues the run", epoch_idx + 1)
            sys.exit(PAUSED_EXIT)

    trainer._train_epoch, trainer._valid_epoch = timed_train, timed_valid
    best_score, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False,
                                         callback_fn=after_epoch)
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    import recbole

    result = {
        "library": "recbole", "model": config["model"], "seed": config["seed"], "data": data,
        "data_seconds": round(data_seconds, 3), "flops": float(flops), "threads": torch.get_num_threads(),
        "history": history, "best_valid": {k: float(v) for k, v in (best_valid or {}).items()},
        "test": {k: float(v) for k, v in test.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {"recbole": recbole.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "resumed_at": resumed_at,  # the epochs a new worker started from saved state (empty: one go)
        "parts": parts,            # each worker's first epoch and torch threads
    }
    # a killed worker never leaves a result that looks finished
    _atomic_write(Path(out_path), lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    state_path.unlink(missing_ok=True)  # the run is finished: result.json is what is reused now


def _recbole_samples(dataset: Any, loaders: tuple, max_len: int) -> dict[str, Any]:
    """The digest of RecBole's train/valid/test samples, in the same token space as ours."""
    import numpy as np

    uid, iid = dataset.uid_field, dataset.iid_field
    user_tokens, item_tokens = dataset.field2id_token[uid], dataset.field2id_token[iid]
    user_rank = np.concatenate([[-1], canonical_ranks(user_tokens[1:])])
    item_rank = np.concatenate([[-1], canonical_ranks(item_tokens[1:])])
    out: dict[str, Any] = {"user_tokens": tokens_digest(user_tokens[1:]), "item_tokens": tokens_digest(item_tokens[1:]),
                           "samples": {}}
    for split, loader in zip(SPLITS, loaders):
        feat = loader._dataset.inter_feat
        hist = feat[iid + dataset.config["LIST_SUFFIX"]].numpy()
        if hist.shape[1] != max_len:
            raise RuntimeError(f"RecBole's {split} histories are {hist.shape[1]} wide, not L = {max_len}")
        out["samples"][split] = samples_digest(user_rank[feat[uid].numpy()], item_rank[feat[iid].numpy()],
                                               item_rank[hist])
    return out


# --- ours ---------------------------------------------------------------------------------------
def run_ours(model: str, inter: Path, config_files: list[str], sets: dict[str, Any], seed: int,
             out_dir: Path, threads: int) -> dict[str, Any]:
    """Our ``train`` on the export with the parity settings; returns the fields of the report."""
    import torch

    from mlsa4rec.training.run import train

    torch.set_num_threads(threads)
    overrides = {**PARITY_DEFAULTS, **sets, **forced(model), "seed": seed}
    log.info("mlsa4rec %s, seed %s", model, seed)
    results = train(model, str(inter), out_dir, config_files=config_files, overrides=overrides, overwrite=True)
    return _our_side(results, model, seed, results.get("run_dir"), results.get("threads", torch.get_num_threads()))


def _our_side(results: dict[str, Any], model: str, seed: int, run_dir: str | None, threads: int | None
              ) -> dict[str, Any]:
    """The report's fields of our side, from a run's ``results.json``."""
    return {
        "library": "mlsa4rec", "model": model, "seed": seed, "train_scheme": results["train_scheme"],
        "data": {k: results["dataset"][k] for k in ("users", "items", "interactions")},
        "data_seconds": results.get("data_seconds"), "threads": threads,
        "history": results["history"], "best_valid": results["valid"], "test": results["test"],
        "parameters": results.get("parameters"), "versions": results.get("versions"), "run_dir": run_dir,
    }


def recorded_ours(run_dir: Path, model: str, config: Any, data: Any) -> dict[str, Any]:
    """Our side from a finished ``mlsa4rec train`` run instead of training it again (hours of CPU are
    not thrown away), after checking it ran exactly ``config`` on exactly ``data`` (its fingerprint:
    the source file's checksum and the processing settings)."""
    import yaml

    try:
        results = json.loads((run_dir / "results.json").read_text())
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {run_dir} holds no finished run ({exc}); pass the --output-dir of a finished "
                         "`mlsa4rec train`") from None
    if results.get("model") != model:
        raise SystemExit(f"error: {run_dir} trained {results.get('model')!r}, not {model!r}")
    if results.get("data_fingerprint") != data.fingerprint:
        raise SystemExit(f"error: {run_dir} was trained on other data than {data.source}; pass a run of the same "
                         "--dataset and --data-dir")
    from mlsa4rec.config import build_config

    wanted, defaults = config.to_dict(), build_config(model).to_dict()
    # a setting added after the run was made is absent from its config.yaml: accepted at its default
    # (new settings default to the behaviour that came before them), and named in the report
    predates = sorted(k for k in wanted if k not in recorded and wanted[k] == defaults.get(k))
    differ = sorted(k for k in set(wanted) | set(recorded)
                    if k not in ("dataset", "device", *predates) and wanted.get(k) != recorded.get(k))
    if differ or results.get("device") != wanted["device"]:
        shown = [f"{k}={recorded.get(k)!r} (parity: {wanted.get(k)!r})" for k in differ]
        if results.get("device") != wanted["device"]:
            shown.append(f"device={results.get('device')!r} (parity: {wanted['device']!r})")
        raise SystemExit(f"error: {run_dir} ran other settings than this comparison: {', '.join(shown)}")
    return {**_our_side(results, model, recorded["seed"], _shown(run_dir), results.get("threads")),
            "recorded_run": {"commit": results.get("git_commit"), "started": results.get("started"),
                             "resumed": bool(results.get("resumed")), "predates": {k: wanted[k] for k in predates}}}


# --- the report ---------------------------------------------------------------------------------
def curve_summary(history: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Best epoch (a tie counts as better, as in both libraries), epochs run, seconds per epoch."""
    best, best_epoch = -math.inf, 0
    for row in history:
        if "valid" in row and row["valid"][key] >= best:
            best, best_epoch = row["valid"][key], row["epoch"]
    seconds = [row["train_seconds"] for row in history]
    return {"best_epoch": best_epoch, "epochs_run": len(history),
            "seconds_per_epoch": round(sum(seconds) / len(seconds), 3) if seconds else None}


def _shown(path: Path) -> str:
    """A path relative to the repository where it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _fmt(x: Any, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


NOTES = (
    "Both read the same exported `.inter` (timestamps = positions, so no ties) and train on the same prefix "
    "samples; the data check compares every sample (user, history truncated to L, target) by digest.",
    "RecBole rounds every metric to 4 decimals (`metric_decimal_place`) and its early stopping compares the "
    "rounded values; ours are unrounded. Both count a tie with the best score as an improvement.",
    "RecBole's epoch loss is the sum of its batch losses; the tables show it divided by the number of batches.",
    "Random streams differ (initialisation, dropout, shuffling), so equal seeds give different runs: compare "
    "curves and test metrics across seeds, not run by run.",
    "Seconds per epoch are training wall-clock on a shared 2-core machine and vary with its load.",
)


def batch_note(settings: dict[str, Any]) -> str:
    """How the two libraries' batches compare under ``bucket_batches``."""
    if settings.get("bucket_batches", True):
        return ("Batches differ: RecBole draws uniformly shuffled batches padded to L; ours, for padding-invariant "
                "models (SASRec, GRU4Rec), sorts a shuffled order by history length inside chunks of 50 batches "
                "and trims each batch to its longest history (same samples per epoch, different batch "
                "composition, far less padding); `--set bucket_batches=false` makes ours uniform too.")
    return ("Batches: both draw uniformly shuffled batches (`bucket_batches=false`); ours trims each batch to its "
            "longest history where the model ignores trailing padding, which changes no number.")


def model_notes(report: dict[str, Any]) -> list[str]:
    """What "RecBole" means in this report where RecBole has no such model."""
    if report.get("recbole_model") not in OUTSIDE_RECBOLE:
        return []
    module = OUTSIDE_RECBOLE[report["recbole_model"]]
    return [f"RecBole 1.2.1 has no {report['recbole_model']}: its column is RecBole's data, sampler, trainer and "
            f"evaluator driving `benchmarks/{module}.py`, the authors' RecBole model file restated with our Mamba "
            "block in place of mamba-ssm's (CUDA-only). It shows whether our pipeline trains the same model to "
            "the same numbers; it is not the authors' kernels."]


def provenance_notes(report: dict[str, Any]) -> list[str]:
    """Where a side was not trained in one go by this command: a recorded run of ours, a resumed RecBole."""
    notes = []
    for run in report["runs"]:
        ours, rb = run.get("ours") or {}, run.get("recbole") or {}
        if "recorded_run" in ours:
            rec = ours["recorded_run"]
            started = "its last part (--resume) started" if rec.get("resumed") else "started"
            notes.append(f"Seed {run['seed']}, ours: the finished run `{ours['run_dir']}` (commit "
                         f"`{(rec.get('commit') or '?')[:7]}`, {started} {rec.get('started')}; torch threads: "
                         f"{ours.get('threads')}), checked to have every setting of this comparison and the data's "
                         "fingerprint; this command did not train it."
                         + (" Settings added after it was made, taken at their defaults: "
                            + ", ".join(f"{k}={v!r}" for k, v in rec["predates"].items()) + "."
                            if rec.get("predates") else ""))
        if len(rb.get("parts", [])) > 1:
            ends = [p["first_epoch"] - 1 for p in rb["parts"][1:]] + [len(rb.get("history", []))]
            spans = ", ".join(f"epochs {p['first_epoch']}-{end} on {p['threads'] or 'an unrecorded number of'} "
                              "threads" for p, end in zip(rb["parts"], ends))
            notes.append(f"Seed {run['seed']}, RecBole: stopped and continued from its saved state "
                         f"({len(rb['parts'])} parts: {spans}).")
    return notes


def markdown(report: dict[str, Any]) -> str:
    key = report["settings"]["valid_metric"]
    hit = key.replace(key.split("@")[0], "hit")
    d = report["data"]
    lines = [
        f"# RecBole 1.2.1 vs mlsa4rec: {report['model']} on {report['dataset']}", "",
        "Generated by `benchmarks/recbole_parity.py` (do not edit by hand).", "",
        f"* command: `{report['command']}`",
        f"* commit: `{report['commit']}`; started {report['started']}",
        f"* machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['threads']} torch threads per library",
        f"* seeds: {', '.join(map(str, report['seeds']))}",
        f"* data: {d['users']:,} users, {d['items']:,} items, {d['interactions']:,} interactions; samples "
        + ", ".join(f"{s} {d['samples'][s]['count']:,}" for s in SPLITS),
        f"* RecBole sees the same data: **{report['data_check']}**",
        "", "## Notes", "",
        *(f"* {n}" for n in (*NOTES, *model_notes(report), batch_note(report.get("our_config", {})),
                             *provenance_notes(report))),
        "", "## Settings (both libraries)", "", "| key | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in report["settings"].items()),
    ]
    for run in report["runs"]:
        rb, ours = run.get("recbole"), run.get("ours")
        lines += ["", f"## Seed {run['seed']}", "",
                  "| | RecBole | mlsa4rec |", "|---|---|---|"]
        for label, field in (("best epoch", "best_epoch"), ("epochs run", "epochs_run"),
                             ("train s/epoch", "seconds_per_epoch")):
            lines.append(f"| {label} | {_fmt((rb or {}).get(field), 1)} | {_fmt((ours or {}).get(field), 1)} |")
        metrics = list((rb or ours)["test"])
        for m in metrics:
            a, b = (rb or {}).get("test", {}).get(m), (ours or {}).get("test", {}).get(m)
            diff = f" ({b - a:+.4f})" if a is not None and b is not None else ""
            lines.append(f"| test {m} | {_fmt(a)} | {_fmt(b)}{diff} |")
        lines += ["", f"Per epoch (loss = mean batch loss; valid {key} and {hit}; training seconds):", "",
                  f"| epoch | RecBole loss | ours loss | RecBole {key} | ours {key} | RecBole {hit} | ours {hit} "
                  "| RecBole s | ours s |", "|---|---|---|---|---|---|---|---|---|"]
        rows_rb = {r["epoch"]: r for r in (rb or {}).get("history", [])}
        rows_ours = {r["epoch"]: r for r in (ours or {}).get("history", [])}
        for e in sorted(set(rows_rb) | set(rows_ours)):
            a, b = rows_rb.get(e, {}), rows_ours.get(e, {})
            lines.append(
                f"| {e} | {_fmt(a.get('loss'))} | {_fmt(b.get('loss'))} | {_fmt(a.get('valid', {}).get(key))} "
                f"| {_fmt(b.get('valid', {}).get(key))} | {_fmt(a.get('valid', {}).get(hit))} "
                f"| {_fmt(b.get('valid', {}).get(hit))} | {_fmt(a.get('train_seconds'), 1)} "
                f"| {_fmt(b.get('train_seconds'), 1)} |")
    v = report["versions"]
    lines += ["", "Versions: " + "; ".join(f"{lib}: " + ", ".join(f"{k} {x}" for k, x in vs.items())
                                          for lib, vs in v.items() if vs), ""]
    if report.get("plot"):
        lines += [f"![validation curves]({report['plot']})", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], png: Path) -> None:
    """Loss and validation curves of both libraries, every seed (matplotlib, imported here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    key = report["settings"]["valid_metric"]
    hit = key.replace(key.split("@")[0], "hit")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in report["runs"]:
        for lib, style in (("recbole", "-"), ("ours", "--")):
            hist = (run.get(lib) or {}).get("history", [])
            if not hist:
                continue
            label = f"{'RecBole' if lib == 'recbole' else 'mlsa4rec'} seed {run['seed']}"
            ev = [r for r in hist if "valid" in r]
            axes[0].plot([r["epoch"] for r in hist], [r["loss"] for r in hist], style, marker=".", label=label)
            axes[1].plot([r["epoch"] for r in ev], [r["valid"][key] for r in ev], style, marker=".", label=label)
            axes[2].plot([r["epoch"] for r in ev], [r["valid"][hit] for r in ev], style, marker=".", label=label)
    for ax, title in zip(axes, ("training loss (mean CE per batch)", f"valid {key}", f"valid {hit}")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['model']} on {report['dataset']}: RecBole 1.2.1 (solid) vs mlsa4rec (dashed)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], stem: Path, venv: Path = DEFAULT_VENV) -> list[Path]:
    """``stem``.json, .md and .png; the plot uses RecBole's venv where this Python lacks matplotlib."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png = stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")
    report["plot"] = png.name
    write_json(json_path, report)  # first: RecBole's venv draws the plot from it
    try:
        plot(report, png)
    except ImportError:
        py = venv_python(venv)
        if not py.is_file():
            raise SystemExit("error: no matplotlib here and no RecBole venv to draw the plot with; run `setup` "
                             "or `pip install matplotlib`") from None
        subprocess.run([str(py), str(Path(__file__).resolve()), "_plot", str(json_path), str(png)], check=True)
    write_text(md_path, markdown(report))
    return [json_path, md_path, png]


# --- the command line ---------------------------------------------------------------------------
def _load(dataset: str, data_dir: str | None, config: Any) -> Any:
    return load_or_exit(dataset, data_dir, config["user_inter_num_interval"], config["item_inter_num_interval"])


def cmd_export(args: argparse.Namespace) -> None:
    from mlsa4rec.interop.recbole import export_recbole

    data = load_or_exit(args.dataset, args.data_dir, args.user_inter_num_interval, args.item_inter_num_interval)
    path = export_recbole(data, args.out, args.name)
    print(json.dumps({"file": str(path), **data.stats()}, indent=2))


def cmd_run(args: argparse.Namespace) -> None:
    import torch

    from mlsa4rec.config import parse_set
    from mlsa4rec.interop.recbole import export_recbole, import_recbole, same_sequences

    sets = parse_set(args.set)
    config = parity_config(args.model, args.config, sets)
    seeds = args.seeds or [config["seed"]]
    threads = args.threads or torch.get_num_threads()
    work = Path(args.work_dir).resolve()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()  # the code as the run starts (our side imports part of it later: keep the tree still)

    original = _load(args.dataset, args.data_dir, config)
    inter = export_recbole(original, work / "data")
    exported = import_recbole(inter, None, config["user_inter_num_interval"], config["item_inter_num_interval"],
                              use_cache=False)
    if not same_sequences(original, exported):
        raise SystemExit(f"error: {inter} read back differs from {original.source}; the export is broken")
    ours_data = our_data_summary(exported, config["MAX_ITEM_LIST_LENGTH"])
    log.info("exported %s: %d users, %d items, %d interactions", inter, ours_data["users"], ours_data["items"],
             ours_data["interactions"])

    # our recorded runs are checked before RecBole trains for hours, not after
    recorded = {seed: recorded_ours(Path(run_dir), args.model, parity_config(args.model, args.config,
                                                                              {**sets, "seed": seed}), original)
                for seed, run_dir in zip(seeds, args.ours_run or [])}
    py = setup_venv(Path(args.venv)) if not args.skip_recbole else None
    runs, problems = [], []
    for seed in seeds:
        run: dict[str, Any] = {"seed": seed}
        if py is not None:
            cfg = parity_config(args.model, args.config, {**sets, "seed": seed})
            rdir = work / f"recbole-{args.model}-seed{seed}"
            spec = recbole_config(cfg, original.name, inter.parent.parent, rdir, threads)
            try:
                run["recbole"] = run_recbole(py, spec, rdir, reuse=not args.rerun, time_budget=args.time_budget,
                                             pause_after=args.pause_after)
            except RecBolePaused as paused:
                print(f"paused: RecBole {args.model}, seed {seed}, stopped after epoch {paused.progress['epoch']} "
                      f"(best so far: epoch {paused.progress['best_epoch']}); its state is in {rdir}. "
                      "Run the same command again to continue it; the report is written when every run is done.")
                raise SystemExit(PAUSED_EXIT) from None
            problems += data_mismatches(ours_data, run["recbole"]["data"])
        if seed in recorded:
            run["ours"] = recorded[seed]
        elif not args.skip_ours:
            run["ours"] = run_ours(args.model, inter, args.config, sets, seed,
                                   work / f"ours-{args.model}-seed{seed}", threads)
        for lib in ("recbole", "ours"):
            if lib in run:
                run[lib].update(curve_summary(run[lib]["history"], config["valid_metric"]))
        runs.append(run)

    first = runs[0]
    report = {
        "benchmark": "recbole_parity", "model": args.model, "recbole_model": RECBOLE_MODELS[args.model],
        "dataset": original.name, "data_source": original.source, "export": _shown(inter),
        "data": ours_data,
        "data_check": ("identical users, items, interactions and train/valid/test samples" if not problems else
                       "MISMATCH: " + "; ".join(problems)) if py is not None else "not run (--skip-recbole)",
        "settings": {**mirrored_settings(config), "seed": seeds[0] if len(seeds) == 1 else seeds},
        "recbole_config": recbole_config(config, original.name, inter.parent.parent, work, threads),
        "our_config": {k: v for k, v in config.to_dict().items() if k != "dataset"},
        "seeds": seeds,
        "command": command(__file__),
        "commit": commit, "started": started,
        "machine": machine(threads=threads, commit=False),
        "versions": {lib: first[lib].get("versions") for lib in ("recbole", "ours") if lib in first},
        "runs": runs,
    }
    paths = write_report(report, Path(args.out), Path(args.venv))
    print("wrote " + ", ".join(map(str, paths)))
    if problems:
        raise SystemExit("error: RecBole saw other data than ours: " + "; ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("setup", help="create or reuse RecBole's venv")
    s.add_argument("--venv", default=str(DEFAULT_VENV))
    s.add_argument("--python", help="interpreter for the venv (default: this one's base)")
    s.add_argument("--force", action="store_true", help="reinstall even if the recipe marker matches")

    e = sub.add_parser("export", help="write a dataset as a RecBole atomic file OUT/NAME/NAME.inter")
    e.add_argument("--dataset", required=True)
    e.add_argument("--data-dir")
    e.add_argument("--out", required=True, help="RecBole's data_path")
    e.add_argument("--name", help="RecBole dataset name (default: ours)")
    e.add_argument("--user-inter-num-interval", default="[5,inf)")
    e.add_argument("--item-inter-num-interval", default="[5,inf)")

    r = sub.add_parser("run", help="export, train RecBole and ours, write the report")
    r.add_argument("--model", required=True, choices=sorted(RECBOLE_MODELS))
    r.add_argument("--dataset", required=True)
    r.add_argument("--data-dir")
    r.add_argument("--config", action="append", default=[], help="our YAML config (repeatable)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="setting for both (repeatable)")
    r.add_argument("--seeds", type=int, nargs="+", help="one run of each library per seed (default: the config's)")
    r.add_argument("--threads", type=int, help="torch threads of each library (default: torch's default)")
    r.add_argument("--out", default=str(DEFAULT_OUT), help="report path without suffix (.json, .md, .png)")
    r.add_argument("--work-dir", default=str(DEFAULT_WORK), help="export, logs and run dirs (git-ignored)")
    r.add_argument("--venv", default=str(DEFAULT_VENV))
    r.add_argument("--skip-ours", action="store_true")
    r.add_argument("--ours-run", nargs="+", metavar="RUN_DIR",
                   help="our side from these finished `mlsa4rec train` runs (one per seed, in --seeds order) "
                        "instead of training it; refused unless each ran exactly these settings on this data")
    r.add_argument("--skip-recbole", action="store_true")
    r.add_argument("--rerun", action="store_true",
                   help="train RecBole again even where the work dir holds a finished or stopped run of the same spec")
    r.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop RecBole after the epoch past which another epoch and the test would not fit in "
                        f"SECONDS (exit {PAUSED_EXIT}); the same command continues it")
    r.add_argument("--pause-after", type=int, metavar="EPOCHS",
                   help=f"stop RecBole after this many epochs of this invocation (exit {PAUSED_EXIT}); "
                        "the same command continues it")

    rp = sub.add_parser("report", help="redraw the Markdown and the plot from a report JSON")
    rp.add_argument("json")
    rp.add_argument("--venv", default=str(DEFAULT_VENV))

    w = sub.add_parser("_recbole-worker", help=argparse.SUPPRESS)
    w.add_argument("spec")
    w.add_argument("out")
    w.add_argument("--time-budget", type=float)
    w.add_argument("--pause-after", type=int)
    pl = sub.add_parser("_plot", help=argparse.SUPPRESS)
    pl.add_argument("json")
    pl.add_argument("png")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "_recbole-worker":
        recbole_worker(args.spec, args.out, args.time_budget, args.pause_after)
    elif args.command == "_plot":
        plot(json.loads(Path(args.json).read_text()), Path(args.png))
    elif args.command == "setup":
        print(setup_venv(Path(args.venv), args.python, args.force))
    elif args.command == "export":
        cmd_export(args)
    elif args.command == "run":
        if args.skip_ours and args.skip_recbole:
            raise SystemExit("error: --skip-ours and --skip-recbole leave nothing to run")
        if args.ours_run and args.skip_ours:
            raise SystemExit("error: --ours-run and --skip-ours contradict each other; drop one")
        if args.ours_run and len(args.ours_run) != len(args.seeds or [None]):
            raise SystemExit(f"error: --ours-run names {len(args.ours_run)} runs for {len(args.seeds or [None])} "
                             "seeds; give one run per seed of --seeds")
        for flag in ("time_budget", "pause_after"):
            value = getattr(args, flag)
            if value is not None and value <= 0:
                raise SystemExit(f"error: --{flag.replace('_', '-')} must be positive, got {value}")
        cmd_run(args)
    elif args.command == "report":
        path = Path(args.json)
        print("wrote " + ", ".join(map(str, write_report(json.loads(path.read_text()), path.with_suffix(""),
                                                           Path(args.venv)))))


if __name__ == "__main__":
    main()
