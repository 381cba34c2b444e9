"""Where the pipeline stops working as catalogues and event logs grow: the scaling benchmark.

    python benchmarks/scale.py data --dir /tmp/scale                      # the synthetic files (scale_data.py)
    python benchmarks/scale.py run STAGE --phase before|after --dir /tmp/scale [--items ...] [--events ...]
    python benchmarks/scale.py report                                     # docs/results/scale.{md,json} + plots

Stages, each measured in a fresh process (its own peak resident memory, from ``wait4``), killed
when it passes ``--memory-cap`` GiB of resident memory or ``--limit`` seconds, which is recorded as
where it stops working:

* ``prepare``: the data file to processed sequences (read, 5-core, remap, sort), no cache;
  catalogues of 10^4, 10^5, 10^6 items x 10^6, 10^7, 5·10^7 events;
* ``step``: one SASRec training step (forward, loss, backward, Adam) at B = 256, L = 50 and 200,
  on catalogues of 10^4 to 10^6 items, with the loss named by ``--loss`` (``--set``: its settings);
* ``evaluate``: full-ranking evaluation (the protocol's ``evaluate``) of 10^5 users over the catalogue;
* ``serve``: the latency of one request (one history of 50 items, top 10) through ``Recommender``.

Results accumulate in ``docs/results/scale.json`` (one row per stage, phase and size; a rerun
replaces its row), from which ``report`` writes the page and the plots. ``--phase before`` is meant
to be run with the mlsa4rec of before the change (``PYTHONPATH=WORKTREE/src``): each row records
the commit of the mlsa4rec it imported.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, command, machine, table, write_json, write_text

RESULTS = REPO / "docs" / "results" / "scale.json"
GIB = 2 ** 30
ITEMS = (10_000, 100_000, 1_000_000)
EVENTS = (1_000_000, 10_000_000, 50_000_000)


def data_file(folder: Path, items: int, events: int, fmt: str) -> Path:
    return folder / f"scale-i{items:.0e}-e{events:.0e}.{fmt}".replace("+0", "")


# --- the probes (run in a child process) ----------------------------------------------------------
def _mlsa4rec_commit() -> str:
    """The commit of the mlsa4rec this process imported (it may be another worktree's)."""
    import mlsa4rec

    src = Path(mlsa4rec.__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"], cwd=src,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def probe_prepare(p: dict[str, Any]) -> dict[str, Any]:
    from mlsa4rec.data.dataset import load_sequences
    from mlsa4rec.data.readers import detect_format

    path = Path(p["file"])
    fmt = p.get("format") or detect_format(path)
    t0 = time.perf_counter()
    data = load_sequences(path, fmt, "scale", use_cache=False)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "users": data.n_users, "items_kept": data.n_items, "events_kept": data.n_interactions}


def _sasrec(n_items: int, length: int) -> Any:
    from mlsa4rec.models.registry import create

    return create("sasrec", n_items, MAX_ITEM_LIST_LENGTH=length)


def probe_step(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    from mlsa4rec.config import build_config, parse_set
    from mlsa4rec.data.sampling import Batch
    from mlsa4rec.training import trainer

    n_items, length, batch = p["items"], p["length"], p["batch"]
    overrides = {"MAX_ITEM_LIST_LENGTH": length, "loss_type": p["loss"], **parse_set(p.get("set", []))}
    config = build_config("sasrec", overrides=overrides)
    torch.manual_seed(0)
    model = _sasrec(n_items, length)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, n_items + 1, (batch, length + 1), generator=g)
    b = Batch(seq[:, :-1], torch.full((batch,), length), seq[:, 1:], None)
    criterion = None  # the code of before has only the full softmax
    if str(config.train.loss_type).upper() != "CE":
        from mlsa4rec.training.losses import TrainingLoss

        t = config.train
        criterion = TrainingLoss(t.loss_type, n_items, negatives=t.negatives, sampler=t.negative_sampler,
                                 logq_correction=t.logq_correction, gbce_t=t.gbce_t, seed=0)
    steps = iter(range(10 ** 9))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        extra = {} if criterion is None else {"loss": criterion, "step": next(steps)}
        loss = trainer.cross_entropy(model, b, "all_positions", torch.device("cpu"), **extra)
        loss.backward()
        optimizer.step()
        return float(loss)

    times = []
    deadline = time.perf_counter() + p["budget"]
    for i in range(p["repeats"] + 1):  # the first step (allocations, Adam's state) is not timed
        t0 = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    times = times or [time.perf_counter() - t0]
    return {"seconds": sorted(times)[len(times) // 2], "steps_timed": len(times),
            "loss_type": config.train.loss_type, "targets": batch * length}


def _synthetic_sequences(users: int, n_items: int, seed: int = 0) -> Any:
    """A processed dataset of ``users`` histories (lognormal lengths, mean 20, at least 5) over ``n_items``."""
    import numpy as np

    from mlsa4rec.data.dataset import SequenceData

    rng = np.random.default_rng(seed)
    lengths = np.maximum(5, np.round(rng.lognormal(0.0, 1.0, users) * 20 / np.exp(0.5))).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = rng.integers(1, n_items + 1, size=int(offsets[-1]), dtype=np.int64)
    return SequenceData("scale", items, offsets, np.arange(n_items + 1, dtype=np.int64),
                        np.arange(users, dtype=np.int64), fingerprint="scale")


def probe_evaluate(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    from mlsa4rec.evaluation import evaluate

    data = _synthetic_sequences(p["users"], p["items"])
    torch.manual_seed(0)
    model = _sasrec(p["items"], 50)
    t0 = time.perf_counter()
    metrics = evaluate(model, data, "test", 50, ks=(10,), metrics=("hit", "ndcg"), batch_size=p["batch"])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ms_per_user": 1000 * seconds / p["users"], "ndcg@10": metrics["ndcg@10"]}


def probe_serve(p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from mlsa4rec.config import build_config
    from mlsa4rec.data.itemmap import ItemMap
    from mlsa4rec.serving.recommender import Recommender

    n_items = p["items"]
    torch.manual_seed(0)
    model = _sasrec(n_items, 50)
    items = ItemMap(list(range(1, n_items + 1)), np.ones(n_items, dtype=np.int64))
    rec = Recommender(model, build_config("sasrec"), items, torch.device("cpu"))
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, n_items + 1, size=50).tolist() for _ in range(p["requests"] + 3)]
    for h in histories[:3]:
        rec.recommend([h], k=10)
    times = []
    for h in histories[3:]:
        t0 = time.perf_counter()
        rec.recommend([h], k=10)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_ms": 1000 * times[len(times) // 2], "p99_ms": 1000 * times[min(len(times) - 1,
                                                                                 int(0.99 * len(times)))],
            "requests": len(times)}


