"""Serving as teams run it (issue 28): the cost of sessions in Redis, worker processes, and load
across a reload and a replica restart, with real `mlsa4rec serve` processes and a redis-server of
its own on 127.0.0.1 (Debian's redis-server must be on the PATH).

1. **Session latency**: one server, one client sending session events (POST /sessions/{id}/events,
   one item each, --events of them over --sessions sessions), with the in-process store and with
   Redis, in the same run: p50 and p99 and the Redis overhead at p50 (target: under 1 ms).
2. **Throughput**: POST /recommend (one history) and session events from --concurrency clients,
   against today's single process (in-process sessions), one process with Redis, and
   ``--workers 2`` with Redis.
3. **Reload and restart under load**: two replicas of the run sharing Redis, clients sending session
   events through a client-side failover (what a load balancer with health checks does: a refused
   connection is sent to the other replica); meanwhile replica A reloads its run
   (POST /models/NAME/reload) and replica B is killed with SIGKILL and started again. Counted:
   answers that are not 200, and sessions whose final length is not the number of events sent.

    python benchmarks/serving_production.py \\
        --run-dir studies/beauty-quick/runs/main/mamba4rec/amazon-beauty/seed-2020 --out docs/results/serving_production

Writes OUT.json and OUT.md (also printed). Compare within one run: other work may share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from common import command, machine, table, write_report
from serving_load import HOST, Connection, Server, make_histories, wait_healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("error: redis-server is not installed (Debian: apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


async def session_latency(port: int, items: list, events: int, sessions: int, tag: str) -> dict:
    conn = Connection(port)
    latencies, errors = [], 0
    for i in range(events + 50):  # the first 50: warm-up
        body = json.dumps({"items": [items[i % len(items)]]}).encode()
        start = time.perf_counter()
        status, _ = await conn.request("POST", f"/sessions/{tag}-{i % sessions}/events", body)
        if i >= 50:
            latencies.append(time.perf_counter() - start)
            errors += status != 200
    conn.close()
    return {"events": events, "errors": errors, **percentiles(latencies)}


async def throughput(port: int, histories: list[list], items: list, concurrency: int, n: int, kind: str,
                     tag: str) -> dict:
    sent, errors, latencies = 0, 0, []
    bodies = [json.dumps({"histories": [h], "k": 10}).encode() for h in histories[:256]]

    async def client(c: int) -> None:
        nonlocal sent, errors
        conn = Connection(port)
        while sent < n:
            i = sent
            sent += 1
            if kind == "recommend":
                path, body = "/recommend", bodies[i % len(bodies)]
            else:
                path, body = f"/sessions/{tag}-{c}/events", json.dumps({"items": [items[i % len(items)]]}).encode()
            start = time.perf_counter()
            try:
                status, _ = await conn.request("POST", path, body)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                status = 0
            latencies.append(time.perf_counter() - start)
            errors += status != 200
        conn.close()

    await asyncio.gather(*(client(c) for c in range(concurrency)))  # warm-up: the same load once
    sent, errors, latencies = 0, 0, []
    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    seconds = time.perf_counter() - start
    return {"requests": len(latencies), "errors": errors, "requests_per_s": round(len(latencies) / seconds, 1),
            **percentiles(latencies)}


async def under_load(ports: list[int], items: list, clients: int, seconds: float, events: dict[str, int],
                     errors: list[str], uncertain: dict[str, int]) -> None:
    """Session events from ``clients`` clients for ``seconds``, each client's session on a replica
    of its own first; a failed request goes to the other replica (a load balancer's failover). A
    request cut after it was sent (the replica killed while answering) may have been applied
    before it was retried: counted in ``uncertain``, as a load balancer's client would not know."""
    deadline = time.monotonic() + seconds

    async def client(c: int) -> None:
        sid = f"load-{c}"
        order = [ports[c % 2], ports[(c + 1) % 2]]
        conns = {p: Connection(p) for p in order}
        i = 0
        while time.monotonic() < deadline:
            body = json.dumps({"items": [items[(c * 7 + i) % len(items)]]}).encode()
            for attempt, port in enumerate(order * 20):
                try:
                    status, data = await conns[port].request("POST", f"/sessions/{sid}/events", body)
                    break
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                    if not isinstance(exc, ConnectionRefusedError):  # sent, then cut: applied or not
                        uncertain[sid] = uncertain.get(sid, 0) + 1
                    conns[port].close()
                    await asyncio.sleep(0.05 if attempt % 2 else 0)
            else:
                status, data = 0, b"no replica answered"
            if status == 200:
                events[sid] = events.get(sid, 0) + 1
            else:
                errors.append(f"{status} {data[:200]!r}")
            i += 1
        for conn in conns.values():
            conn.close()

    await asyncio.gather(*(client(c) for c in range(clients)))


async def session_lengths(port: int, sids: list[str]) -> dict[str, int]:
    conn = Connection(port)
    out = {}
    for sid in sids:
        status, data = await conn.request("GET", f"/sessions/{sid}/recommendations?k=1")
        out[sid] = json.loads(data)["length"] if status == 200 else -status
    conn.close()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="a finished run (`mlsa4rec train --output-dir`)")
    p.add_argument("--events", type=int, default=2000, help="session events of the latency test (default 2000)")
    p.add_argument("--sessions", type=int, default=50, help="sessions they go to (default 50)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=2000, help="requests per throughput case (default 2000)")
    p.add_argument("--load-seconds", type=float, default=20.0, help="length of the reload and restart test")
    p.add_argument("--note", default="", help="a sentence for the page (what else ran on the machine)")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    items = json.loads((run / "items.json").read_text())
    histories = make_histories(items, 512, seed=0)
    tokens = [h[0] for h in histories]
    work = Path(tempfile.mkdtemp(prefix="mlsa4rec-serving-production-"))
    log = work / "servers.log"
    redis = Redis()
    started: list[Server] = []
    report: dict = {"command": command("serving_production.py", argv), "machine": machine(), "run": str(run),
                    "note": args.note}
    try:
        # 1. session latency, in-process store against Redis
        latency = {}
        for store in ("memory", redis.url):
            server = Server(["--run-dir", str(run), "--sessions", store], log)
            started.append(server)
            asyncio.run(wait_healthy(server.port))
            latency["memory" if store == "memory" else "redis"] = asyncio.run(
                session_latency(server.port, tokens, args.events, args.sessions, f"lat-{len(latency)}"))
            server.stop()
        latency["redis_overhead_p50_ms"] = round(latency["redis"]["p50_ms"] - latency["memory"]["p50_ms"], 3)
        report["latency"] = latency
        print(json.dumps(latency), flush=True)
        # 2. throughput: today's single process, Redis, two workers with Redis
        cases = []
        for label, extra in (("1 process, sessions in memory", ["--sessions", "memory"]),
                             ("1 process, sessions in Redis", ["--sessions", redis.url]),
                             ("2 worker processes, sessions in Redis", ["--sessions", redis.url, "--workers", "2"])):
            server = Server(["--run-dir", str(run), *extra], log)
            started.append(server)
            asyncio.run(wait_healthy(server.port))
            for kind in ("recommend", "events"):
                row = {"case": label, "kind": kind, "clients": args.concurrency, **asyncio.run(
                    throughput(server.port, histories, tokens, args.concurrency, args.requests, kind,
                               f"tp-{len(cases)}"))}
                cases.append(row)
                print(json.dumps(row), flush=True)
            server.stop()
        report["throughput"] = cases
        # 3. a reload on replica A and a SIGKILL + restart of replica B under load
        served = work / "served"
        shutil.copytree(run, served)
        name = f"shop={served}"
        a = Server(["--run-dir", name, "--sessions", redis.url], log)
        b = Server(["--run-dir", name, "--sessions", redis.url], log)
        started.extend([a, b])
        ports = [a.port, b.port]
        asyncio.run(wait_healthy(a.port))
        asyncio.run(wait_healthy(b.port))
        events: dict[str, int] = {}
        uncertain: dict[str, int] = {}
        errors: list[str] = []
        actions: list[str] = []

        def disturb() -> None:
            time.sleep(args.load_seconds * 0.3)
            request = urllib.request.Request(f"http://{HOST}:{a.port}/models/shop/reload", method="POST")
            with urllib.request.urlopen(request, timeout=120) as answer:  # noqa: S310 - loopback
                actions.append(f"replica A reloaded its run ({answer.status})")
            time.sleep(args.load_seconds * 0.1)
            b.stop(kill=True)
            actions.append("replica B killed (SIGKILL)")
            time.sleep(1.0)
            restarted = Server(["--run-dir", name, "--sessions", redis.url], log, port=ports[1])
            asyncio.run(wait_healthy(restarted.port))
            actions.append("replica B started again")
            started.append(restarted)

        thread = threading.Thread(target=disturb)
        thread.start()
        asyncio.run(under_load(ports, tokens, 8, args.load_seconds, events, errors, uncertain))
        thread.join()
        lengths = asyncio.run(session_lengths(a.port, sorted(events)))
        # lost: fewer events stored than answered with 200; twice: more, at most the requests cut after sending
        lost = {sid: (lengths[sid], n) for sid, n in events.items() if lengths[sid] < n}
        twice = {sid: (lengths[sid], n) for sid, n in events.items()
                 if n < lengths[sid] <= n + uncertain.get(sid, 0)}
        wrong = {sid: (lengths[sid], n) for sid, n in events.items()
                 if lengths[sid] > n + uncertain.get(sid, 0)}
        report["under_load"] = {"seconds": args.load_seconds, "clients": 8, "events": sum(events.values()),
                                "errors": len(errors), "error_examples": errors[:5], "sessions": len(events),
                                "sessions_with_lost_events": len(lost), "sessions_with_unexplained_events": len(wrong),
                                "requests_cut_after_sending": sum(uncertain.values()),
                                "events_applied_twice_by_a_retry": sum(n - m for n, m in twice.values()),
                                "stored_vs_answered": {sid: [lengths[sid], n] for sid, n in events.items()},
                                "actions": actions}
        print(json.dumps(report["under_load"]), flush=True)
    finally:
        for server in started:  # every server this script started, whatever failed
            server.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = page(report)
    print(text)
    if args.out:
        write_report(args.out, report, text)


def page(report: dict) -> str:
    lat, m = report["latency"], report["machine"]
    rows = [[store, lat[store]["events"], lat[store]["errors"], lat[store]["p50_ms"], lat[store]["p99_ms"]]
            for store in ("memory", "redis")]
    tp = [[r["case"], r["kind"], r["clients"], r["requests"], r["errors"], r["requests_per_s"], r["p50_ms"],
           r["p99_ms"]] for r in report["throughput"]]
    load = report["under_load"]
    return (f"# Serving in production: Redis sessions, worker processes, reload and restart under load\n\n"
            f"Run `{report['run']}`; CPU: {m['cpu']}, {m['cores']} cores; torch {m['torch']}. {report['note']}\n\n"
            f"```bash\n{report['command']}\n```\n\n## Session event latency (one client)\n\n"
            + table(["store", "events", "errors", "p50 ms", "p99 ms"], rows, align="lrrrr")
            + f"\n\nRedis overhead at p50: **{lat['redis_overhead_p50_ms']:.3f} ms** (target: under 1 ms).\n\n"
            "## Throughput\n\n"
            + table(["server", "requests", "clients", "sent", "errors", "req/s", "p50 ms", "p99 ms"], tp,
                    align="llrrrrrr")
            + f"\n\n## Reload and replica restart under load\n\n{load['clients']} clients sent {load['events']:,} "
            f"session events to two replicas sharing Redis for {load['seconds']:.0f} s, failing over to the other "
            f"replica when a request failed, while: {'; '.join(load['actions'])}. Answers other than 200: "
            f"**{load['errors']}**; sessions missing an event answered with 200: "
            f"**{load['sessions_with_lost_events']}** of {load['sessions']}; sessions with more events than sent and "
            "retried: "
            f"**{load['sessions_with_unexplained_events']}**. Requests cut after they were sent (the killed replica "
            f"had them) and sent again to the other replica: {load['requests_cut_after_sending']}, of which "
            f"{load['events_applied_twice_by_a_retry']} had been applied before the kill and so were applied twice: "
            "a client that retries a request whose answer it never got cannot know (at-least-once delivery).\n")


if __name__ == "__main__":
    main()
