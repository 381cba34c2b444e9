"""Command line: argument parsing only; every subcommand calls the library.

    mlsa4rec data stats DATASET [--json]
    mlsa4rec train --model NAME --dataset NAME|FILE --output-dir DIR [--config F] [--set k=v]
                   [--resume] [--nproc N]          (or: torchrun --nproc-per-node N -m mlsa4rec train ...)
                   [--tracking auto|tensorboard|mlflow|none] [--tracking-uri URL]
                   (--model/--dataset may come from model:/dataset: lines of a --config file)
    mlsa4rec evaluate --run-dir DIR
    mlsa4rec recommend --run-dir DIR --history "ID ID ..." [-k 10] | --input FILE.jsonl
    mlsa4rec models
    mlsa4rec plot RUN_DIR [RUN_DIR ...] [--out PATH] [--metric METRIC@K]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlsa4rec.errors import MLSA4RecError, PeerFailed, TimeBudgetSpent
from mlsa4rec.runtime import env_rank, launched_by_torchrun

DATASET_HELP = (
    "a registered dataset (ml-1m, amazon-beauty, amazon-video-games) or a data file: .inter (RecBole "
    "atomic), ratings.dat (MovieLens), .csv (user,item[,rating],timestamp), .parquet or .txt[.gz] (one line per "
    "user: 'user item item ...', chronological, integer user and item ids only)"
)
DATA_DIR_HELP = ("folder laid out like shared/data holding the registered datasets (default: "
                 "$MLSA4REC_DATA_DIR; with neither, the official file is downloaded into the cache)")


QUIET_HELP = "only print results and errors"
EXIT_PAUSED = 75  # EX_TEMPFAIL: a run paused at its --time-budget; the same command with --resume continues


class UsageError(MLSA4RecError):
    """A command line argparse refuses: shown as one ``error:`` line like every other bad input."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser (and, through ``add_subparsers``, every subcommand's), whose errors are
    one ``error: ...`` line naming the command's ``--help`` instead of the usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (`{self.prog} --help` lists the options)")


