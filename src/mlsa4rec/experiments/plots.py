"""Figures of runs and studies, made to be read in a README: PNG and SVG of every figure.

Each figure is written twice, ``OUT.png`` (150 dpi) and ``OUT.svg`` (its text kept as text, so
it can be searched and stays small), each atomically (a crash leaves the old file or none), and
reproducibly (no date in the SVG, fixed ids), so a committed figure changes only when its numbers
do. No pyplot: a ``Figure`` is drawn straight onto matplotlib's Agg and SVG canvases, so nothing
needs a display and no window state is shared between calls.

``plot_curves`` reads finished run directories, checked against their manifests first. The study
plots (``plot_bars``, ``plot_vs_length``, ``plot_cost_vs_length``) take plain rows, one per
finished cell, so that a study report can draw them from committed records alone::

    {"model": "sasrec", "dataset": "amazon-beauty", "seed": 0, "max_seq_length": 50,
     "metrics": {"test": {"hit@10": 0.081, "ndcg@10": 0.043}},
     "seconds_per_epoch": 12.5, "peak_memory_bytes": 1234567890}   # None where not measured

``peak_memory_bytes`` is the run's peak of its epochs' peaks: on CUDA what PyTorch allocated, on a
CPU the whole process's resident memory (Python and torch's own included; see docs/training.md).

``model`` is the label a cell is shown under (a preset or ablation is its own label).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, NullLocator

from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.fileio import write_atomic
from mlsa4rec.runs import directory
from mlsa4rec.runs.loading import load_run_config

Row = Mapping[str, Any]
PNG_DPI = 150
# text stays text in the SVG (searchable, small); fixed ids and no date: the same numbers give the same file
STYLE = {"svg.fonttype": "none", "svg.hashsalt": "mlsa4rec", "font.size": 10, "axes.titlesize": 11,
         "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 9, "figure.titlesize": 12}
COST = {"seconds_per_epoch": ("seconds per epoch", "seconds per epoch (s)", 1.0),
        "peak_memory_bytes": ("peak memory", "peak memory (MiB)", 2.0 ** 20)}


def figure_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``OUT.png`` and ``OUT.svg`` for ``out`` given with no suffix or with either of them (any
    other suffix is kept as part of the name: ``curves.v2`` gives ``curves.v2.png``)."""
    given = Path(out)
    if given.is_dir():
        raise MLSA4RecError(f"--out {str(out)!r} is a directory; name the figure file inside it, without suffix, "
                            f"e.g. {str(given / 'curves')!r}")
    base = given.with_suffix("") if given.suffix.lower() in (".png", ".svg") else given
    return base.with_name(base.name + ".png"), base.with_name(base.name + ".svg")


def _save(fig: Figure, out: str | os.PathLike[str]) -> list[Path]:
    png, svg = figure_paths(out)
    write_atomic(png, lambda tmp: fig.savefig(tmp, format="png", dpi=PNG_DPI))
    write_atomic(svg, lambda tmp: fig.savefig(tmp, format="svg", metadata={"Date": None}))
    return [png, svg]


# --- training curves of run directories ----------------------------------------------------------

@dataclass
class _Curve:
    name: str  # the run directory's name
    model: str
    dataset: str
    valid_metric: str
    best_epoch: int | None
    history: list[dict[str, Any]]

    @property
    def label(self) -> str:
        return self.name if self.name == self.model else f"{self.name} ({self.model})"


def _read_curve(run: Path) -> _Curve:
    """A finished run's history, read only after its files match its manifest (``load_run_config``
    refuses a directory that is not a run, with the message every command gives)."""
    config = load_run_config(run)
    path = run / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise directory.unreadable(path, exc) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MLSA4RecError(f"{str(path)!r} is damaged ({type(exc).__name__}); train the run again") from None
    history = results.get("history") if isinstance(results, dict) else None
    if not isinstance(history, list) or not history:
        raise MLSA4RecError(f"{str(path)!r} holds no per-epoch history (a run written by an older mlsa4rec); train "
                            "it again to plot its curves")
    dataset = Path(str(config.dataset)).name
    return _Curve(run.resolve().name, config.model, dataset, config.train.valid_metric, results.get("best_epoch"),
                  history)


def _valid_points(curve: _Curve, metric: str) -> tuple[list[int], list[float]]:
    rows = [row for row in curve.history if isinstance(row.get("valid"), dict)]
    points = [(row["epoch"], float(row["valid"][metric])) for row in rows if metric in row["valid"]]
    if not points:
        recorded = sorted({key for row in rows for key in row["valid"]})
        have = f"it recorded {', '.join(recorded)}" if recorded else "it recorded no validation metric by epoch"
        raise MLSA4RecError(f"run {curve.name!r} did not record the validation metric {metric!r} ({have}); "
                            "choose one it recorded")
    return [e for e, _ in points], [v for _, v in points]


