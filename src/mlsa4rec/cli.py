"""Command line: argument parsing only; every subcommand calls the library.

    mlsa4rec data stats DATASET [--json]
    mlsa4rec train --model NAME --dataset NAME|FILE --output-dir DIR [--config F] [--set k=v]
    mlsa4rec evaluate --run-dir DIR
    mlsa4rec models
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from mlsa4rec.errors import MLSA4RecError

DATASET_HELP = (
    "a registered dataset (ml-1m, amazon-beauty, amazon-video-games) or a data file: .inter (RecBole "
    "atomic), ratings.dat (MovieLens), .csv (user,item[,rating],timestamp) or .txt[.gz] (one line per "
    "user: 'user item item ...', chronological)"
)
DATA_DIR_HELP = ("folder laid out like shared/data holding the registered datasets (default: "
                 "$MLSA4REC_DATA_DIR; with neither, the official file is downloaded into the cache)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help=DATA_DIR_HELP)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML file of settings (repeatable; later files win)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one setting, value read as YAML, e.g. --set learning_rate=1e-3 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlsa4rec",
        description="Train, evaluate and compare sequential recommenders under the RecBole protocol "
                    "(5-core, chronological leave-one-out, full ranking).",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only print results and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    stats = data_sub.add_parser("stats", help="users, items, interactions and sequence lengths after filtering",
                                description="Statistics of a dataset after k-core filtering.")
    stats.add_argument("dataset", help=DATASET_HELP)
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_data_args(stats)
    stats.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="filtering settings, e.g. --set user_inter_num_interval='[0,inf)'")

    train = sub.add_parser(
        "train", help="train a model and evaluate it on valid and test",
        description="Train with early stopping on valid_metric, restore the best epoch, evaluate it on "
                    "valid and test, and write a run directory (config.yaml, results.json, "
                    "model.safetensors, train.log).",
    )
    train.add_argument("--model", required=True, help="registered model name (see `mlsa4rec models`)")
    train.add_argument("--dataset", required=True, help=DATASET_HELP)
    train.add_argument("--output-dir", required=True, help="run directory to create")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_config_args(train)
    _add_data_args(train)

    ev = sub.add_parser("evaluate", help="re-evaluate the saved weights of a run directory",
                        description="Rebuild the run's data and model and evaluate the saved weights.")
    ev.add_argument("--run-dir", required=True, help="a directory written by `mlsa4rec train`")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_data_args(ev)

    models = sub.add_parser("models", help="list registered models",
                            description="Registered models, their flags and default hyperparameters.")
    models.add_argument("--config", metavar="MODEL", help="print every setting and default of one model")
    return parser


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from mlsa4rec.config import parse_interval, parse_set
    from mlsa4rec.data import DEFAULT_INTERVAL, load_dataset

    filters = {"user_inter_num_interval": DEFAULT_INTERVAL, "item_inter_num_interval": DEFAULT_INTERVAL}
    for key, value in parse_set(args.overrides).items():
        if key not in filters:
            raise MLSA4RecError(f"data stats accepts only {sorted(filters)} in --set, not {key!r}")
        parse_interval(value, key)
        filters[key] = str(value)
    data = load_dataset(args.dataset, args.data_dir, **filters)
    stats = data.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for key, value in stats.items():
            print(f"{key:>14}  {value:,}" if isinstance(value, int) else f"{key:>14}  {value}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mlsa4rec.config import parse_set
    from mlsa4rec.training.run import format_table, train

    results = train(args.model, args.dataset, args.output_dir, args.config, parse_set(args.overrides),
                    args.data_dir, args.overwrite)
    if args.json:
        print(json.dumps({k: results[k] for k in ("model", "valid", "test", "best_epoch", "epochs_run",
                                                  "seconds_per_epoch")}, indent=2))
    else:
        print(f"{args.model} on {results['dataset']['dataset']}: best epoch {results['best_epoch']} of "
              f"{results['epochs_run']}, {results['seconds_per_epoch']:.1f} s/epoch")
        print(format_table(results))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mlsa4rec.training.run import evaluate_run, format_table

    results = evaluate_run(args.run_dir, args.data_dir)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from mlsa4rec.config import known_keys, model_hyperparameters
    from mlsa4rec.models import available, get_class

    if args.config:
        get_class(args.config)
        for key, value in known_keys(args.config).items():
            print(f"{key}: {json.dumps(value)}")
        return 0
    for name in available():
        cls = get_class(name)
        flags = ", ".join(f for f, on in (("causal", cls.causal), ("padding-invariant", cls.padding_invariant)) if on)
        params = " ".join(f"{k}={v}" for k, v in model_hyperparameters(name).items())
        print(f"{name:<12} [{flags or 'non-causal'}; trains with {cls.preferred_scheme}]  {params}")
    return 0


COMMANDS = {"train": _cmd_train, "evaluate": _cmd_evaluate, "models": _cmd_models}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.quiet:  # the console shows warnings only; train.log still gets every line
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    if args.command in ("train", "evaluate"):
        from mlsa4rec.runtime import tune_allocator

        tune_allocator()
    try:
        handler = _cmd_data_stats if args.command == "data" else COMMANDS[args.command]
        return handler(args)
    except MLSA4RecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was saved", file=sys.stderr)
        return 130
