"""The prepared GPU check: tests, scan timings, training steps and profiles in one bounded run.

    PYTHONPATH=src python benchmarks/gpu_check.py --out "$OUT"        # on a lent GPU (< 5 min)
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --quick  # smoke test of the script
    PYTHONPATH=src python benchmarks/gpu_check.py --scan-only [--lengths 50 200 1000] [--repeats 5]

Run it whenever a session is lent a GPU, then copy ``gpu_check.json`` and ``gpu_check.md`` from
``--out`` into docs/results/ (the default ``--out`` on a GPU). In that order, each phase capped
so that the whole run stays inside ``--budget`` seconds (default 270), after which it writes
what it has (a watchdog thread writes and exits even if a kernel hangs):

1. a quick accuracy check of every scan implementation against the float64 reference;
2. fwd+bwd of every available scan implementation at B=256, d_inner=128, N=32, fp32 and bf16,
   L = 50/200/1000/4000 (``reference`` only to L=200 and ``torch`` to L=1000; both only fp32):
   median milliseconds and extra peak memory, against the targets (triton: <= 2 ms at L=200,
   <= 10 ms at L=1000, memory linear in L) - and, where mamba-ssm is installed, the measurement
   that decides ``scan.PREFER_MAMBA_SSM``;
3. one training step (forward, backward, Adam) of every registered model at L=200 on synthetic
   data (3,416 items as ML-1M): 256 all-positions windows (causal models) and prefix batches of
   2,048, with wall time, the sum of GPU kernel time (launch-bound when much smaller) and peak
   memory;
4. a torch.profiler table of the top kernels of one step of Mamba4Rec and each MLSA4Rec variant;
5. ``pytest tests/ops`` on the GPU, then ``tests/layers tests/models``;
6. a sweep of the Triton kernel's launch configuration (channels per program, warps, chunk).

``--scan-only`` runs phases 1 and 2 alone (what ``scan_gpu.py`` did before it was folded in here),
with the scan lengths of ``--lengths`` and ``--repeats`` timed calls per case, into runs/gpu_check
unless ``--out`` says otherwise (a partial check never replaces docs/results/gpu_check.md).

pytest is run from the environment, or from ``runs/gpu_vendor`` when that folder exists
(``pip install --target runs/gpu_vendor pytest`` here, and carry it to a machine without it).
Nothing here needs a network.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from common import REPO, machine, median_ms, repeat_timed, row, write_report
from mlsa4rec.ops import resolve_impl, selective_scan

VENDOR = REPO / "runs" / "gpu_vendor"
SIZES = {"full": dict(batch=256, d_inner=128, n_state=32, lengths=[50, 200, 1000, 4000], windows=256,
                      prefix_batch=2048, model_length=200),
         "quick": dict(batch=4, d_inner=8, n_state=4, lengths=[8, 24], windows=8, prefix_batch=16, model_length=16)}
MAX_LENGTH = {"reference": 200, "torch": 1000}  # slower or materialising: longer L would eat the budget
N_ITEMS = 3416  # ML-1M's item table
TARGETS_MS = {200: 2.0, 1000: 10.0}  # triton fwd+bwd at B=256 on an H200 (the targets)
PROFILED = [("mamba4rec", {}), ("mlsa4rec", {"variant": "faithful"}), ("mlsa4rec", {"variant": "masked"}),
            ("mlsa4rec", {"variant": "causal"})]
SWEEP = [dict(BLOCK_D=b, NUM_WARPS=w) for b, w in [(4, 4), (8, 4), (16, 8), (16, 16), (32, 8), (8, 2)]] + [
    dict(CHUNK=c) for c in (8, 32, 64)]


class Run:
    """The results so far, the clock, and one writer shared with the watchdog."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0 = args, time.monotonic()
        self.deadline = self.t0 + args.budget
        self.lock = threading.Lock()
        self.finished = False
        self.results: dict = {"script": "benchmarks/gpu_check.py", "args": vars(args).copy(), "notes": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def cap(self, share: float) -> float:
        """Seconds for a phase: its share of the budget, never past the deadline (minus writing time)."""
        return max(0.0, min(share * self.args.budget, self.left() - 5))

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.results["notes"].append(text)

    def write(self, reason: str = "finished") -> None:
        with self.lock:
            self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
            self.results["ended"] = reason
            out = Path(self.args.out)
            write_report(out / "gpu_check", self.results, markdown(self.results), default=str)
            self.finished = self.finished or reason == "finished"
            print(f"wrote {out / 'gpu_check.json'} and gpu_check.md ({reason}, {self.results['elapsed_s']} s)",
                  flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mem_reset(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def mem_extra_mb(device: torch.device, base: int) -> float | None:
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1) if device.type == "cuda" else None


def timed(step, device: torch.device, cap_s: float, repeats: int = 10) -> dict:
    """First call (compilation included), then up to ``repeats`` calls within ``cap_s``: median ms."""
    sync(device)
    (first,) = repeat_timed(step, 1, warmup=0, sync=lambda: sync(device))
    base = mem_reset(device)
    times = repeat_timed(step, repeats, warmup=0, sync=lambda: sync(device), budget_s=cap_s)
    return {"ms": round(median_ms(times), 3), "ms_min": round(1000 * min(times), 3), "n": len(times),
            "first_ms": round(1000 * first, 1), "extra_peak_mb": mem_extra_mb(device, base)}


# --- 0. the machine -------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    """The shared machine record, plus what decides which scan runs here."""
    env = machine(threads=torch.get_num_threads() if device.type == "cpu" else None)
    gpu = env.get("gpu") if device.type == "cuda" else None
    env = {"device": gpu["name"] if gpu else f"{env['cores']}-core {env['cpu']}", **env,
           "cuda": torch.version.cuda, "platform": platform.platform()}
    for name in ("triton", "numba", "mamba-ssm"):  # not imported here: numba must be imported after
        try:  # mlsa4rec sizes its thread pool (an early import costs 100x on a shared CPU)
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = "not installed"
    env["scan on this device (auto)"] = resolve_impl("auto", device)
    return env


# --- 1 and 2. the scan ------------------------------------------------------------------------------

def scan_inputs(batch: int, d_inner: int, n_state: int, length: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> list[torch.Tensor]:
    """u, delta, A, B, C, D, z, delta_bias; u, delta, B, C, z in ``dtype``, the rest fp32 (as under autocast)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    xs = [randn(batch, d_inner, length), randn(batch, d_inner, length) - 2.0, -torch.exp(randn(d_inner, n_state)),
          randn(batch, n_state, length), randn(batch, n_state, length), randn(d_inner), randn(batch, d_inner, length),
          randn(d_inner) * 0.1]
    low = {0, 1, 3, 4, 6}
    return [x.to(device=device, dtype=dtype if i in low else torch.float32) for i, x in enumerate(xs)]


def candidates(device: torch.device) -> list[str]:
    return ["cuda" if device.type == "cuda" else "cpu", "triton", "torch", "reference"]


def accuracy(run: Run, device: torch.device) -> None:
    print("1. accuracy of each implementation (fp32 against the float64 reference)", flush=True)
    leaves = scan_inputs(3, 16, 8, 37, device, torch.float64)
    names = ["out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"]

    def outputs(impl: str, dtype: torch.dtype) -> list[torch.Tensor]:
        xs = [x.detach().to(dtype).requires_grad_() for x in leaves]
        out = selective_scan(*xs, delta_softplus=True, impl=impl)
        weight = torch.linspace(-1, 1, out.numel(), device=device, dtype=out.dtype).view_as(out)
        (out * weight).sum().backward()
        return [out.detach()] + [x.grad for x in xs]

    exact = outputs("reference", torch.float64)
    rows = []
    for impl in candidates(device):
        runs = resolve_impl(impl, device)
        if runs != impl:
            rows.append({"impl": impl, "runs": runs, "note": f"unavailable here (would run {runs})"})
            continue
        try:
            got = outputs(impl, torch.float32)
            errors = {n: float((a.double() - b).norm() / b.norm()) for n, a, b in zip(names, got, exact)}
            worst = max(errors, key=errors.get)
            rows.append({"impl": impl, "runs": runs, "worst_rel_err": errors[worst], "worst": worst,
                         "ok": errors[worst] <= 1e-5})
        except Exception as exc:  # noqa: BLE001 - a broken implementation is a result, not a crash
            rows.append({"impl": impl, "runs": runs, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(f"  {rows[-1]}", flush=True)
    run.results["accuracy"] = rows


def scan_timings(run: Run, device: torch.device, sizes: dict) -> None:
    print("2. scan fwd+bwd timings", flush=True)
    rows: list[dict] = run.results.setdefault("scan", [])
    b, d, n = sizes["batch"], sizes["d_inner"], sizes["n_state"]
    stop = time.monotonic() + run.cap(1.0 if run.args.scan_only else 0.22)
    for dtype in (torch.float32, torch.bfloat16):
        for impl in candidates(device):
            runs = resolve_impl(impl, device, dtype)
            if runs != impl:
                rows.append({"impl": impl, "dtype": str(dtype)[6:], "note": f"unavailable (would run {runs})"})
                continue
            if impl == "triton" and device.type == "cpu":
                rows.append({"impl": impl, "dtype": str(dtype)[6:], "note": "interpreter: not timed"})
                continue
            if dtype != torch.float32 and impl in ("torch", "reference", "cpu"):
                continue  # they compute in fp32 anyway
            for length in sizes["lengths"]:
                row = {"impl": impl, "dtype": str(dtype)[6:], "L": length, "B": b, "d_inner": d, "N": n}
                left = stop - time.monotonic()
                if length > MAX_LENGTH.get(impl, 10**9) and not run.args.quick:
                    row["note"] = f"skipped: > L={MAX_LENGTH[impl]} for {impl}"
                elif left < 1:
                    row["note"] = "skipped: phase budget spent"
                else:
                    row.update(scan_case(impl, dtype, length, device, sizes, min(3.0, left / 2), run.args.repeats))
                rows.append(row)
                print(f"  {row}", flush=True)
    verdicts = []
    for length in sizes["lengths"]:
        for key in ("float32", "bfloat16"):
            by = {r["impl"]: r.get("ms") for r in rows if r.get("L") == length and r["dtype"] == key}
            if by.get("triton") is not None and by.get("cuda") is not None:
                verdicts.append(f"L={length} {key}: triton {by['triton']:.2f} ms vs mamba-ssm {by['cuda']:.2f} ms")
            target = TARGETS_MS.get(length)
            if target and key == "float32" and by.get("triton") is not None and not run.args.quick:
                ok = "meets" if by["triton"] <= target else "MISSES"
                verdicts.append(f"triton L={length} fp32: {by['triton']:.2f} ms {ok} the {target} ms target")
    mem = [(r["L"], r["extra_peak_mb"]) for r in rows if r.get("impl") == "triton" and r["dtype"] == "float32"
           and r.get("extra_peak_mb")]
    if len(mem) >= 2:
        verdicts.append("triton extra peak MB per 1k steps: " + ", ".join(f"L={n}: {1000 * m / n:.0f}" for n, m in mem))
    run.results["scan_verdicts"] = verdicts
    for v in verdicts:
        print(f"  {v}", flush=True)


def scan_case(impl: str, dtype: torch.dtype, length: int, device: torch.device, sizes: dict, cap_s: float,
              repeats: int = 10) -> dict:
    try:
        leaves = [x.requires_grad_() for x in scan_inputs(sizes["batch"], sizes["d_inner"], sizes["n_state"], length,
                                                          device, dtype)]

        def step() -> None:
            for x in leaves:
                x.grad = None
            selective_scan(*leaves, delta_softplus=True, impl=impl).float().sum().backward()

        return timed(step, device, cap_s, repeats)
    except Exception as exc:  # noqa: BLE001 - out of memory, a kernel failing: record it and go on
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def sweep(run: Run, device: torch.device, sizes: dict) -> None:
    """Launch configurations of the Triton kernel at L=200 (and the largest L) in fp32."""
    if resolve_impl("triton", device) != "triton" or device.type != "cuda":
        return
    print("6. triton launch-configuration sweep", flush=True)
    from mlsa4rec.ops import _triton_scan as ts

    default = {k: getattr(ts, k) for k in ("BLOCK_D", "NUM_WARPS", "CHUNK")}
    rows = run.results.setdefault("triton_sweep", [])
    stop = time.monotonic() + run.cap(1.0)
    config, warps = ts._config(sizes["d_inner"], sizes["n_state"])
    rows.append({"config": f"default: BLOCK_D={config}, NUM_WARPS={warps}, CHUNK={ts.CHUNK}", "L": 200,
                 **next((r for r in run.results.get("scan", []) if r.get("impl") == "triton" and r.get("L") == 200
                         and r["dtype"] == "float32" and "ms" in r), {})})
    try:
        for change in SWEEP:
            for length in (200, 1000):
                if stop - time.monotonic() < 4:
                    run.note("sweep stopped: budget spent")
                    return
                for key, value in change.items():
                    setattr(ts, key, value)
                row = {"config": ", ".join(f"{k}={v}" for k, v in change.items()), "L": length}
                row.update(scan_case("triton", torch.float32, length, device, sizes, 1.5))
                rows.append(row)
                print(f"  {row}", flush=True)
                for key, value in default.items():
                    setattr(ts, key, value)
    finally:
        for key, value in default.items():
            setattr(ts, key, value)


# --- 3 and 4. training steps and profiles ----------------------------------------------------------

def synthetic_batch(scheme: str, batch: int, length: int, seed: int = 0):
    from mlsa4rec.data.sampling import Batch

    rng = np.random.default_rng(seed)
    items = rng.integers(1, N_ITEMS + 1, size=(batch, length))
    if scheme == "all_positions":
        lengths = np.full(batch, length)
        targets = rng.integers(1, N_ITEMS + 1, size=(batch, length))
    else:
        lengths = rng.integers(1, length + 1, size=batch)
        items = np.where(np.arange(length)[None, :] < lengths[:, None], items, 0)
        targets = rng.integers(1, N_ITEMS + 1, size=batch)
    return Batch(torch.from_numpy(items), torch.from_numpy(lengths), torch.from_numpy(targets), np.arange(batch))


def model_cases() -> list[tuple[str, dict, str]]:
    from mlsa4rec.models import available, get_class

    cases = []
    for name in available():
        variants = [{"variant": v} for v in ("faithful", "masked", "causal")] if name == "mlsa4rec" else [{}]
        for overrides in variants:
            causal = get_class(name).causal if name != "mlsa4rec" else overrides["variant"] == "causal"
            cases += [(name, overrides, "all_positions")] if causal else []
            cases.append((name, overrides, "prefix"))
    return cases


def train_step_fn(name: str, overrides: dict, scheme: str, device: torch.device, sizes: dict):
    from mlsa4rec.models import create
    from mlsa4rec.training.trainer import cross_entropy

    torch.manual_seed(0)
    length = sizes["model_length"]
    model = create(name, N_ITEMS, MAX_ITEM_LIST_LENGTH=length, **overrides).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = synthetic_batch(scheme, sizes["windows"] if scheme == "all_positions" else sizes["prefix_batch"], length)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        cross_entropy(model, batch, scheme, device).backward()
        opt.step()

    return step


def label(name: str, overrides: dict) -> str:
    return name + (f" ({overrides['variant']})" if "variant" in overrides else "")


def training_steps(run: Run, device: torch.device, sizes: dict) -> None:
    print(f"3. one training step per model at L={sizes['model_length']}", flush=True)
    rows = run.results.setdefault("train_steps", [])
    stop = time.monotonic() + run.cap(0.16)
    for name, overrides, scheme in model_cases():
        batch = sizes["windows"] if scheme == "all_positions" else sizes["prefix_batch"]
        row = {"model": label(name, overrides), "scheme": scheme, "batch": batch, "L": sizes["model_length"]}
        left = stop - time.monotonic()
        if left < 2:
            row["note"] = "skipped: phase budget spent"
        else:
            try:
                step = train_step_fn(name, overrides, scheme, device, sizes)
                row.update(timed(step, device, min(3.0, left / 3), repeats=5))
                row["kernel_ms"] = kernel_time_ms(step, device)
            except Exception as exc:  # noqa: BLE001 - out of memory and the like: record, go on
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {row}", flush=True)


def kernel_time_ms(step, device: torch.device) -> float | None:
    """Sum of GPU kernel time in one step (much less than the wall time: the step is launch-bound)."""
    if device.type != "cuda":
        return None
    events = profile_step(step, device)
    return round(sum(e["self_ms"] for e in events), 3)


def profile_step(step, device: torch.device) -> list[dict]:
    """Self time per kernel (GPU) or per operator (CPU) of one step, largest first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    averages = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
        attr = "self_device_time_total" if hasattr(kernels[0] if kernels else None, "self_device_time_total") \
            else "self_cuda_time_total"
        rows = [(e.key, e.count, getattr(e, attr)) for e in kernels]
    else:
        rows = [(e.key, e.count, e.self_cpu_time_total) for e in averages]
    rows.sort(key=lambda r: r[2], reverse=True)
    return [{"name": k, "calls": c, "self_ms": round(us / 1000, 3)} for k, c, us in rows]


def profiles(run: Run, device: torch.device, sizes: dict) -> None:
    print("4. profiles", flush=True)
    out = run.results.setdefault("profiles", [])
    stop = time.monotonic() + run.cap(0.07)
    for name, overrides in PROFILED:
        causal = name == "mamba4rec" or overrides.get("variant") == "causal"
        scheme = "all_positions" if causal else "prefix"
        if stop - time.monotonic() < 2:
            run.note(f"profile of {label(name, overrides)} skipped: budget spent")
            continue
        try:
            step = train_step_fn(name, overrides, scheme, device, sizes)
            step()  # warm-up (compilation, allocator)
            events = profile_step(step, device)
            total = sum(e["self_ms"] for e in events) or 1.0
            top = [{**e, "share": round(e["self_ms"] / total, 4)} for e in events[:15]]
            scan = sum(e["self_ms"] for e in events if "scan" in e["name"].lower())
            out.append({"model": label(name, overrides), "scheme": scheme, "total_ms": round(total, 3),
                        "scan_share": round(scan / total, 4), "top": top})
            print(f"  {label(name, overrides)} {scheme}: {total:.1f} ms of "
                  f"{'kernels' if device.type == 'cuda' else 'operators'}, scan {scan / total:.0%}; top: "
                  + "; ".join(f"{e['name'][:40]} {e['share']:.0%}" for e in top[:4]), flush=True)
        except Exception as exc:  # noqa: BLE001
            out.append({"model": label(name, overrides), "error": f"{type(exc).__name__}: {exc}"[:300]})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


# --- 5. the test suite on the GPU ------------------------------------------------------------------

def pytest_phase(run: Run, paths: list[str], share: float) -> None:
    cap = run.cap(share)
    print(f"5. pytest {' '.join(paths)} (cap {cap:.0f} s)", flush=True)
    row = {"paths": paths, "cap_s": round(cap)}
    run.results.setdefault("pytest", []).append(row)
    if cap < 10:
        row["outcome"] = "skipped: budget spent"
        return
    env = dict(os.environ)
    path = [str(REPO / "src")] + ([str(VENDOR)] if VENDOR.is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join(path + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else path)
    cmd = [sys.executable, "-m", "pytest", *paths, "-q", "--maxfail=10", "-p", "no:cacheprovider", "--durations=8"]
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=cap)
        text, code = proc.stdout + proc.stderr, proc.returncode
        row["outcome"] = {0: "passed", 1: "FAILED", 5: "no tests"}.get(code, f"exit {code}")
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        row["outcome"] = f"timed out after {cap:.0f} s"
    row["seconds"] = round(time.monotonic() - t, 1)
    lines = text.strip().splitlines()
    row["summary"] = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or "error" in ln), "")
    row["tail"] = "\n".join(lines[-40:])
    if "No module named pytest" in text:
        row["outcome"] = "pytest not installed (pip install --target runs/gpu_vendor pytest here, and carry it)"
    print(f"  {row['outcome']}: {row['summary']} ({row['seconds']} s)", flush=True)


# --- the report -----------------------------------------------------------------------------------

def markdown(r: dict) -> str:
    env = r.get("environment", {})
    shown = {k: ", ".join(f"{a} {b}" for a, b in v.items()) if isinstance(v, dict) else v for k, v in env.items()}
    lines = ["# GPU check", "", f"Generated by `{r['script']}` ({r.get('ended', 'running')}, {r.get('elapsed_s')} s "
             f"of a {r['args']['budget']} s budget) on **{env.get('device', '?')}**.", "",
             "| | |", "|---|---|", *(row(kv) for kv in shown.items()), ""]
    if r.get("accuracy"):
        lines += ["## Accuracy (fp32 vs float64 reference, worst relative error over outputs and gradients)", "",
                  "| impl | runs | worst | of | ok |", "|---|---|---:|---|---|"]
        for a in r["accuracy"]:
            err = f"{a['worst_rel_err']:.1e}" if "worst_rel_err" in a else a.get("error", a.get("note", ""))
            lines.append(f"| {a['impl']} | {a['runs']} | {err} | {a.get('worst', '')} | {a.get('ok', '')} |")
        lines.append("")
    if r.get("scan"):
        lengths = sorted({s["L"] for s in r["scan"] if "L" in s})
        lines += ["## Selective scan, fwd+bwd", "", "B={B}, d_inner={d_inner}, N={N}; median ms (extra peak MB); "
                  "u, delta, B, C, z in the dtype, A, D, delta_bias fp32.".format(
                      **next(s for s in r["scan"] if "B" in s)) if any("B" in s for s in r["scan"]) else "", "",
                  "| impl | dtype | " + " | ".join(f"L={n}" for n in lengths) + " |",
                  "|---|---|" + "---:|" * len(lengths)]
        keys = list(dict.fromkeys((s["impl"], s["dtype"]) for s in r["scan"]))
        for impl, dtype in keys:
            cells = []
            for n in lengths:
                s = next((s for s in r["scan"] if (s["impl"], s["dtype"], s.get("L")) == (impl, dtype, n)), None)
                if s is None:
                    note = next((x.get("note") for x in r["scan"] if (x["impl"], x["dtype"]) == (impl, dtype)
                                 and "L" not in x), "")
                    cells.append(note or "–")
                elif "ms" in s:
                    mb = f" ({s['extra_peak_mb']:,.0f})" if s.get("extra_peak_mb") is not None else ""
                    cells.append(f"{s['ms']:,.2f}{mb}")
                else:
                    cells.append(s.get("note") or s.get("error", "–"))
            lines.append(f"| {impl} | {dtype} | " + " | ".join(cells) + " |")
        lines += [""] + [f"* {v}" for v in r.get("scan_verdicts", [])] + [""]
    if r.get("train_steps"):
        lines += ["## One training step (forward, backward, Adam), synthetic data, 3,416 items", "",
                  "| model | scheme | batch | L | ms | GPU kernel ms | extra peak MB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for s in r["train_steps"]:
            if "ms" in s:
                lines.append(f"| {s['model']} | {s['scheme']} | {s['batch']} | {s['L']} | {s['ms']:,.2f} | "
                             f"{s.get('kernel_ms') if s.get('kernel_ms') is not None else '–'} | "
                             f"{s.get('extra_peak_mb') if s.get('extra_peak_mb') is not None else '–'} |")
            else:
                lines.append(f"| {s['model']} | {s['scheme']} | {s['batch']} | {s['L']} | "
                             f"{s.get('note') or s.get('error')} | | |")
        lines.append("")
    for p in r.get("profiles", []):
        if "top" not in p:
            lines += [f"### Profile: {p['model']}: {p.get('error')}", ""]
            continue
        lines += [f"### Profile: {p['model']}, {p['scheme']}: {p['total_ms']:.2f} ms self time, scan "
                  f"{p['scan_share']:.0%}", "", "| kernel / op | calls | self ms | share |", "|---|---:|---:|---:|"]
        lines += [f"| `{e['name'][:90]}` | {e['calls']} | {e['self_ms']:.3f} | {e['share']:.1%} |" for e in p["top"]]
        lines.append("")
    for t in r.get("pytest", []):
        lines += [f"## pytest {' '.join(t['paths'])}: {t.get('outcome')}", "", t.get("summary", ""), ""]
        if t.get("outcome") not in ("passed", None) and t.get("tail"):
            lines += ["```", t["tail"], "```", ""]
    if r.get("triton_sweep"):
        lines += ["## Triton launch configurations (fp32)", "", "| config | L | ms | extra peak MB |",
                  "|---|---:|---:|---:|"]
        for s in r["triton_sweep"]:
            lines.append(f"| {s['config']} | {s.get('L', '')} | {s.get('ms', s.get('error', '–'))} | "
                         f"{s.get('extra_peak_mb', '–')} |")
        lines.append("")
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"* {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script itself")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds for the whole run (default 270)")
    parser.add_argument("--out", help="folder for gpu_check.json/.md (default: docs/results on a GPU, "
                        "runs/gpu_check otherwise)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 with --device cpu)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "scan", "train", "profile", "pytest",
                                                                  "sweep"])
    parser.add_argument("--scan-only", action="store_true",
                        help="only the scan's accuracy and fwd+bwd timings (phases 1 and 2, the whole budget)")
    parser.add_argument("--lengths", type=int, nargs="+", metavar="L",
                        help="scan lengths (default 50 200 1000 4000; with --quick 8 24)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per scan case (default 10)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU visible to torch; run with --device cpu --quick for a smoke test")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.scan_only:
        args.skip = sorted(set(args.skip) | {"train", "profile", "pytest", "sweep"})
    full_check = device.type == "cuda" and not args.quick and not args.scan_only
    args.out = args.out or str(REPO / ("docs/results" if full_check else "runs/gpu_check"))
    if args.threads or device.type == "cpu":  # on a shared CPU, spinning OpenMP threads cost 100x here
        torch.set_num_threads(args.threads or 1)
    run = Run(args)
    sizes = {**SIZES["quick" if args.quick else "full"], **({"lengths": args.lengths} if args.lengths else {})}

    def watchdog() -> None:
        time.sleep(max(0.0, run.left() + 10))
        if not run.finished:
            run.note("watchdog: the budget ran out inside a phase; results are partial")
            for _ in range(3):  # the main thread may be appending to the results meanwhile
                try:
                    run.write("stopped by the watchdog")
                    break
                except RuntimeError:
                    time.sleep(0.1)
            os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    run.results["environment"] = environment(device)
    print(json.dumps(run.results["environment"], indent=1), flush=True)
    phases = [("accuracy", lambda: accuracy(run, device)), ("scan", lambda: scan_timings(run, device, sizes)),
              ("train", lambda: training_steps(run, device, sizes)), ("profile", lambda: profiles(run, device, sizes)),
              ("pytest", lambda: pytest_phase(run, ["tests/ops"] if not args.quick else ["tests/ops/test_scan_env.py"],
                                              0.30)),
              ("pytest", lambda: pytest_phase(run, ["tests/layers", "tests/models"] if not args.quick else [], 0.15)),
              ("sweep", lambda: sweep(run, device, sizes))]
    for name, phase in phases:
        if name in args.skip:
            continue
        if name == "pytest" and args.quick and run.results.get("pytest"):
            continue  # quick: one small test file is enough to exercise the phase
        try:
            phase()
        except Exception:  # noqa: BLE001 - keep what the other phases found
            run.note(f"phase {name} crashed: {traceback.format_exc(limit=3)[-600:]}")
        run.write(f"after {name}")
    run.write("finished")


if __name__ == "__main__":
    main()
