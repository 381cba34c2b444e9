"""Load test of `mlsa4rec serve`: throughput and p50/p99 latency over loopback, with and without
micro-batching.

For each ``--windows`` value it starts the real server (``python -m mlsa4rec serve --port 0
--batch-window-ms W`` under ``timeout``, so it stops by itself even if this script dies) on
127.0.0.1, waits for /health, and drives it with keep-alive HTTP/1.1 clients on one asyncio loop
(a minimal client, so the load generator spends little of the shared CPU):

    recommend x1   POST /recommend, 1 history per request, 1 client, then --concurrency clients
    recommend x32  POST /recommend, 32 histories per request, 4 clients
    events         POST /sessions/{id}/events, 1 item, --concurrency clients (one session each)
    session recs   GET /sessions/{id}/recommendations?k=10, --concurrency clients

Each scenario sends a fixed number of requests and stops early at ``--time-limit`` seconds; any
answer but 200 (or a connection failure) is an error. Histories are drawn from the run's own
items by training popularity, 5-50 items long (seeded). The mean merged batch comes from the
server's /metrics. Writes ``--out``.json and .md (command, CPU, torch, the run) unless --no-write;
the .md keeps the notes written below its notes marker.

    python benchmarks/serving_load.py --run-dir runs/mamba4rec-beauty-serving
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import command, machine, row, table, write_report

HOST = "127.0.0.1"
SCENARIOS = [  # name, method, histories per request (0: session), concurrency (None: --concurrency), share of N
    ("recommend x1", "recommend", 1, 1, 0.25),
    ("recommend x1", "recommend", 1, None, 1.0),
    ("recommend x32", "recommend", 32, 4, 0.125),
    ("events", "events", 0, None, 1.0),
    ("session recs", "session", 0, None, 0.5),
]


# --- a minimal keep-alive HTTP/1.1 client -----------------------------------------------------------
class Connection:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
            self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        try:
            status = int((await self.reader.readline()).split(b" ", 2)[1])
            length, close = 0, False
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                elif name.lower() == "connection" and value.strip().lower() == "close":
                    close = True
            data = await self.reader.readexactly(length)
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# --- the server -----------------------------------------------------------------------------------------
class Server:
    """`mlsa4rec serve ARGS` in a subprocess on 127.0.0.1 (``port`` 0: a free one); under `timeout`
    when ``limit_s`` is given, so it stops by itself even if the benchmark dies."""

    def __init__(self, args: list[str], log: Path, limit_s: int | None = None, port: int = 0) -> None:
        guard = ["timeout", "--signal=INT", "--kill-after=5", str(limit_s)] if limit_s else []
        self.command = [*guard, sys.executable, "-m", "mlsa4rec", "serve", "--host", HOST, "--port", str(port),
                        "--no-access-log", "-q", *args]
        self.log = open(log, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(180)
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line[0] if line else "")
        if not found:
            self.stop()
            raise SystemExit(f"the server did not start: {line[0] if line else 'no output'}; see {log}")
        self.port = int(found.group(1))

    def stop(self, kill: bool = False) -> None:
        """A graceful stop (SIGINT, which `timeout` passes on), or SIGKILL with ``kill``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def wait_healthy(port: int, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        try:
            conn = Connection(port)
            status, body = await conn.request("GET", "/health")
            conn.close()
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not answer /health")
        await asyncio.sleep(0.1)


async def metrics(port: int) -> dict[str, float]:
    conn = Connection(port)
    _, body = await conn.request("GET", "/metrics")
    conn.close()
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("mlsa4rec_batch_size_count") or line.startswith("mlsa4rec_batch_size_sum"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# --- load -------------------------------------------------------------------------------------------------
def make_histories(items: dict, n: int, seed: int) -> list[list]:
    rng = np.random.default_rng(seed)
    counts = np.asarray(items["train_counts"], dtype=float)
    picks = rng.choice(len(counts), size=(n, 50), p=counts / counts.sum())
    lengths = rng.integers(5, 51, size=n)
    return [[items["tokens"][i] for i in row[:k]] for row, k in zip(picks, lengths)]


async def scenario(port: int, kind: str, per_request: int, concurrency: int, n: int, time_limit: float,
                   histories: list[list], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    pool = [json.dumps({"histories": [histories[(i * per_request + j) % len(histories)] for j in range(per_request)],
                        "k": 10}).encode() for i in range(256)] if kind == "recommend" else []
    items = [h[0] for h in histories]
    run = f"{kind}-{seed}"
    if kind == "session":  # every client's session has a history first
        conn = Connection(port)
        for c in range(concurrency):
            await conn.request("POST", f"/sessions/{run}-{c}/events",
                               json.dumps({"items": histories[c % len(histories)]}).encode())
        conn.close()
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.monotonic() + time_limit

    async def client(c: int) -> None:
        nonlocal sent, errors
        conn = Connection(port)
        try:
            while sent < n and time.monotonic() < deadline:
                i = sent
                sent += 1
                if kind == "recommend":
                    method, path, body = "POST", "/recommend", pool[i % len(pool)]
                elif kind == "events":
                    method, path = "POST", f"/sessions/{run}-{c}/events"
                    body = json.dumps({"items": [items[int(rng.integers(len(items)))]]}).encode()
                else:
                    method, path, body = "GET", f"/sessions/{run}-{c}/recommendations?k=10", b""
                start = time.perf_counter()
                try:
                    status, _ = await conn.request(method, path, body)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    status = 0
                latencies.append(time.perf_counter() - start)
                errors += status != 200
        finally:
            conn.close()

    before = await metrics(port)
    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    seconds = time.perf_counter() - start
    after = await metrics(port)
    calls = after.get("mlsa4rec_batch_size_count", 0) - before.get("mlsa4rec_batch_size_count", 0)
    merged = after.get("mlsa4rec_batch_size_sum", 0) - before.get("mlsa4rec_batch_size_sum", 0)
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "seconds": round(seconds, 3),
            "requests_per_s": round(len(latencies) / seconds, 1),
            "histories_per_s": round(len(latencies) * max(per_request, 1) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2), "max_ms": round(float(ms.max()), 2),
            "stopped_by_time_limit": len(latencies) < n,
            "mean_merged_batch": round(merged / calls, 2) if calls else None}


async def bench_server(port: int, args, histories: list[list], window: float) -> list[dict]:
    rows = []
    for s, (name, kind, per_request, concurrency, share) in enumerate(SCENARIOS):
        concurrency = concurrency or args.concurrency
        n = max(concurrency, int(args.requests * share))
        await scenario(port, kind, per_request, concurrency, min(n, 4 * concurrency), args.time_limit, histories,
                       seed=1000 + s)  # warm-up
        result = await scenario(port, kind, per_request, concurrency, n, args.time_limit, histories, seed=s)
        row = {"batch_window_ms": window, "scenario": name, "concurrency": concurrency,
               "histories_per_request": per_request or None, **result}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


# --- reporting ------------------------------------------------------------------------------------------
NOTES = "<!-- notes: the text below this line is kept when the script rewrites this file -->"
HEADER = table(["window ms", "scenario", "clients", "requests", "errors", "req/s", "histories/s", "p50 ms", "p99 ms",
                "mean merged batch"], align="rlrrrrrrrr")


def format_row(r: dict) -> str:
    merged = "–" if r["mean_merged_batch"] is None else f"{r['mean_merged_batch']:.1f}"
    return row([f"{r['batch_window_ms']:g}", r["scenario"], r["concurrency"], r["requests"], r["errors"],
                f"{r['requests_per_s']:.0f}", f"{r['histories_per_s']:.0f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                merged])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="a finished run (`mlsa4rec train --output-dir`)")
    parser.add_argument("--windows", type=float, nargs="+", default=[0, 1, 2, 5], metavar="MS",
                        help="--batch-window-ms values to compare (0: no micro-batching); default 0 1 2 5")
    parser.add_argument("--requests", type=int, default=2000, help="requests of the main scenarios (default 2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients of the concurrent scenarios (32)")
    parser.add_argument("--time-limit", type=float, default=8.0, help="seconds at most per scenario (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/serving", help="writes OUT.json and OUT.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.time_limit <= 0:
        parser.error("--requests, --concurrency and --time-limit must be positive")
    run = Path(args.run_dir)
    items = json.loads((run / "items.json").read_text())
    histories = make_histories(items, 2048, args.seed)
    server_limit = int(len(SCENARIOS) * 2 * args.time_limit + 120)  # seconds a server may live
    load_before = os.getloadavg()
    rows: list[dict] = []
    health: dict = {}
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for window in args.windows:
            server = Server(["--run-dir", str(run), "--batch-window-ms", str(window)],
                            Path(tmp) / f"server-{window}.log", limit_s=server_limit)
            try:
                health = asyncio.run(wait_healthy(server.port))
                rows += asyncio.run(bench_server(server.port, args, histories, window))
            finally:
                server.stop()
    errors = sum(r["errors"] for r in rows)
    import torch

    results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else {}
    report = {
        # the machine's fields at the top level, where the first report put cpu, cores, torch and python
        "command": command(__file__, argv), **machine(), "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "run": {"dir": str(run), "model": health.get("model"), "dataset": health.get("dataset"),
                "items": health.get("items"), "max_item_list_length": health.get("max_item_list_length"),
                "test": results.get("test"), "epochs_run": results.get("epochs_run")},
        "settings": {"requests": args.requests, "concurrency": args.concurrency, "time_limit_s": args.time_limit,
                     "windows_ms": args.windows, "seed": args.seed},
        "errors": errors, "rows": rows}
    if not args.no_write:
        out = Path(args.out)
        md = out.with_suffix(".md")
        kept = md.read_text().partition(NOTES)[2] if md.is_file() else ""
        write_report(out, report, markdown(report) + (NOTES + kept if kept else ""))
        print(f"wrote {out.with_suffix('.json')} and {md}")
    print(f"errors: {errors}")
    return 1 if errors else 0


def markdown(report: dict) -> str:
    run = report["run"]
    lines = [
        "# Serving load test: `mlsa4rec serve` over loopback", "",
        f"`{report['command']}`", "",
        f"Machine: {report['cpu']}, {report['cores']} cores, torch {report['torch']} (CPU, its default of "
        f"{report['torch_threads']} threads), Python {report['python']}; load average before "
        f"{report['load_average_before'][0]}, after {report['load_average_after'][0]} (the machine is shared). "
        f"Server and load generator run on the same cores.", "",
        f"Run: `{run['dir']}`: {run['model']} on {run['dataset']} ({run['items']} items, L = "
        f"{run['max_item_list_length']}, {run['epochs_run']} epochs; test {fmt_test(run['test'])}).", "",
        HEADER, *(format_row(r) for r in report["rows"]), "",
        f"Errors: {report['errors']}. Latency is per request, from the client's send to the last byte of the answer; "
        "\"mean merged batch\" is the histories per model call of single-history requests (from /metrics).", ""]
    return "\n".join(lines)


def fmt_test(test: dict | None) -> str:
    if not test:
        return "unknown"
    return ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k in ("hit@10", "ndcg@10"))


if __name__ == "__main__":
    raise SystemExit(main())