def plot_curves(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                metric: str | None = None) -> list[Path]:
    """Training loss and a validation metric by epoch of finished runs, one line per run (its
    directory name and model), the best epoch (the weights the run kept) marked with a star.

    ``metric``: the validation metric to draw, e.g. ``hit@10``; by default the runs'
    ``valid_metric`` (the first run's where they differ). A run that did not record it is refused.
    Returns the PNG and SVG paths written.
    """
    if not run_dirs:
        raise MLSA4RecError("no run directory to plot; pass at least one")
    curves = [_read_curve(Path(run)) for run in run_dirs]
    if len({c.name for c in curves}) < len(curves):  # runs of one name in different folders: show the paths
        for curve, run in zip(curves, run_dirs):
            curve.name = os.fspath(run)
    metric = (metric or curves[0].valid_metric).lower()
    points = [_valid_points(curve, metric) for curve in curves]
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(11, 4.6), layout="constrained")
        loss_ax, valid_ax = fig.subplots(1, 2)
        handles = []
        for i, (curve, (v_epochs, v_values)) in enumerate(zip(curves, points)):
            color = f"C{i % 10}"
            epochs = [row["epoch"] for row in curve.history]
            losses = [row["loss"] for row in curve.history]
            few = len(epochs) <= 30  # markers only while they do not blur into a line
            handles += loss_ax.plot(epochs, losses, color=color, marker="o" if few else None, markersize=3,
                                    label=curve.label)
            valid_ax.plot(v_epochs, v_values, color=color, marker="o" if len(v_epochs) <= 30 else None,
                          markersize=3)
            best = curve.best_epoch
            if best in epochs:
                loss_ax.plot([best], [losses[epochs.index(best)]], "*", color=color, markersize=13,
                             markeredgecolor="black", markeredgewidth=0.6, zorder=3)
            if best in v_epochs:
                valid_ax.plot([best], [v_values[v_epochs.index(best)]], "*", color=color, markersize=13,
                              markeredgecolor="black", markeredgewidth=0.6, zorder=3)
        handles.append(Line2D([], [], linestyle="none", marker="*", markersize=11, color="white",
                              markeredgecolor="black", label="best epoch (the weights kept)"))
        for ax, title, ylabel in ((loss_ax, "training loss", "loss"),
                                  (valid_ax, f"validation {metric}", metric)):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        datasets = sorted({c.dataset for c in curves})
        fig.suptitle(f"Training curves on {', '.join(datasets)}")
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), frameon=False)
        return _save(fig, out)


# --- study plots from plain rows ------------------------------------------------------------------

def _ordered(values: Iterable[Any]) -> list[Any]:
    """Distinct values in order of first appearance (the study grid's order: the baseline first)."""
    return list(dict.fromkeys(values))


def _check_rows(rows: Sequence[Row], metric: str | None, split: str) -> None:
    if not rows:
        raise MLSA4RecError("no finished cell to plot; a study plot needs at least one")
    if metric is None:
        return
    for row in rows:
        scores = row.get("metrics", {}).get(split, {})
        if metric not in scores:
            raise MLSA4RecError(f"the cell {row.get('model')!r} on {row.get('dataset')!r} (seed {row.get('seed')}, "
                                f"L={row.get('max_seq_length')}) has no {split} {metric!r} (it has "
                                f"{', '.join(sorted(scores)) or 'none'}); choose a metric every cell recorded")


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value: no spread to show)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def _panels(n: int, width: float, height: float, max_cols: int = 3) -> tuple[Figure, list[Axes]]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows + 0.8), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, axes[:n]


def _colors(rows: Sequence[Row]) -> dict[str, str]:
    """One color per model, the same in every panel."""
    return {model: f"C{i % 10}" for i, model in enumerate(_ordered(r["model"] for r in rows))}