PROBES = {"prepare": probe_prepare, "step": probe_step, "evaluate": probe_evaluate, "serve": probe_serve}


def child(stage: str, params: str) -> None:
    """Run one probe and print its result as the last line of stdout (JSON)."""
    import torch

    import mlsa4rec.data.dataset  # noqa: F401  (imported before the start is read, as every probe needs it)

    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", "2")))
    start = _rss_bytes(os.getpid())
    out = PROBES[stage](json.loads(params))
    out["start_rss_gib"] = round(start / GIB, 3)  # the interpreter with torch and mlsa4rec, before the probe
    out["mlsa4rec_commit"] = _mlsa4rec_commit()
    print(json.dumps(out))


# --- the parent: a probe per process, its peak memory, its limits ----------------------------------
def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(stage: str, params: dict[str, Any], limit_s: float, cap_bytes: int) -> dict[str, Any]:
    """The probe's result with ``peak_rss_gib`` and ``status`` (ok, out of memory, over time, failed)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "_child", stage, json.dumps(params)], stdout=out,
                                stderr=err, text=True)
        status = "ok"
        while True:  # wait4, not poll: the child's own resource usage comes with its exit status
            pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if _rss_bytes(proc.pid) > cap_bytes:
                status = f"stopped: over {cap_bytes / GIB:.0f} GiB"
            elif time.perf_counter() - t0 > limit_s:
                status = f"stopped: over {limit_s:.0f} s"
            if status != "ok":
                proc.send_signal(signal.SIGKILL)
                _, code, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(code)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    row: dict[str, Any] = {"peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3),
                           "wall_s": round(time.perf_counter() - t0, 1)}
    if status == "ok" and proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["no message"])[-1]
        status = "failed: " + ("out of memory (killed)" if proc.returncode == -9 else last[:160])
    if status == "ok":
        row.update(json.loads(stdout.strip().splitlines()[-1]))
    row["status"] = status
    return row


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def save_row(path: Path, row: dict[str, Any], key: tuple[str, ...]) -> None:
    """Add ``row`` to the results file, replacing an earlier row with the same key."""
    results = load_results(path)
    keep = [r for r in results["rows"] if tuple(str(r.get(k)) for k in key) != tuple(str(row.get(k)) for k in key)]
    results["rows"] = keep + [row]
    write_json(path, results)


KEYS = ("stage", "phase", "items", "events", "length", "loss", "set", "format")


def run(args: argparse.Namespace) -> None:
    cap, env_note = int(args.memory_cap * GIB), machine(threads=args.threads, commit=False)
    commit = _mlsa4rec_commit()  # the probes import the same mlsa4rec (a stopped probe prints nothing)
    os.environ["SCALE_THREADS"] = str(args.threads)
    sizes: list[dict[str, Any]] = []
    if args.stage == "prepare":
        for events in args.events:
            for items in args.items:
                path = data_file(args.dir, items, events, args.format)
                if not path.exists():
                    raise SystemExit(f"error: {path} is missing; make it first: python benchmarks/scale.py data "
                                     f"--dir {args.dir} --format {args.format}")
                sizes.append({"items": items, "events": events, "format": args.format, "file": str(path)})
    elif args.stage == "step":
        sizes = [{"items": i, "length": length, "batch": 256, "repeats": 5, "budget": args.limit / 2,
                  "loss": args.loss, "set": args.set} for length in (50, 200)
                 for i in args.items]
    elif args.stage == "evaluate":
        sizes = [{"items": i, "users": args.users, "batch": 1024} for i in args.items]
    else:
        sizes = [{"items": i, "requests": 200} for i in args.items]
    for params in sizes:
        print(f"{args.stage} {args.phase}: {json.dumps({k: v for k, v in params.items() if k != 'file'})} ...",
              flush=True)
        row = {"stage": args.stage, "phase": args.phase, **{k: v for k, v in params.items() if k not in ("file",)},
               "mlsa4rec_commit": commit, **measure(args.stage, params, args.limit, cap),
               "command": command(__file__), "machine": env_note, "note": args.note}
        print("   ", {k: row[k] for k in row if k not in ("machine", "command")}, flush=True)
        save_row(args.results, row, KEYS)


def make_data(args: argparse.Namespace) -> None:
    import scale_data

    for events in args.events:
        for items in args.items:
            path = data_file(args.dir, items, events, args.format)
            if path.exists():
                continue
            t0 = time.perf_counter()
            scale_data.write(scale_data.generate(items, events, seed=0), path)
            print(f"{path} in {time.perf_counter() - t0:.1f} s", flush=True)


# --- the report ----------------------------------------------------------------------------------
def _cell(row: dict[str, Any] | None, value: str, unit: str = "") -> str:
    if row is None:
        return "not run"
    if row["status"] != "ok":
        return row["status"].replace("stopped: ", "")
    return f"{row[value]:,.3g}{unit}"


def _where(row: dict[str, Any] | None) -> str:
    """A row's conditions in a word: quiet, or beside a training (which slows a probe)."""
    if row is None:
        return ""
    note = row.get("note") or ""
    return "quiet" if note.startswith("quiet") else "beside a training" if "training" in note else note or "?"