class _RefuseToken(argparse.Action):
    """``serve --token``: refused without showing the value, so a token given there lands in no log."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} is not an option: a token on a command line is visible to every user of "
                     f"the machine (ps); put the tokens in a file given with --token-file PATH, or in ${TOKENS_ENV}")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    """-q after the command too; SUPPRESS keeps a -q given before the command when this one is absent."""
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, dest="quiet", help=QUIET_HELP)


def _add_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="a directory written by `mlsa4rec train`")


def _add_history(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--history", choices=["ranked", "excluded"],
                   help="rank the user's history items (RecBole's rule) or leave them out (HSTU's, SASRec's "
                        f"authors'); published tables differ, so compare under one rule. Default: {default}")


def _exclude_history(args: argparse.Namespace) -> bool | None:
    """``--history`` as ``exclude_history``; None keeps the runs' own rule."""
    return None if args.history is None else args.history == "excluded"


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (the run's device), cpu, cuda or cuda:N")


def _add_ranking(p: argparse.ArgumentParser) -> None:
    """``recommend`` and ``serve``: how the top k is found (exact in item chunks, or an approximate index)."""
    p.add_argument("--score-chunk", type=int, metavar="N",
                   help="items scored at once when ranking (memory: histories x N x 4 bytes; a catalog up to N is one "
                        "product, the evaluation's; default: evaluation's eval_item_chunk default)")
    p.add_argument("--ann", choices=["hnsw"],
                   help="rank through an approximate nearest-neighbour index (HNSW, usearch; needs pip install "
                        "'mlsa4rec[ann]') built over the item table at start: for catalogs of millions of items; "
                        "results are approximate (docs/serving.md)")
    p.add_argument("--ann-index", metavar="FILE",
                   help="with --ann: load the index from FILE (refused unless built from this run's item table), or "
                        "build it and save it there")
    p.add_argument("--ann-ef", type=int, metavar="N",
                   help="with --ann: the search breadth (higher: better recall, slower; default 512)")


def _ranking_options(args: argparse.Namespace) -> dict[str, Any]:
    chunk = {} if args.score_chunk is None else {"score_chunk": args.score_chunk}  # None: the Recommender's default
    return {**chunk, "ann": args.ann, "ann_index": args.ann_index, "ann_ef": args.ann_ef}


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help=DATA_DIR_HELP)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML file of settings, or a packaged preset name such as mamba4rec-ml-1m (listed by "
                        "`mlsa4rec models`); repeatable, later ones win")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one setting, value read as YAML, e.g. --set learning_rate=1e-3 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mlsa4rec",
        description="Train, evaluate and compare sequential recommenders under the RecBole protocol "
                    "(5-core, chronological leave-one-out, full ranking).",
    )
    parser.add_argument("-q", "--quiet", action="store_true", default=False, help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    stats = data_sub.add_parser("stats", help="users, items, interactions and sequence lengths after filtering",
                                description="Statistics of a dataset after k-core filtering.")
    stats.add_argument("dataset", help=DATASET_HELP)
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_data_args(stats)
    _add_quiet(data)
    _add_quiet(stats)
    stats.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="filtering and split settings, e.g. --set user_inter_num_interval='[0,inf)'; "
                            "--set split=time --set valid_time=2014-01-01 --set test_time=2014-03-01 adds each "
                            "split's targets and the cold-item targets it drops")
    dexp = data_sub.add_parser(
        "export", help="write the processed dataset (after filtering, with each event's split role) as Parquet",
        description="Write the dataset as training sees it: one row per event, user by user in time order, with "
                    "the file's user_id, item_id and timestamp (so the file is itself a data file mlsa4rec reads "
                    "back), the internal user_index and item_index, the event's position and its role under the split "
                    "(train, valid, test or context). Written to a temporary file and renamed into place.")
    dexp.add_argument("dataset", help=DATASET_HELP)
    dexp.add_argument("--out", required=True, help="the Parquet file to write (.parquet or .pq)")
    dexp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_data_args(dexp)
    _add_quiet(dexp)
    dexp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                      help="filtering and split settings, as for data stats")

    train = sub.add_parser(
        "train", help="train a model and evaluate it on valid and test",
        description="Train with early stopping on valid_metric, restore the best epoch, evaluate it on "
                    "valid and test, and write a run directory (config.yaml, results.json, "
                    "model.safetensors, train.log).",
    )
    train.add_argument("--model", help="registered model name (see `mlsa4rec models`); default: the model: line "
                                       "of a --config file")
    train.add_argument("--dataset", help=DATASET_HELP + "; default: the dataset: line of a --config file")
    train.add_argument("--output-dir", required=True, help="run directory to create")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an existing run directory (and discard an interrupted run of it)")
    train.add_argument("--resume", action="store_true",
                       help="continue the interrupted run of --output-dir from its last checkpoint (same settings)")
    train.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train with N processes on this machine (relaunches itself through torchrun; for "
                            "several machines run torchrun yourself, see the README)")
    train.add_argument("--time-budget", type=float, metavar="SECONDS",
                       help="stop after SECONDS at a checkpoint (exit 75); the same command with --resume continues, "
                            "so a long run goes in slices")
    train.add_argument("--tracking", choices=("auto", "tensorboard", "mlflow", "none"), default="auto",
                       help="where each epoch's scalars (loss, validation metrics, learning rate, seconds, peak "
                            "memory) also go while it trains: auto = TensorBoard files in RUN/tensorboard/ when "
                            "the tensorboard package is installed; mlflow = an MLflow run too; none = neither "
                            "(default: auto)")
    train.add_argument("--tracking-uri", metavar="URL",
                       help="the MLflow tracking store for --tracking mlflow (a server's http(s) URL, or a database "
                            "such as sqlite:///mlflow.db; default: MLflow's own, local in the working directory)")
    train.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_config_args(train)
    _add_data_args(train)
    _add_quiet(train)

    ev = sub.add_parser("evaluate", help="re-evaluate the saved weights of a run directory",
                        description="Rebuild the run's data and model and evaluate the saved weights.")
    _add_run_dir(ev)
    _add_history(ev, "the rule the run was trained with")
    ev.add_argument("--sampled-candidates", type=int, metavar="M",
                    help="NOT the protocol, for a quick look at a large catalog: rank each target against M sampled "
                         "negatives only (metrics named sampledM_hit@10 ...; not comparable with full ranking, "
                         "Krichene & Rendle 2020); --history excluded keeps history items out of the negatives")
    ev.add_argument("--candidate-sampler", choices=["uniform", "popularity"],
                    help="how --sampled-candidates draws: uniform over the items (default) or by training "
                         "popularity (names sampledMpop_...)")
    ev.add_argument("--candidate-seed", type=int, metavar="N",
                    help="seed of the --sampled-candidates draws (default 0)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_data_args(ev)
    _add_quiet(ev)

    cmp = sub.add_parser(
        "compare", help="paired significance of the differences between runs",
        description="Score the saved weights of each run on the same users and compare every run with the first "
                    "(the baseline): relative difference with a paired bootstrap confidence interval, and the paired "
                    "t-test p-value, also Holm-adjusted over the whole table.")
    cmp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="the baseline's run directory first, then others")
    cmp.add_argument("--metrics", nargs="+", default=["hit@10", "ndcg@10", "mrr@10"], metavar="METRIC@K")
    cmp.add_argument("--split", choices=["valid", "test"], default="test")
    cmp.add_argument("--confidence", type=float, default=0.95, help="of the bootstrap interval (default 0.95)")
    cmp.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    cmp.add_argument("--seed", type=int, default=0, help="of the bootstrap (default 0)")
    _add_history(cmp, "the rule the runs share (runs trained under different rules are refused)")
    cmp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_data_args(cmp)
    _add_quiet(cmp)

    rec = sub.add_parser(
        "recommend", help="top-k items for new histories with a trained run",
        description="Recommend with a finished run, in the data file's own item ids. One history with --history, "
                    "or many as JSON lines ({\"history\": [...], \"k\": 10}) from --input FILE or - (stdin), one "
                    "answer line each.")
    _add_run_dir(rec)
    source = rec.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", metavar="'ID ID ...'", help="one history: item ids, oldest first")
    source.add_argument("--input", metavar="FILE", help="JSON lines with a history each ('-' reads stdin)")
    rec.add_argument("-k", type=int, default=10, help="how many items (default 10; a line's \"k\" wins)")
    rec.add_argument("--exclude-seen", action="store_true", help="never recommend an item of the history")
    rec.add_argument("--unknown", choices=["error", "drop"], default="error",
                     help="an id the run never saw: an error (default) or dropped with a warning")
    rec.add_argument("--fallback", choices=["popular"], help="answer an empty history with the most popular items")
    _add_device(rec)
    _add_ranking(rec)
    rec.add_argument("--json", action="store_true", help="print JSON instead of a table (--history)")
    _add_data_args(rec)
    _add_quiet(rec)

    serve = sub.add_parser(
        "serve", help="an HTTP service over a trained run (needs the serve extra)",
        description="Serve a finished run over HTTP (FastAPI + uvicorn): POST /recommend, POST /sessions/{id}/events, "
                    "GET /sessions/{id}/recommendations, DELETE /sessions/{id}, GET /health, GET /metrics "
                    "(Prometheus); the OpenAPI docs are at /docs. Needs: pip install 'mlsa4rec[serve]'.")
    serve.add_argument("--run-dir", action="append", required=True, metavar="[NAME=]DIR",
                       help="a directory written by `mlsa4rec train`, served as /models/NAME/... (NAME: the "
                            "directory's name unless given); repeatable. One run is also served at the root "
                            "(/recommend, /sessions/...), several with --default-model")
    serve.add_argument("--default-model", metavar="NAME", help="with several --run-dir, the one the root endpoints "
                                                                "serve (default: none; each by /models/NAME/...)")
    serve.add_argument("--sessions", default="memory", metavar="memory|URL",
                       help="where live sessions are kept: in this process (memory, the default), or in Redis "
                            "(redis://HOST:PORT/DB, needs pip install 'mlsa4rec[redis]'), shared by every server "
                            "process of the run and kept across restarts")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                          "only; 0.0.0.0 listens on every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    _add_device(serve)
    serve.add_argument("--compile-step", action="store_true",
                       help="compile the streaming step of Mamba4Rec, GRU4Rec or the causal MLSA4Rec with "
                            "torch.compile (about half the cost of a session event on a CPU; seconds at start)")
    _add_ranking(serve)
    limits = serve.add_argument_group("limits, sessions and batching")
    for flag, kind, text in (
            ("--max-body-bytes", int, "a larger request body gets 413 (default 1048576)"),
            ("--max-histories", int, "histories in one /recommend request (default 256)"),
            ("--max-history-length", int, "items in one history, events request or exclude list (default 1000)"),
            ("--max-k", int, "the largest k (default 1000, and never more than the run's items)"),
            ("--max-sessions", int, "live sessions; beyond it the least recently used is dropped (default 100000)"),
            ("--session-ttl", float, "seconds; a session unused this long is dropped (default 1800)"),
            ("--batch-window-ms", float, "single-history /recommend requests that queue while the model is busy "
                                         "share one model call, which under load waits up to this many ms for "
                                         "more (a lone request never waits); 0 turns merging off (default 2)"),
            ("--max-batch", int, "histories in one shared model call (default 64)"),
            ("--max-session-bytes", int, "with --sessions redis://...: a session whose stored state would grow "
                                         "over this many bytes is refused with 413 (default 1048576)")):
        limits.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar="N", help=text)
    access = serve.add_argument_group("access (without tokens, anyone who can reach --host:--port may call it)")
    access.add_argument("--token-file", metavar="PATH",
                        help="bearer tokens, one per line (blank lines and # comments ignored): every request then "
                             "needs the header Authorization: Bearer TOKEN, except GET /health, /metrics (see "
                             f"--private-metrics) and CORS preflights. Without it, ${TOKENS_ENV} (tokens separated by "
                             "commas or spaces) when set. No flag takes a token itself: other users see command lines")
    # not options: argparse would read `--token SECRET` as `--token-file SECRET` and print SECRET in its error
    access.add_argument("--token", "--tokens", nargs="?", action=_RefuseToken, help=argparse.SUPPRESS)
    access.add_argument("--private-metrics", action="store_true", help="/metrics needs a token too (needs tokens)")
    access.add_argument("--public-docs", action="store_true",
                        help="/docs, /redoc and /openapi.json need no token (needs tokens; open anyway without them)")
    access.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="an origin (scheme://host[:port]) whose web pages may call the service from a browser; "
                             "repeatable; * for any origin (default: none, no CORS headers)")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="server processes sharing the port, each with the models loaded (needs --sessions "
                            "redis://...; default 1: one process, model calls on one thread)")
    serve.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # a worker's socket, bound by its parent
    serve.add_argument("--no-access-log", action="store_true", help="do not log every request")
    _add_data_args(serve)
    _add_quiet(serve)

    exp = sub.add_parser(
        "export", help="write a run's model as ONNX graphs with its item table (needs the onnx extra)",
        description="Export a finished run for serving without PyTorch: encoder.onnx (histories -> user vectors), "
                    "step.onnx for models that stream (one event, the state in and out), item_table.npy (scores = "
                    "user @ table.T), items.json and export.json describing them all. Each graph is checked against "
                    "the PyTorch model in onnxruntime. Needs: pip install 'mlsa4rec[onnx]'.")
    _add_run_dir(exp)
    exp.add_argument("--format", default="onnx", help="export format: onnx (the default and, for now, the only one)")
    exp.add_argument("--output", metavar="DIR", help="directory to create (default: RUN_DIR-FORMAT beside the run "
                                                     "directory; never inside it)")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace an earlier export in --output (deleting only the files it lists)")
    exp.add_argument("--opset", type=int, metavar="N", help="ONNX opset version (default: the exporter's)")
    exp.add_argument("--ann", choices=["hnsw"],
                     help="also write item_index.usearch, an approximate nearest-neighbour index over the item table "
                          "for `serve --ann hnsw --ann-index` (needs pip install 'mlsa4rec[ann]')")
    _add_quiet(exp)

    plot = sub.add_parser(
        "plot", help="training curves of finished runs, as PNG and SVG",
        description="Plot the training loss and a validation metric by epoch of one or several finished runs, one "
                    "line per run, each run's best epoch (the weights it kept) starred. Writes PATH.png and PATH.svg "
                    "and prints their paths.")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories written by `mlsa4rec train`")
    plot.add_argument("--out", default="curves", metavar="PATH",
                      help="the figure's path without suffix (or with .png or .svg): both PATH.png and PATH.svg are "
                           "written (default: curves, in the working directory)")
    plot.add_argument("--metric", metavar="METRIC@K",
                      help="the validation metric to plot, e.g. hit@10 (default: the runs' valid_metric)")
    _add_quiet(plot)

    study = sub.add_parser("study", help="run a grid of runs (models x datasets x seeds) on Optuna, see it, report it",
                           description="A study file names a grid of runs; `study run` works through its cells "
                                       "(several workers may share one --storage), `status` shows them, `report` "
                                       "makes the tables and figures. See docs/experiments.md.")
    study_sub = study.add_subparsers(dest="study_command", metavar="SUBCOMMAND", required=True)
    srun = study_sub.add_parser("run", help="train the study's cells not yet done (continues paused ones)")
    srun.add_argument("file", help="the study file (YAML)")
    srun.add_argument("--dir", help="the study directory (default: directory: in the file, else NAME beside the file)")
    srun.add_argument("--storage", help="Optuna storage URL shared by the workers (default: an SQLite file in the "
                                        "study directory); postgresql://... or mysql+pymysql://... for several "
                                        "machines")
    srun.add_argument("--time-budget", type=float, metavar="SECONDS",
                      help="pause after SECONDS at a checkpoint (exit 75); the same command continues")
    srun.add_argument("--heartbeat", type=int, default=None, metavar="SECONDS",
                      help="how often a worker says it is alive; a cell silent for 3x this is taken over "
                           "(default 60; every worker of a study must use the same)")
    srun.add_argument("--adopt", action="append", default=[], metavar="RUN_DIR|RECORD",
                      help="a finished run, or another study's record (records/.../seed-N.npz), made with a cell's "
                           "exact settings becomes that cell (repeatable)")
    srun.add_argument("--no-wait", action="store_true",
                      help="stop when no cell is waiting, instead of standing by to take over another worker's")
    srun.add_argument("--whole-cells", action="store_true",
                      help="with --time-budget: start only cells that the study's records say can finish in the "
                           "budget left, and pause one whose pace shows it cannot, for the next cell (for a "
                           "machine whose disk does not outlive the slice)")
    sstatus = study_sub.add_parser("status", help="a table of the cells: done, running, waiting, paused, failed")
    sstatus.add_argument("dir", help="the study directory")
    sstatus.add_argument("--storage", help="the storage URL, if not the one the study directory records")
    sstatus.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sreport = study_sub.add_parser("report", help="tables (Markdown + JSON) and figures from the finished cells")
    sreport.add_argument("dir", help="the study directory")
    sreport.add_argument("--baseline", help="the model every other is compared with (default: baseline: in the file)")
    sreport.add_argument("--out", help="where to write (default: DIR/report)")
    sreport.add_argument("--no-plots", action="store_true", help="tables only")
    for p in (study, srun, sstatus, sreport):
        _add_quiet(p)

    tune = sub.add_parser("tune", help="search one model's settings on one dataset (Optuna TPE, pruning)",
                          description="Trials are run directories in --dir; the best settings are written as a "
                                      "preset (DIR/best.yaml) that --config takes. See docs/experiments.md.")
    tune.add_argument("--model", required=True, help="registered model name")
    tune.add_argument("--dataset", required=True, help=DATASET_HELP)
    tune.add_argument("--space", required=True, metavar="FILE", help="the search space (YAML: key: {type: log | "
                                                                     "float | int | choice, ...})")
    tune.add_argument("--trials", type=int, required=True, metavar="N", help="trials to finish (complete or pruned)")
    tune.add_argument("--dir", required=True, help="the tuning directory (trials, storage, best.yaml, figures)")
    tune.add_argument("--storage", help="Optuna storage URL shared by several workers (default: an SQLite file in "
                                        "--dir)")
    tune.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"),
                      help="stop trials whose validation curve falls behind (default: median)")
    tune.add_argument("--seed", type=int, default=None,
                      help="the sampler's seed: makes one worker's search reproducible (default: random, so that "
                           "several workers draw different settings)")
    tune.add_argument("--time-budget", type=float, metavar="SECONDS",
                      help="pause after SECONDS at a checkpoint (exit 75); the same command continues")
    _add_config_args(tune)
    _add_data_args(tune)
    _add_quiet(tune)

    models = sub.add_parser("models", help="list registered models",
                            description="Registered models, their flags and default hyperparameters.")
    models.add_argument("--config", metavar="MODEL", help="print every setting of one model with its default and help")
    models.add_argument("--params", action="store_true",
                        help="parameter counts of every model and packaged preset (variants, ablations)")
    models.add_argument("--n-items", type=int, default=12101, metavar="N",
                        help="items in the embedding table for --params (default: amazon-beauty's 12101)")
    _add_quiet(models)
    return parser