def _length_axis(ax: Axes, lengths: Sequence[int]) -> None:
    """L on a base-2 log axis, ticks at the lengths measured."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths), [str(length) for length in lengths])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("maximum sequence length L")


def plot_bars(rows: Sequence[Row], metric: str, out: str | os.PathLike[str], *, split: str = "test") -> list[Path]:
    """A bar chart per dataset: each model's ``split`` ``metric``, the mean over seeds, with the
    sample standard deviation as error bar (none where a model has one seed), the mean written on top.

    ``rows``: one per finished cell, ``{"model", "dataset", "seed", "max_seq_length", "metrics":
    {split: {metric: value}}, ...}`` (the module docstring has a full row). Where a dataset was run
    at several ``max_seq_length``, the bars are grouped by L, one color per model. Returns the paths
    written.
    """
    _check_rows(rows, metric, split)
    colors = _colors(rows)
    datasets = _ordered(r["dataset"] for r in rows)
    shape = {d: (len({r["model"] for r in rows if r["dataset"] == d}),
                 len({r["max_seq_length"] for r in rows if r["dataset"] == d})) for d in datasets}
    width = max(4.5, max(m * n * 0.6 + (n - 1) * 0.4 + 1.5 for m, n in shape.values()))
    with matplotlib.rc_context(STYLE):
        fig, axes = _panels(len(datasets), width=width, height=4.4, max_cols=max(1, min(3, int(15 // width))))
        for ax, dataset in zip(axes, datasets):
            cells = [r for r in rows if r["dataset"] == dataset]
            models = _ordered(r["model"] for r in cells)
            lengths = sorted({r["max_seq_length"] for r in cells})
            bars = []  # (x, model, mean, std, seeds)
            for g, length in enumerate(lengths):
                present = [m for m in models if any(r["model"] == m and r["max_seq_length"] == length for r in cells)]
                for i, model in enumerate(present):
                    values = [float(r["metrics"][split][metric]) for r in cells
                              if r["model"] == model and r["max_seq_length"] == length]
                    x = g * (len(models) + 0.7) + i - (len(present) - 1) / 2  # groups centred, 0.7 bar apart
                    bars.append((x, model, *_mean_std(values), len(values)))
            xs = np.array([b[0] for b in bars])
            means = [b[2] for b in bars]
            ax.bar(xs, means, color=[colors[b[1]] for b in bars], width=0.8)
            spread = [i for i, b in enumerate(bars) if b[3] is not None]
            if spread:
                ax.errorbar(xs[spread], [means[i] for i in spread], yerr=[bars[i][3] for i in spread], fmt="none",
                            ecolor="black", elinewidth=1.2, capsize=4)
            tops = [b[2] + (b[3] or 0.0) for b in bars]
            upright = len(bars) <= 8  # the means fit across their bars; more bars: written upwards
            for x, top, mean in zip(xs, tops, means):
                ax.annotate(f"{mean:.4f}", (x, top), xytext=(0, 3), textcoords="offset points", ha="center",
                            va="bottom", fontsize=8, rotation=0 if upright else 90)
            ax.set_ylim(0, max(max(tops) * (1.15 if upright else 1.3), 1e-9))
            if len(lengths) == 1:  # a bar per model: name it under its bar
                labels = [f"{b[1]}\n{b[4]} seed{'s' if b[4] > 1 else ''}" for b in bars]
                tilt = len(bars) > 3 or max(len(b[1]) for b in bars) > 12
                ax.set_xticks(xs, labels, rotation=25 if tilt else 0, ha="right" if tilt else "center",
                              rotation_mode="anchor", fontsize=8)
            else:  # groups of bars by L, the models in the legend
                ax.set_xticks([g * (len(models) + 0.7) for g in range(len(lengths))], [f"L={n}" for n in lengths])
            ax.grid(axis="x", visible=False)
            ax.set_title(dataset)
            ax.set_ylabel(f"{split} {metric}")
        if any(n > 1 for _, n in shape.values()):
            handles = [Patch(color=color, label=model) for model, color in colors.items()]
            fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)
        fig.suptitle(f"{split} {metric}: mean over seeds\nerror bar = sample std (none with one seed)")
        return _save(fig, out)


def plot_vs_length(rows: Sequence[Row], metric: str, out: str | os.PathLike[str], *,
                   split: str = "test") -> list[Path]:
    """Accuracy against the maximum sequence length L: per dataset, one line per model through the
    mean over seeds at each L, with sample-std error bars where there are several seeds.

    ``rows``: as for ``plot_bars`` (the module docstring has a full row). Returns the paths written.
    """
    _check_rows(rows, metric, split)
    colors = _colors(rows)
    datasets = _ordered(r["dataset"] for r in rows)
    with matplotlib.rc_context(STYLE):
        fig, axes = _panels(len(datasets), width=5.0, height=4.0)
        for ax, dataset in zip(axes, datasets):
            cells = [r for r in rows if r["dataset"] == dataset]
            for model in _ordered(r["model"] for r in cells):
                lengths = sorted({r["max_seq_length"] for r in cells if r["model"] == model})
                stats = [_mean_std([float(r["metrics"][split][metric]) for r in cells
                                    if r["model"] == model and r["max_seq_length"] == length]) for length in lengths]
                means = [m for m, _ in stats]
                ax.plot(lengths, means, color=colors[model], marker="o", label=model)
                spread = [i for i, (_, s) in enumerate(stats) if s is not None]
                if spread:
                    ax.errorbar([lengths[i] for i in spread], [means[i] for i in spread],
                                yerr=[stats[i][1] for i in spread], fmt="none", ecolor=colors[model], capsize=3)
            _length_axis(ax, sorted({r["max_seq_length"] for r in cells}))
            ax.set_title(dataset)
            ax.set_ylabel(f"{split} {metric}")
        handles = [Line2D([], [], color=color, marker="o", label=model) for model, color in colors.items()]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)
        fig.suptitle(f"{split} {metric} against L: mean over seeds\nerror bar = sample std")
        return _save(fig, out)


Slopes = dict[str, dict[str, dict[str, float | None]]]


class CostPlot(NamedTuple):
    """What ``plot_cost_vs_length`` wrote, and the slopes it printed:
    ``slopes[dataset][model]["seconds_per_epoch" | "peak_memory_bytes"]`` (None: fewer than two
    lengths measured)."""

    paths: list[Path]
    slopes: Slopes


def log_log_slope(lengths: Sequence[float], values: Sequence[float]) -> float | None:
    """The exponent b of value ~ L^b: least squares on the logarithms of every measurement (None
    with fewer than two distinct lengths)."""
    if len(set(lengths)) < 2:
        return None
    slope, _ = np.polyfit(np.log(np.asarray(lengths, dtype=float)), np.log(np.asarray(values, dtype=float)), 1)
    return float(slope)


def plot_cost_vs_length(rows: Sequence[Row], out: str | os.PathLike[str]) -> CostPlot:
    """Seconds per epoch and peak memory against L on log-log axes, per dataset, one line per model
    through the mean over seeds, its fitted slope (the exponent of L) in the legend and drawn as a
    dashed line: 1 means cost linear in L, 2 quadratic.

    ``rows``: as for ``plot_bars``; their ``seconds_per_epoch`` and ``peak_memory_bytes`` (None,
    where it was not measured, leaves the point out) are read. Returns the paths written and the slopes.
    """
    _check_rows(rows, None, "")
    colors = _colors(rows)
    datasets = _ordered(r["dataset"] for r in rows)
    slopes: Slopes = {}
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(12, 5.2 * len(datasets) + 0.6), layout="constrained")
        grid = fig.subplots(len(datasets), 2, squeeze=False)
        for (time_ax, memory_ax), dataset in zip(grid, datasets):
            cells = [r for r in rows if r["dataset"] == dataset]
            models = _ordered(r["model"] for r in cells)
            slopes[dataset] = {model: {} for model in models}
            for ax, key in ((time_ax, "seconds_per_epoch"), (memory_ax, "peak_memory_bytes")):
                title, ylabel, unit = COST[key]
                measured = [r for r in cells if isinstance(r.get(key), (int, float)) and r[key] > 0]
                for model in models:
                    points = [(r["max_seq_length"], float(r[key])) for r in measured if r["model"] == model]
                    slope = log_log_slope(*zip(*points)) if points else None
                    slopes[dataset][model][key] = slope
                    if not points:
                        continue
                    lengths = sorted({length for length, _ in points})
                    means = [np.mean([v for length, v in points if length == at]) / unit for at in lengths]
                    shown = f"slope {slope:.2f}" if slope is not None else "one L, no slope"
                    ax.plot(lengths, means, color=colors[model], marker="o", label=f"{model}: {shown}")
                    if slope is not None:
                        xs = np.log([length for length, _ in points])
                        intercept = float(np.mean(np.log([v / unit for _, v in points])) - slope * np.mean(xs))
                        ends = np.array([lengths[0], lengths[-1]], dtype=float)
                        ax.plot(ends, np.exp(intercept) * ends ** slope, color=colors[model], linestyle="--",
                                linewidth=1, alpha=0.7)
                ax.set_title(f"{title}, {dataset}")
                if not measured:
                    ax.text(0.5, 0.5, f"no {title} recorded\n(not measured)", ha="center", va="center",
                            transform=ax.transAxes)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    continue
                ax.set_yscale("log")
                _length_axis(ax, sorted({r["max_seq_length"] for r in measured}))
                ax.set_ylabel(ylabel)
                ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=1 if len(models) == 1 else 2,
                          frameon=False)  # below the panel: never over a line
        fig.suptitle("Cost against L (log-log): the slope is the exponent b of cost ~ L^b, dashed: the fit")
        return CostPlot(_save(fig, out), slopes)