def page(results: dict[str, Any]) -> str:
    rows = results["rows"]

    def find(**want: Any) -> dict[str, Any] | None:
        """The last row with these values (``set``: the --set list as a tuple, () for none)."""
        hits = [r for r in rows if all((tuple(r.get(k) or ()) if k == "set" else r.get(k)) == v
                                       for k, v in want.items())]
        return hits[-1] if hits else None

    phases = [p for p in ("before", "after") if any(r["phase"] == p for r in rows)]
    notes = sorted({r.get("note") or "no note given" for r in rows})
    out = ["# Scaling: catalogues of 10^4 to 10^6 items, 10^6 to 5·10^7 events", "",
           "Generated by `python benchmarks/scale.py report` from `docs/results/scale.json`; each row's command, "
           "machine and mlsa4rec commit are in the JSON. Every probe runs in its own process; its peak resident "
           "memory is the process's (`wait4`), and a probe is stopped at the memory cap or time limit named in the "
           "cell. Synthetic data: `benchmarks/scale_data.py` (power-law popularity, a learnable ring walk, lognormal "
           "history lengths). Conditions of the rows: " + "; ".join(notes) + " (a training beside a probe "
           "slows it: compare rows measured in the same conditions).", "", "## Targets", "",
           *targets(rows, results.get("ann")), ""]
    prep = [r for r in rows if r["stage"] == "prepare"]
    if prep:
        out += ["## Data preparation (read, 5-core, remap, sort)", ""]
        header = ["events", "items"] + [f"{p}: {what}" for p in phases
                                        for what in ("s", "peak GiB", "bytes/event above the start", "conditions")]
        body = []
        for events in sorted({r["events"] for r in prep}):
            for items in sorted({r["items"] for r in prep}):
                cells = [f"{events:,}", f"{items:,}"]
                for p in phases:
                    r = find(stage="prepare", phase=p, events=events, items=items)
                    cells += [_cell(r, "seconds"), f"{r['peak_rss_gib']:.2f}" if r else "",
                              f"{(r['peak_rss_gib'] - r.get('start_rss_gib', 0)) * GIB / events:,.0f}"
                              if r and r["status"] == "ok" else "", _where(r)]
                body.append(cells)
        out += [table(header, body, "rr" + "rrrl" * len(phases)), ""]
    for stage, title, value, unit in (("step", "One training step (SASRec, B = 256, all positions)", "seconds", " s"),
                                      ("evaluate", "Full-ranking evaluation of 10^5 users", "seconds", " s"),
                                      ("serve", "Serving one request (50 items, top 10)", "p99_ms", " ms")):
        got = [r for r in rows if r["stage"] == stage]
        if not got:
            continue
        out += [f"## {title}", ""]
        variants = sorted({(r.get("length"), r.get("loss"), tuple(r.get("set") or ())) for r in got},
                          key=lambda v: (v[0] or 0, str(v[1]), v[2]))
        header = ["items", "L", "loss", "phase", value, "peak GiB", "conditions"]
        body = []
        for length, loss, sets in variants:
            for items in sorted({r["items"] for r in got}):
                for p in phases:
                    r = find(stage=stage, phase=p, items=items, length=length, loss=loss, set=sets)
                    if r is not None:
                        shown = f"{loss} ({', '.join(sets)})" if sets else (loss or "")
                        body.append([f"{items:,}", length or "", shown, p, _cell(r, value, unit),
                                     f"{r['peak_rss_gib']:.2f}", _where(r)])
        out += [table(header, body, "rr"), ""]
    ann = results.get("ann") or {}
    if ann:
        out += ["## Serving with the approximate index (`--ann hnsw`) against the exact chunked top 10", "",
                "From `benchmarks/ann_recall.py` (`docs/results/ann_recall.json`): a random table (standard normal, "
                "D = 64), 200 random user vectors, one request's ranking from its user vector (the model's forward "
                "left out), torch and usearch on one thread. Recall@10 is against the exact top 10.", ""]
        body = []
        for items, r in sorted(ann.items(), key=lambda kv: int(kv[0])):
            paths = [("exact, chunks of 65,536", 1.0, r["exact_chunked"]), ("whole row (before)", 1.0, r["whole_row"])]
            paths += [(f"HNSW, ef {key[6:]}", v["recall@10"], v) for key, v in r.items() if key.startswith("ann_ef")]
            for name, recall, v in paths:
                body.append([f"{int(items):,}", name, f"{recall:.3f}", f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}"])
        out += [table(["items", "path", "recall@10", "p50 ms", "p99 ms"], body, "rlrrr"), ""]
        for items, r in sorted(ann.items(), key=lambda kv: int(kv[0])):
            build, size = r.get("index_build_s"), r.get("index_file_mb")
            out.append(f"- {int(items):,} items: " + (f"index built in {build:,.0f} s" if build is not None else
                       f"a saved index loaded in {r.get('index_loaded_s', 0):,.1f} s") +
                       (f", {size:.0f} MB on disk" if size is not None else "") + "; the exact chunked top 10 "
                       f"equalled the whole row's for {r['whole_row_equals_exact']} of {r['requests']} requests. "
                       f"`{r['command']}` (commit {str(r['machine'].get('commit'))[:7]}).")
        out.append("")
    made = sorted({(r.get("mlsa4rec_commit", "?"), r.get("command", "?")) for r in rows if r.get("command")})
    out += ["## Commands", "", "Each with the mlsa4rec it imported (a before row ran the commit of before the change, "
            "`git worktree add /tmp/before COMMIT` and `PYTHONPATH=/tmp/before/src`; the data files come from "
            "`python benchmarks/scale.py data --dir /tmp/scale --format csv|parquet`):", "",
            *(f"- `{cmd}` (mlsa4rec {commit})" for commit, cmd in made), ""]
    return "\n".join(out)


def targets(rows: list[dict[str, Any]], ann: dict[str, Any] | None = None) -> list[str]:
    """The issue's targets, each checked against the rows (a target without its rows says so)."""
    def row(**want: Any) -> dict[str, Any] | None:
        hits = [r for r in rows if r["status"] == "ok" and all(
            (tuple(r.get(k) or ()) if k == "set" else r.get(k)) == v for k, v in want.items())]
        return hits[-1] if hits else None

    out = []
    big = row(stage="step", phase="after", items=1_000_000, length=50, loss="sampled_softmax", set=("negatives=1024",))
    small = row(stage="step", phase="after", items=10_000, length=50, loss="CE", set=())
    if big and small:
        ratio = big["seconds"] / small["seconds"]
        out.append(f"- A step at 10^6 items with 1,024 sampled negatives (L = 50): {big['seconds']:.2f} s, "
                   f"{ratio:.1f}x the full-softmax step at 10^4 items ({small['seconds']:.2f} s; target < 10x: "
                   f"{'met' if ratio < 10 else 'missed'}), peak {big['peak_rss_gib']:.2f} GiB (target < 4: "
                   f"{'met' if big['peak_rss_gib'] < 4 else 'missed'}).")
    else:
        out.append("- Training step target: not measured yet (needs the after rows at 10^4 items CE and 10^6 items "
                   "sampled_softmax negatives=1024, L = 50).")
    ev = row(stage="evaluate", phase="after", items=1_000_000)
    out.append(f"- Exact evaluation of {ev['users']:,} users over 10^6 items: {ev['seconds']:.0f} s "
               f"({ev['ms_per_user']:.2f} ms per user), peak {ev['peak_rss_gib']:.2f} GiB (target < 8: "
               f"{'met' if ev['peak_rss_gib'] < 8 else 'missed'})." if ev else
               "- Evaluation target: not measured yet (after, 10^6 items).")
    prep = sorted((r for r in rows if r["stage"] == "prepare" and r["phase"] == "after" and r["status"] == "ok"),
                  key=lambda r: (r["items"], r["events"]))
    for items in sorted({r["items"] for r in prep}):
        per = [(r["events"], (r["peak_rss_gib"] - r.get("start_rss_gib", 0)) * GIB / r["events"]) for r in prep
               if r["items"] == items]
        if len(per) > 1:
            out.append(f"- Preparation (after, {prep[0]['format']}, {items:,} items): " + ", ".join(
                f"{b:,.0f} bytes/event at {e:,}" for e, b in per) + " events (target: constant).")
    exact = row(stage="serve", phase="after", items=1_000_000)
    approx = ((ann or {}).get(str(1_000_000)) or {}).get("ann_ef512")
    if exact and approx:
        out.append(f"- Serving one history at 10^6 items: exact p99 {exact['p99_ms']:.0f} ms (the whole request); "
                   f"the approximate index's ranking at its default ef 512: p99 {approx['p99_ms']:.1f} ms at recall@10 "
                   f"{approx['recall@10']:.3f} (against the exact ranking's p99 of "
                   f"{ann[str(1_000_000)]['exact_chunked']['p99_ms']:.1f} ms measured beside it).")
    else:
        out.append("- Serving target: not measured yet (after, 10^6 items, exact and `ann_recall.py --save`).")
    fifty = row(stage="prepare", phase="after", events=50_000_000)
    out.append(f"- 5·10^7 events prepared with a peak of {fifty['peak_rss_gib']:.1f} GiB (target < 8 GB: "
               f"{'met' if fifty['peak_rss_gib'] * GIB < 8e9 else 'missed'})." if fifty else
               "- 5·10^7 events: not measured yet (after).")
    return out


def _slope(xs: list[float], ys: list[float]) -> float | None:
    """The least-squares slope of log y against log x (None with fewer than two points)."""
    import numpy as np

    if len(xs) < 2:
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def plot(results: dict[str, Any], out: Path) -> Path:
    """Four log-log panels: preparation seconds and peak memory against events, a training step's
    seconds against items, evaluation seconds and serving p99 against items (stopped probes left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results["rows"] if r["status"] == "ok"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))

    def lines(ax: Any, stage: str, x: str, y: str, group: Any, ylabel: str, xlabel: str) -> None:
        series: dict[str, list[tuple[float, float]]] = {}
        for r in ok:
            if r["stage"] == stage:
                series.setdefault(group(r), []).append((r[x], y(r)))
        for label, points in sorted(series.items()):
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            slope = _slope(xs, ys)
            ax.plot(xs, ys, marker="o", label=label + (f" (slope {slope:.2f})" if slope is not None else ""))
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=7)

    lines(axes[0, 0], "prepare", "events", lambda r: r["seconds"], lambda r: f"{r['phase']} {r['format']}, "
          f"{r['items']:.0e} items", "seconds", "events")
    axes[0, 0].set_title("data preparation: time")
    lines(axes[0, 1], "prepare", "events", lambda r: r["peak_rss_gib"], lambda r: f"{r['phase']} {r['format']}, "
          f"{r['items']:.0e} items", "peak GiB", "events")
    axes[0, 1].set_title("data preparation: peak memory")
    lines(axes[1, 0], "step", "items", lambda r: r["seconds"], lambda r: f"{r['phase']} {r['loss']} "
          f"{' '.join(r.get('set') or [])} L={r['length']}", "seconds", "items")
    axes[1, 0].set_title("one training step (B = 256)")
    lines(axes[1, 1], "evaluate", "items", lambda r: r["seconds"], lambda r: f"{r['phase']} evaluate 10^5 users (s)",
          "seconds (evaluation) / ms (serving p99)", "items")
    lines(axes[1, 1], "serve", "items", lambda r: r["p99_ms"], lambda r: f"{r['phase']} serve p99 (ms)",
          "seconds (evaluation) / ms (serving p99)", "items")
    axes[1, 1].set_title("evaluation and serving")
    fig.tight_layout()
    from mlsa4rec.fileio import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def report(args: argparse.Namespace) -> None:
    results = load_results(args.results)
    ann_file = args.results.parent / "ann_recall.json"  # benchmarks/ann_recall.py --save
    if ann_file.is_file():
        results["ann"] = json.loads(ann_file.read_text())
    if not results["rows"]:
        raise SystemExit(f"error: {args.results} holds no rows; run a stage first")
    figure = plot(results, args.results.with_suffix(".png"))
    write_text(args.results.with_suffix(".md"), page(results) + f"\n![scaling]({figure.name})\n")
    print(f"wrote {args.results.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        child(argv[1], argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("data", "run"):
        p = sub.add_parser(name)
        if name == "run":
            p.add_argument("stage", choices=sorted(PROBES))
            p.add_argument("--phase", choices=("before", "after"), required=True)
            p.add_argument("--limit", type=float, default=600, help="seconds a probe may take")
            p.add_argument("--memory-cap", type=float, default=20, help="GiB of resident memory a probe may take")
            p.add_argument("--threads", type=int, default=2)
            p.add_argument("--users", type=int, default=100_000)
            p.add_argument("--loss", default="CE")
            p.add_argument("--set", action="append", default=[], help="KEY=VALUE for the step's loss")
            p.add_argument("--note", default="", help="the conditions: quiet, beside a training, ...")
        p.add_argument("--dir", type=Path, default=Path("/tmp/scale"))
        p.add_argument("--format", choices=("csv", "parquet"), default="csv")
        p.add_argument("--items", type=lambda s: int(float(s)), nargs="+", default=list(ITEMS))
        p.add_argument("--events", type=lambda s: int(float(s)), nargs="+", default=list(EVENTS))
    rep = sub.add_parser("report")
    for p in (sub.choices["run"], rep):
        p.add_argument("--results", type=Path, default=RESULTS, help="the results file (JSON; the page beside it)")
    args = parser.parse_args(argv)
    {"data": make_data, "run": run, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