def _data_for_command(args: argparse.Namespace) -> Any:  # a SequenceData (imported late: the CLI starts fast)
    """The dataset a ``data`` subcommand names, filtered and split by its --set settings."""
    from mlsa4rec.config import parse_interval, parse_set
    from mlsa4rec.data import DEFAULT_INTERVAL, DUPLICATE_RULES, load_dataset, split_of
    from mlsa4rec.errors import check_choice
    from mlsa4rec.settings import TrainConfig

    filters = {"user_inter_num_interval": DEFAULT_INTERVAL, "item_inter_num_interval": DEFAULT_INTERVAL,
               "duplicate_events": "drop"}
    split = {"split": "leave_one_out", "valid_time": None, "test_time": None}
    for key, value in parse_set(args.overrides).items():
        if key in split:
            split[key] = value
            continue
        if key not in filters:
            raise MLSA4RecError(f"data {args.data_command} accepts only {', '.join([*filters, *split])} in --set, "
                                f"not {key!r}")
        if key == "duplicate_events":
            check_choice("--set duplicate_events", value, DUPLICATE_RULES, MLSA4RecError)
        else:
            parse_interval(value, key)
        filters[key] = str(value)
    rule = split_of(TrainConfig(**split))  # checked as a run's settings are
    return load_dataset(args.dataset, args.data_dir, **filters, split=rule)


def _cmd_data_stats(args: argparse.Namespace) -> int:
    stats = _data_for_command(args).stats()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for key, value in stats.items():
            print(f"{key:>14}  {value:,}" if isinstance(value, int) else f"{key:>14}  {value}")
    return 0


def _cmd_data_export(args: argparse.Namespace) -> int:
    from mlsa4rec.data.export import write_parquet

    out = Path(args.out)
    if out.is_dir():
        raise MLSA4RecError(f"--out {str(out)!r} is a directory; name a file in it")
    if out.suffix.lower() not in (".parquet", ".pq"):
        raise MLSA4RecError(f"--out {str(out)!r} must end in .parquet or .pq")
    if out.exists() and not args.overwrite:
        raise MLSA4RecError(f"--out {str(out)!r} already exists; pass --overwrite to replace it or choose another")
    data = _data_for_command(args)  # checked before anything is written
    write_parquet(data, out)
    logging.getLogger("mlsa4rec").info("wrote %s: %s events of %s users, %s items (%s)", out,
                                       f"{data.n_interactions:,}", f"{data.n_users:,}", f"{data.n_items:,}",
                                       data.split.describe())
    return 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` minus ``--nproc N`` / ``--nproc=N`` (and argparse's abbreviations of it)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name, eq, _ = token.partition("=")
        if len(name) > 3 and "--nproc".startswith(name):
            skip = not eq
            continue
        out.append(token)
    return out


def _launch(args: argparse.Namespace) -> int:
    """Check the input here, then run the same command under torchrun with ``--nproc`` ranks.

    torchrun's agent runs in this process (``torch.distributed.run.run``, exactly what the
    ``torchrun`` script calls) and starts the ranks as subprocesses. Calling it here rather than
    spawning ``torchrun`` lets a failure end as the rank's one ``error:`` line and exit code 2
    instead of torchrun's ChildFailedError traceback.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from mlsa4rec.config import parse_set
    from mlsa4rec.training.run import preflight

    preflight(args.model, args.dataset, args.output_dir, args.config, parse_set(args.overrides), args.data_dir,
              args.overwrite, args.resume, world_size=args.nproc, tracking=args.tracking,
              tracking_uri=args.tracking_uri)
    launch = ["--standalone", "--nproc-per-node", str(args.nproc), "-m", "mlsa4rec", *_without_nproc(args.argv)]
    logging.getLogger("mlsa4rec").info("launching %d processes: torchrun %s", args.nproc, " ".join(launch))
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None:  # share the cores (torchrun alone would give every rank 1 thread)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
    elastic = logging.getLogger("torch.distributed.elastic")
    old_level = elastic.level
    elastic.setLevel(logging.CRITICAL)  # the ranks print their own `error:` line or traceback
    try:
        run(get_args_parser().parse_args(launch))
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        if exc.get_first_failure()[1].exitcode == EXIT_PAUSED:  # the others may be stopped by the agent after
            return EXIT_PAUSED  # rank 0 said where the checkpoint is
        return 2 if codes == {2} else 1  # 2: the ranks printed their `error:` line
    except SignalException:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        elastic.setLevel(old_level)
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mlsa4rec.config import parse_set, run_facts
    from mlsa4rec.evaluation.runs import format_table
    from mlsa4rec.training.run import train

    if args.model is None or args.dataset is None:  # a finished run's config.yaml names both
        facts = run_facts(args.config, parse_set(args.overrides))
        args.model = args.model or facts.get("model")
        args.dataset = args.dataset or facts.get("dataset")
        for flag in ("model", "dataset"):
            if getattr(args, flag) is None:
                raise MLSA4RecError(f"--{flag} is required (or a {flag}: line in a --config file)")
    if args.nproc < 1:
        raise MLSA4RecError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1:
        if launched_by_torchrun():
            raise MLSA4RecError("--nproc launches torchrun itself; under torchrun leave it out and use "
                                "--nproc-per-node / --nnodes")
        return _launch(args)
    results = train(args.model, args.dataset, args.output_dir, args.config, parse_set(args.overrides),
                    args.data_dir, args.overwrite, args.resume, time_budget_s=args.time_budget,
                    tracking=args.tracking, tracking_uri=args.tracking_uri)
    if env_rank() != 0:
        return 0  # rank 0 prints the results
    if args.json:
        print(json.dumps({k: results[k] for k in ("model", "valid", "test", "best_epoch", "epochs_run",
                                                  "seconds_per_epoch")}, indent=2))
    else:
        print(f"{args.model} on {results['dataset']['dataset']}: best epoch {results['best_epoch']} of "
              f"{results['epochs_run']}, {results['seconds_per_epoch']:.1f} s/epoch")
        print(format_table(results))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mlsa4rec.evaluation.runs import evaluate_run, format_table

    if args.sampled_candidates is not None:
        return _evaluate_sampled(args)
    if args.candidate_sampler is not None or args.candidate_seed is not None:
        raise MLSA4RecError("--candidate-sampler and --candidate-seed only go with --sampled-candidates M")
    results = evaluate_run(args.run_dir, args.data_dir, exclude_history=_exclude_history(args))
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


def _evaluate_sampled(args: argparse.Namespace) -> int:
    """``evaluate --sampled-candidates M``: sampled metrics, named and printed as NOT the protocol."""
    from mlsa4rec.evaluation.evaluator import SAMPLED_WARNING, evaluate_sampled, sampled_label
    from mlsa4rec.evaluation.runs import format_table
    from mlsa4rec.runs.loading import load_run

    n, sampler, seed = args.sampled_candidates, args.candidate_sampler or "uniform", args.candidate_seed or 0
    if n < 1:
        raise MLSA4RecError(f"--sampled-candidates must be a positive number of negatives, got {n}")
    run = load_run(args.run_dir, args.data_dir)
    exclude = _exclude_history(args)
    settings = run.config.train if exclude is None else run.config.with_train(exclude_history=exclude).train
    warning = SAMPLED_WARNING.format(label=sampled_label(n, sampler), n=n, sampler=sampler)
    results = {"model": run.config.model, "dataset": run.config.dataset, "exclude_history": settings.exclude_history,
               "protocol": "sampled candidates (not the full-ranking protocol)", "sampled_candidates": n,
               "candidate_sampler": sampler, "candidate_seed": seed, "warning": warning,
               **{split: evaluate_sampled(run.model, run.data, split, settings, n, sampler, seed, run.device)
                  for split in ("valid", "test")}}
    print(json.dumps(results, indent=2) if args.json else f"WARNING: {warning}\n{format_table(results)}")
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from mlsa4rec.serving.recommender import Recommender, option_style

    with option_style("cli"):  # messages name the flags: --unknown drop, -k, --fallback popular
        rec = Recommender.from_run(args.run_dir, device=args.device, data_dir=args.data_dir, **_ranking_options(args))
        options = {"exclude_seen": args.exclude_seen, "unknown": args.unknown, "fallback": args.fallback}
        if args.history is not None:
            history = args.history.split()
            if not history and args.fallback != "popular":
                raise MLSA4RecError("--history is empty; give at least one item id ('ID ID ...'), or use "
                                    "--fallback popular")
            (answer,) = rec.recommend([history], args.k, **options)
            if args.json:  # the shape of an --input answer line
                print(json.dumps({"recommendations": [r._asdict() for r in answer]}))
            else:
                for rank, r in enumerate(answer, 1):
                    print(f"{rank:>4}  {r.item!s:<20} {r.score:.4f}")
            return 0
        from mlsa4rec.serving.batch import recommend_lines

        stdin = getattr(sys.stdin, "buffer", sys.stdin)  # bytes: a line that is not UTF-8 fails alone
        stream = stdin if args.input == "-" else _open_input(args.input)
        try:
            failed, total = recommend_lines(rec, stream, sys.stdout, args.k, **options)
        finally:
            if stream is not stdin:
                stream.close()
    if failed:
        raise MLSA4RecError(f"{failed} of {total} input lines failed; their answers hold an \"error\" field "
                            "naming the problem")
    if not total:
        logging.getLogger("mlsa4rec").warning("--input %s holds no requests (it is empty or every line is blank)",
                                              "- (stdin)" if args.input == "-" else repr(args.input))
    return 0


def _open_input(path: str):
    """``--input`` in binary mode: each line is decoded on its own, so bad bytes fail that line only."""
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise MLSA4RecError(f"cannot read --input {path!r}: {exc.strerror}") from None


TOKENS_ENV = "MLSA4REC_TOKENS"
MAKE_TOKENS = "umask 077; python -c 'import secrets; print(secrets.token_urlsafe(32))' > "  # and the file
SERVE_LIMITS = {"max_body_bytes": "max_body_bytes", "max_histories": "max_histories",
                "max_history_length": "max_history_length", "max_k": "max_k", "max_sessions": "max_sessions",
                "session_ttl": "session_ttl_s", "batch_window_ms": "batch_window_ms", "max_batch": "max_batch",
                "max_session_bytes": "max_session_bytes"}
SERVED_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")  # a model's name in /models/NAME/...


def _served_runs(values: list[str]) -> dict[str, str]:
    """``--run-dir [NAME=]DIR`` flags as {name: directory}; a name defaults to the directory's."""
    runs: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not SERVED_NAME.fullmatch(name) or os.path.isdir(value):  # a directory whose name has '='
            directory = value
            name = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(os.path.normpath(value)))[:64].strip(".")
            name = name or "model"
        if not directory:
            raise MLSA4RecError(f"--run-dir {value!r}: name the run directory after '=' (--run-dir NAME=DIR)")
        if name in runs:
            raise MLSA4RecError(f"two --run-dir flags serve the name {name!r}; name them: --run-dir A=DIR "
                                "--run-dir B=OTHER_DIR")
        runs[name] = directory
    return runs


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from mlsa4rec.serving import http as serving_http
        from mlsa4rec.serving.http import create_app, listen, origin_problem
        from mlsa4rec.serving.middleware import is_token
    except ImportError as exc:
        raise MLSA4RecError(f"mlsa4rec serve needs the serve extra ({exc.name} is missing): pip install "
                            "'mlsa4rec[serve]'") from None
    import signal

    from mlsa4rec.serving.recommender import Recommender, option_style

    if not 0 <= args.port <= 65535:
        raise MLSA4RecError(f"--port must be from 0 to 65535, got {args.port}")
    access = _serve_access(args, origin_problem, is_token)  # before the model loads: a bad flag fails at once
    runs = _served_runs(args.run_dir)
    if args.default_model is not None and args.default_model not in runs:
        raise MLSA4RecError(f"--default-model {args.default_model!r} is not one of the models served "
                            f"({', '.join(runs)}); name one of them")
    if args.ann_index is not None and len(runs) > 1:
        raise MLSA4RecError("--ann-index names one index file, for one run; with several --run-dir leave it out "
                            "(each run builds its own index at start)")
    if args.sessions != "memory":
        from mlsa4rec.serving.redis_sessions import check_url

        check_url(args.sessions)

    def loader(directory: str) -> Callable[[], Recommender]:
        def load() -> Recommender:
            with option_style("cli"):  # a bad --score-chunk, --ann without usearch: named as flags
                rec = Recommender.from_run(directory, device=args.device, data_dir=args.data_dir,
                                           **_ranking_options(args))
            if args.compile_step:
                rec.compile_step()
            return rec
        return load

    if args.workers < 1:
        raise MLSA4RecError(f"--workers must be at least 1, got {args.workers}")
    if args.workers > 1 and args.sessions == "memory":
        raise MLSA4RecError(f"--workers {args.workers} needs --sessions redis://HOST:PORT/DB: sessions kept in one "
                            "process's memory are not seen by the others")
    if args.workers > 1 and args.listen_fd is None:  # a worker itself (--listen-fd) serves
        return _serve_workers(args, listen)
    loaders = {name: loader(directory) for name, directory in runs.items()}
    served = {name: load() for name, load in loaders.items()}
    with option_style("cli"):  # a bad limit is named as its flag: --max-k
        app = create_app(served, **{name: getattr(args, flag) for flag, name in SERVE_LIMITS.items()
                                    if hasattr(args, flag)}, **access, sessions=args.sessions,
                         default_model=args.default_model, loaders=loaders)
    if args.listen_fd is not None:  # a worker of `serve --workers N`: the socket its parent bound
        import socket

        sock = socket.socket(fileno=args.listen_fd)
    else:
        sock = _bound(listen, args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    shown = ", ".join(f"{name} ({rec.config.model}, {runs[name]})" for name, rec in served.items())
    print(f"serving {shown} on http://{host}:{port} (docs: http://{host}:{port}/docs; sessions: "
          f"{app.state.session_store})", flush=True)
    _log_access(app.state.access, args.token_file or TOKENS_ENV, host, port)
    quiet = getattr(args, "quiet", False)
    # SIGTERM: stop accepting, answer what is in flight (for at most SHUTDOWN_GRACE_S), shut the app down
    config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not args.no_access_log,
                            lifespan="on", timeout_graceful_shutdown=serving_http.SHUTDOWN_GRACE_S)

    def terminated(signum, frame):  # uvicorn raises SIGTERM again once it has shut down: exit 0 then
        raise SystemExit(0)

    try:
        restore = (signal.signal(signal.SIGTERM, terminated),)
    except ValueError:  # not the main thread: uvicorn installs no handlers there either
        restore = ()
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        for handler in restore:
            signal.signal(signal.SIGTERM, handler)
    return 0


def _bound(listen: Callable[[str, int], Any], host: str, port: int) -> Any:
    """The listening socket, bound here so that a taken port is one error line rather than uvicorn's exit."""
    try:
        return listen(host, port)
    except (OSError, OverflowError) as exc:
        raise MLSA4RecError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None


def _serve_workers(args: argparse.Namespace, listen: Callable[[str, int], Any]) -> int:
    """``serve --workers N``: bind the socket here, then run N ``serve`` processes that accept on it
    (each with the models loaded, all keeping their sessions in one Redis); SIGTERM and Ctrl-C go to
    all of them. One that exits on its own stops the others: this is not a process supervisor
    (run it under one: systemd, Kubernetes)."""
    import signal
    import subprocess

    sock = _bound(listen, args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    argv = [*args.argv, "--port", str(port), "--workers", "1", "--listen-fd", str(sock.fileno())]  # last wins
    children = [subprocess.Popen([sys.executable, "-m", "mlsa4rec", *argv], pass_fds=(sock.fileno(),))
                for _ in range(args.workers)]
    print(f"serving with {args.workers} worker processes (pids {', '.join(str(c.pid) for c in children)}) on "
          f"http://{host}:{port}", flush=True)

    def forward(signum, frame):  # as SIGTERM: a graceful stop (a Ctrl-C also reached them from the terminal)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    restore = [(sig, signal.signal(sig, forward)) for sig in (signal.SIGTERM, signal.SIGINT)]
    try:
        while True:
            codes = [child.poll() for child in children]
            if all(code is not None for code in codes):
                break
            ended = next((c for c in codes if c is not None), None)
            if ended is not None:  # one stopped: the others follow
                forward(signal.SIGTERM, None)
                for child in children:
                    child.wait()
                break
            time.sleep(0.2)
    finally:
        for sig, handler in restore:
            signal.signal(sig, handler)
        sock.close()
    codes = [child.returncode for child in children]
    failed = [c for c in codes if c not in (0, 130, -signal.SIGTERM)]
    return failed[0] if failed and failed[0] > 0 else (1 if failed else 0)  # a worker's own code (2: its error line)


def _serve_access(args: argparse.Namespace, origin_problem: Callable[[object], str | None],
                  is_token: Callable[[str], bool]) -> dict[str, Any]:
    """create_app's access settings from the flags, the token file or $MLSA4REC_TOKENS; a bad one is
    one error line (never showing a token). The two checks come from the serving package, which is
    imported only once the serve extra is known to be there."""
    for origin in args.cors_origin:
        problem = origin_problem(origin)
        if problem:
            raise MLSA4RecError(f"--cors-origin: {problem}")
    if args.token_file is not None:
        tokens = _read_token_file(args.token_file, is_token)
    else:
        value = os.environ.get(TOKENS_ENV, "")
        tokens = [token for token in re.split(r"[,\s]+", value) if token]
        if value and not tokens:
            raise MLSA4RecError(f"${TOKENS_ENV} holds no token, only commas or spaces; set it to tokens separated by "
                                "commas or spaces, or unset it to serve without tokens")
        for i, token in enumerate(tokens, 1):
            if not is_token(token):
                raise MLSA4RecError(f"${TOKENS_ENV}: its token {i} is not one word of visible ASCII characters; "
                                    f"make tokens with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        if TOKENS_ENV in os.environ and not value:
            logging.getLogger("mlsa4rec").warning("$%s is set but empty: the server needs no token", TOKENS_ENV)
    if not tokens:
        for given, name in ((args.private_metrics, "--private-metrics"), (args.public_docs, "--public-docs")):
            if given:
                raise MLSA4RecError(f"{name} only makes sense with tokens: give --token-file PATH (one token per "
                                    f"line) or set ${TOKENS_ENV}, or leave {name} out")
    return {"tokens": tokens, "metrics_public": not args.private_metrics, "docs_public": args.public_docs,
            "cors_origins": args.cors_origin}


def _read_token_file(path: str, is_token: Callable[[str], bool]) -> list[str]:
    """The tokens of ``--token-file``: one a line, blank lines and ``#`` comments skipped."""
    where, fix = f"--token-file {path}", f"write one token per line, e.g. with: {MAKE_TOKENS}{shlex.quote(path)}"
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise MLSA4RecError(f"{where} does not exist; {fix}") from None
    except IsADirectoryError:
        raise MLSA4RecError(f"{where} is a directory; give the file of tokens (one per line) inside it") from None
    except PermissionError:
        raise MLSA4RecError(f"cannot read {where}: permission denied; let the user running the server read it "
                            f"(as its owner: chmod 600 {path})") from None
    except OSError as exc:
        raise MLSA4RecError(f"cannot read {where}: {exc.strerror or exc}; {fix}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MLSA4RecError(f"{where} is not UTF-8 text (byte {exc.start} is not); {fix}") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not is_token(token):  # never shown: it may be a real token with a typo
            raise MLSA4RecError(f"{where}, line {number}: a token is one word of visible ASCII characters (no spaces "
                                f"inside; a comment line starts with #); {fix}")
        tokens.append(token)
    if not tokens:
        raise MLSA4RecError(f"{where} holds no token (only blank lines or # comments); {fix}")
    with contextlib.suppress(OSError):
        if os.name == "posix" and os.stat(path).st_mode & 0o004:
            logging.getLogger("mlsa4rec").warning("--token-file %s can be read by every user of this machine; "
                                                  "chmod 600 it", path)
    return tokens


def _log_access(access: dict[str, Any], source: str, host: str, port: int) -> None:
    """One line saying who may call the server (and never a token); a warning when it is open
    beyond this machine."""
    count, level = access["tokens"], logging.INFO
    if count:
        shown = {True: "open", False: "closed"}
        line = (f"access: {count} token{'s' if count != 1 else ''} from {source}; /health open, "
                f"/metrics {shown[access['metrics_public']]}, docs {shown[access['docs_public']]}")
    else:
        line = f"access: open to anyone who can reach {host}:{port} (no --token-file or {TOKENS_ENV})"
        if host.strip("[]") not in ("127.0.0.1", "::1", "localhost"):
            level = logging.WARNING
    if access["cors_origins"]:
        line += f"; CORS for {', '.join(access['cors_origins'])}"
    logging.getLogger("mlsa4rec").log(level, line)


def _cmd_export(args: argparse.Namespace) -> int:
    from mlsa4rec.serving.export import default_output, export_run

    output = args.output or default_output(args.run_dir, args.format)
    for path in export_run(args.run_dir, output, format=args.format, opset=args.opset, overwrite=args.overwrite,
                           ann=args.ann):
        print(path)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mlsa4rec.evaluation.runs import compare_runs, format_comparison

    if args.resamples < 100:
        raise MLSA4RecError(f"--resamples must be at least 100, got {args.resamples}")
    result = compare_runs(args.run_dirs, args.split, tuple(args.metrics), args.data_dir, args.confidence,
                          args.resamples, args.seed, exclude_history=_exclude_history(args))
    print(json.dumps(result, indent=2) if args.json else format_comparison(result))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from mlsa4rec.experiments.plots import plot_curves

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache notes are not the command's output
    for path in plot_curves(args.run_dirs, args.out, metric=args.metric):
        print(path)
    return 0


def _model_configurations() -> list[tuple[str, str, object]]:
    """(label, model name, config) of every registered model's defaults and every packaged preset."""
    from mlsa4rec.config import build_config, presets
    from mlsa4rec.models import available

    configs = [(name, name, build_config(name)) for name in available()]
    for preset in presets():
        owners = [m for m in available() if preset.startswith(m + "-")]
        if owners:
            model = max(owners, key=len)
            configs.append((f"{model} --config {preset}", model, build_config(model, files=[preset])))
    return configs


def _describe(model) -> str:
    flags = [f for f, on in (("causal", model.causal), ("padding-invariant", model.padding_invariant)) if on]
    return f"{', '.join(flags) or 'non-causal'}; trains with {model.preferred_scheme}"


def _cmd_models(args: argparse.Namespace) -> int:
    from mlsa4rec.config import known_keys, model_hyperparameters, presets, setting_help
    from mlsa4rec.models import available, build_model, get_class

    if args.config:  # a YAML file of every setting, each with its help as a comment
        get_class(args.config)
        help_lines = setting_help(args.config)
        lines = [(f"{key}: {json.dumps(value)}", help_lines.get(key, ""))
                 for key, value in known_keys(args.config).items()]
        width = max(len(line) for line, _ in lines)
        for line, comment in lines:
            print(f"{line:<{width}}  # {comment}" if comment else line)
        return 0
    if args.params:
        if args.n_items < 1:
            raise MLSA4RecError(f"--n-items must be >= 1, got {args.n_items}")
        configurations = _model_configurations()
        width = max(len(label) for label, _, _ in configurations)
        print(f"{'configuration':<{width}} {'non-embedding':>13} {'total':>10}  flags (embedding table: "
              f"{args.n_items} items)")
        for label, name, config in configurations:
            model = build_model(get_class(name), args.n_items, config.model_kwargs(), config.train.max_seq_length)
            print(f"{label:<{width}} {model.num_parameters(exclude_embeddings=True):>13,} "
                  f"{model.num_parameters():>10,}  {_describe(model)}")
        return 0
    for name in available():
        params = " ".join(f"{k}={v}" for k, v in model_hyperparameters(name).items())
        print(f"{name:<12} [{_describe(_default_model(name))}]  {params}")
    print(f"\npresets (--config NAME): {', '.join(presets())}")
    return 0


def _default_model(name: str):
    from mlsa4rec.models import create

    return create(name, 10)


def _cmd_tune(args: argparse.Namespace) -> int:
    from mlsa4rec.config import parse_set
    from mlsa4rec.experiments.tune import tune

    best = tune(args.model, args.dataset, args.space, args.trials, args.dir, config_files=args.config,
                overrides=parse_set(args.overrides), data_dir=args.data_dir, storage=args.storage, pruner=args.pruner,
                seed=args.seed, time_budget_s=args.time_budget)
    if best is None:
        from mlsa4rec.training.stop import why_paused

        print(f"paused: {why_paused()}; run the same command again to continue", file=sys.stderr)
        return EXIT_PAUSED
    print(f"best: trial {best['trial']}, valid {best['value']:.4f}, {best['params']}; preset {best['preset']}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    if args.study_command == "run":
        from mlsa4rec.experiments.study import HEARTBEAT_S, run_study

        if args.heartbeat is not None and args.heartbeat < 1:
            raise MLSA4RecError(f"--heartbeat must be at least 1 second, got {args.heartbeat}")
        paused = run_study(args.file, storage=args.storage, directory_override=args.dir,
                           time_budget_s=args.time_budget, heartbeat_s=args.heartbeat or HEARTBEAT_S,
                           wait=not args.no_wait, adopt_runs=args.adopt, whole_cells=args.whole_cells)
        if paused:
            print(f"paused: {paused}; run the same command again to continue", file=sys.stderr)
            return EXIT_PAUSED
        return 0
    if args.study_command == "status":
        from mlsa4rec.experiments.study import format_status, study_status

        rows = study_status(args.dir, args.storage)
        print(json.dumps(rows, indent=2) if args.json else format_status(rows))
        return 0
    from mlsa4rec.experiments.report import write_report

    for path in write_report(args.dir, args.out, args.baseline, plots=not args.no_plots):
        print(path)
    return 0


COMMANDS = {"train": _cmd_train, "evaluate": _cmd_evaluate, "compare": _cmd_compare, "recommend": _cmd_recommend,
            "serve": _cmd_serve, "models": _cmd_models, "export": _cmd_export, "plot": _cmd_plot,
            "study": _cmd_study, "tune": _cmd_tune}


# what a person can do about an operating-system error met on a file or stream; an errno not
# listed here is a bug, and keeps its traceback
_OS_FIXES = {
    errno.EACCES: "check its permissions (ls -l) or run as a user allowed to use it",
    errno.EPERM: "check its permissions (ls -l) or run as a user allowed to use it",
    errno.EROFS: "the file system is read-only; choose a place you can write",
    errno.ENOSPC: "free disk space and run the command again",
    errno.EDQUOT: "free space within your disk quota and run the command again",
    errno.EFBIG: "the file is larger than the file system allows; choose another place",
    errno.EIO: "the disk or file system reported an input/output error; check the device, then run again",
    errno.EISDIR: "it is a directory; pass a file",
    errno.ENOTDIR: "a part of the path is not a directory; check the path",
    errno.ENOENT: "it does not exist; check the path",
    errno.ENAMETOOLONG: "the name is too long for the file system; use a shorter path",
    errno.ELOOP: "it is a loop of symbolic links; check the path",
    errno.EMFILE: "too many files are open; raise the limit (ulimit -n)",
    errno.ENFILE: "too many files are open on this machine; retry later",
    errno.ENXIO: "the device behind it is gone; check the path",
}


# errors that name no file but still have a person's fix: the disk or the process's limits
_ANY_STREAM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE}


def _shown(name: object) -> str:
    text = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)
    return repr(text if len(text) <= 200 else text[:100] + "..." + text[-60:])


def os_error_message(exc: OSError, writing_output: bool = False) -> str | None:
    """One line for an operating-system error a person can act on (None for any other: a bug,
    which keeps its traceback). ``writing_output``: it came from writing the command's output."""
    fix = _OS_FIXES.get(exc.errno)
    if fix is None:
        return None
    reason = exc.strerror or os.strerror(exc.errno)
    if writing_output:
        return f"cannot write the output: {reason}; {fix}"
    if exc.filename is None:  # no file named: only a full or failing disk, or too many open files, says enough
        return f"{reason}; {fix}" if exc.errno in _ANY_STREAM else None
    both = f" and {_shown(exc.filename2)}" if exc.filename2 is not None else ""
    return f"cannot use {_shown(exc.filename)}{both}: {reason}; {fix}"


def _check_device_flag(args: argparse.Namespace) -> None:
    """A ``--device`` this machine lacks is refused before any file is read."""
    device = getattr(args, "device", "auto")
    if device != "auto":
        from mlsa4rec.runtime import check_device

        check_device(device, "--device ")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    quiet = getattr(args, "quiet", False)  # -q before or after the command
    if quiet or env_rank() != 0:  # the console shows warnings only; train.log still gets every line
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    if args.command in ("train", "evaluate"):
        from mlsa4rec.runtime import tune_allocator

        tune_allocator()
    try:
        _check_device_flag(args)
        handler = ({"stats": _cmd_data_stats, "export": _cmd_data_export}[args.data_command] if args.command == "data"
                   else COMMANDS[args.command])
        pausing: contextlib.AbstractContextManager = contextlib.nullcontext()
        # SIGTERM pauses a training at a checkpoint, as a spent --time-budget does; one process only:
        # torchrun's agent stops its workers with SIGTERM itself, and they must not outlive it
        trains = args.command in ("train", "tune") or (args.command == "study" and args.study_command == "run")
        if trains and getattr(args, "nproc", 1) == 1 and not launched_by_torchrun():
            from mlsa4rec.training.stop import pause_on_sigterm

            pausing = pause_on_sigterm()
        with pausing:
            code = handler(args)
        try:
            if sys.stdout is not None:
                sys.stdout.flush()  # a full disk or closed pipe behind stdout fails here, not at exit
        except BrokenPipeError:
            raise
        except OSError as exc:
            message = os_error_message(exc, writing_output=True)
            if message is None:
                raise
            _silence_stdout()
            print(f"error: {message}", file=sys.stderr)
            return 2
        return code
    except TimeBudgetSpent as exc:
        if env_rank() == 0:
            print(f"paused: {exc}", file=sys.stderr)
        return EXIT_PAUSED
    except MLSA4RecError as exc:
        rank = env_rank()
        if not isinstance(exc, PeerFailed):  # rank 0 failed and prints the message itself
            print(f"error: {f'[rank {rank}] ' if rank else ''}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error worth a traceback
        _silence_stdout()
        return 0
    except OSError as exc:  # a file or stream the machine refused (permissions, a full disk, ...)
        message = os_error_message(exc)
        if message is None:
            raise
        if exc.filename is None:
            _silence_stdout()  # it may be the output that broke: nothing more may be written there, even at exit
        print(f"error: {message}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush of what is still buffered cannot
    fail again at exit (the documented cure for a closed pipe)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):  # no real file descriptor (a test's capture)
        pass
