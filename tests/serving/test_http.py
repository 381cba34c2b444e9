"""The HTTP service against a real uvicorn server on 127.0.0.1: every endpoint, bad bodies, limits,
sessions (LRU and idle expiry), metrics, the OpenAPI docs, micro-batching and a seeded fuzz."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[dev]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[dev]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")

from tiny_runs import tiny_run  # noqa: E402

from mlsa4rec.cli import main  # noqa: E402
from mlsa4rec.errors import MLSA4RecError  # noqa: E402
from mlsa4rec.serving import Recommender  # noqa: E402
from mlsa4rec.serving import http as serving_http  # noqa: E402
from mlsa4rec.serving.http import DEFAULTS, INTERNAL, create_app, listen  # noqa: E402

LIMITS = {"max_histories": 4, "max_history_length": 20, "max_k": 20, "max_body_bytes": 4096, "max_sessions": 3,
          "batch_window_ms": 20}
SERVER_SECONDS = 120  # a server left running by a failed test stops by itself after this


@pytest.fixture(scope="module")
def runs() -> dict[str, Path]:
    """A tiny SASRec (re-encodes sessions) and GRU4Rec (streams them) on string item tokens i1..i30."""
    return {name: tiny_run(name) for name in ("sasrec", "gru4rec")}


@contextmanager
def serving(app) -> Iterator[str]:
    """``app`` on a real uvicorn server on 127.0.0.1 (a free port) in a thread; its URL."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    watchdog = threading.Timer(SERVER_SECONDS, lambda: setattr(server, "should_exit", True))
    watchdog.daemon = True
    thread.start()
    watchdog.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            try:
                if server.started and httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        watchdog.cancel()
        sock.close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def rec(runs: dict[str, Path]) -> Recommender:
    return Recommender.from_run(runs["sasrec"])


@pytest.fixture(scope="module")
def server(rec: Recommender) -> Iterator[tuple[httpx.Client, object]]:
    """The SASRec run with small limits and a 20 ms batching window; (client, app)."""
    app = create_app(rec, **LIMITS)
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client, app


@pytest.fixture(scope="module")
def streaming(runs: dict[str, Path]) -> Iterator[tuple[httpx.Client, Recommender]]:
    """The GRU4Rec run (streaming sessions) with 2 s session expiry and batching off; (client, recommender).
    (2 s: long enough that a loaded 2-core machine never expires a session between two requests.)"""
    rec = Recommender.from_run(runs["gru4rec"])
    assert rec.streams
    with serving(create_app(rec, session_ttl_s=2.0, batch_window_ms=0)) as url, \
            httpx.Client(base_url=url, timeout=10) as client:
        yield client, rec


def plain(answer) -> list[dict]:
    return [{"item": r.item, "score": r.score} for r in answer]


def same(got: list[dict], expected: list[dict]) -> bool:
    return [r["item"] for r in got] == [r["item"] for r in expected] and all(
        math.isclose(a["score"], b["score"], rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(got, expected))


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of Prometheus text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} " if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- endpoints -------------------------------------------------------------------------------------
def test_health_openapi_and_docs(server) -> None:
    client, _ = server
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "sasrec" and health["items"] == 30
    assert health["max_item_list_length"] == 8 and health["limits"]["max_k"] == 20
    spec = client.get("/openapi.json").json()
    model = {"/recommend", "/sessions/{session_id}/events", "/sessions/{session_id}/recommendations",
             "/sessions/{session_id}"}
    assert set(spec["paths"]) == model | {f"/models/sasrec{path}" for path in model} | {
        "/health", "/metrics", "/models", "/models/sasrec/reload"}
    body = spec["components"]["schemas"]["RecommendRequest"]["properties"]
    assert body["histories"]["maxItems"] == 4 and body["histories"]["items"]["maxItems"] == 20
    assert body["k"]["maximum"] == 20 and body["k"]["default"] == 10
    assert "422" in spec["paths"]["/recommend"]["post"]["responses"]
    assert "RecommendResponse" in json.dumps(spec["paths"]["/recommend"]["post"]["responses"]["200"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_recommend_answers_as_the_recommender(server, rec: Recommender) -> None:
    client, _ = server
    histories = [["i1", "i2", "i3"], ["i7"], [f"i{k}" for k in range(3, 23)]]
    got = client.post("/recommend", json={"histories": histories, "k": 5})
    assert got.status_code == 200
    for answer, expected in zip(got.json()["recommendations"], rec.recommend(histories, k=5)):
        assert same(answer, plain(expected))
    single = client.post("/recommend", json={"histories": [["i4", "i5"]], "k": 7, "exclude_seen": True,
                                             "exclude": ["i6"]}).json()["recommendations"][0]
    assert same(single, plain(rec.recommend([["i4", "i5"]], 7, exclude_seen=True, exclude=["i6"])[0]))
    assert {r["item"] for r in single}.isdisjoint({"i4", "i5", "i6"})
    dropped = client.post("/recommend", json={"histories": [["i4", "zz"]], "k": 3, "unknown": "drop"}).json()
    assert same(dropped["recommendations"][0], plain(rec.recommend([["i4"]], 3)[0]))
    popular = client.post("/recommend", json={"histories": [[], ["i2"]], "k": 3, "fallback": "popular"}).json()
    assert popular["recommendations"][0] == plain(rec.recommend([[]], 3, fallback="popular")[0])
    assert len(client.post("/recommend", json={"histories": [["i1"]]}).json()["recommendations"][0]) == 10


def test_concurrent_single_histories_share_a_model_call(rec: Recommender) -> None:
    """Requests that queue while the model is busy are scored in one call, each answered as alone."""
    started = threading.Event()

    release = threading.Event()

    class Slow(Recommender):  # the first call holds the model until the others have queued
        def users(self, histories):
            if not started.is_set():
                started.set()
                release.wait(10)
            return super().users(histories)

    slow = Slow(rec.model, rec.config, rec.items, rec.device, rec.run_dir)
    histories = [[f"i{(s + j) % 30 + 1}" for j in range(1 + s % 5)] for s in range(16)]
    with serving(create_app(slow, batch_window_ms=5)) as url, httpx.Client(base_url=url, timeout=10) as client:
        first = threading.Thread(target=client.post, args=("/recommend",), kwargs={"json": {"histories": [["i1"]]}})
        first.start()
        assert started.wait(5)
        with ThreadPoolExecutor(16) as pool:
            pending = [pool.submit(client.post, "/recommend", json={"histories": [h], "k": 4,
                                                                    "exclude_seen": len(h) > 2}) for h in histories]
            time.sleep(1.0)  # the 16 requests reach the server and queue behind the held model call
            release.set()
            answers = [f.result() for f in pending]
        first.join()
        text = client.get("/metrics").text
    for history, answer in zip(histories, answers):
        assert answer.status_code == 200
        expected = rec.recommend([history], 4, exclude_seen=len(history) > 2)[0]
        assert same(answer.json()["recommendations"][0], plain(expected))
    assert metric(text, "mlsa4rec_batch_size_sum") == 17
    assert metric(text, "mlsa4rec_batch_size_count") <= 4, "16 requests queued behind a busy model share calls"


BAD = [  # (body, the field the error names)
    ({"k": 3}, "histories: Field required"),
    ({"histories": "i1 i2"}, "histories: Input should be a valid list"),
    ({"histories": ["i1"]}, "histories[0]: Input should be a valid list"),
    ({"histories": [["i1", True]]}, "histories[0][1]: an item id must be a string or an integer"),
    ({"histories": [["i1", 2.5]]}, "histories[0][1]: an item id must be a string or an integer"),
    ({"histories": [["i1", None]]}, "histories[0][1]: an item id must be a string or an integer"),
    ({"histories": [["x" * 300]]}, "histories[0][0]: an item id has at most 256 characters"),
    ({"histories": []}, "histories: List should have at least 1 item"),
    ({"histories": [["i1"]], "k": "5"}, "k: Input should be a valid integer"),
    ({"histories": [["i1"]], "k": 2.0}, "k: Input should be a valid integer"),
    ({"histories": [["i1"]], "k": 0}, "k: Input should be greater than or equal to 1"),
    ({"histories": [["i1"]], "k": 10**12}, "k: Input should be less than or equal to 20"),
    ({"histories": [["i1"]], "exclude_seen": "yes"}, "exclude_seen: Input should be a valid boolean"),
    ({"histories": [["i1"]], "unknown": "skip"}, "unknown: Input should be 'error' or 'drop'"),
    ({"histories": [["i1"]], "fallback": "random"}, "fallback: Input should be 'popular'"),
    ({"histories": [["i1"]], "colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"histories": [["i1"]] * 5}, "histories: List should have at most 4 items"),
    ({"histories": [["i1"] * 21]}, "histories[0]: List should have at most 20 items"),
    ({"histories": [["i1"]], "exclude": ["i2"] * 21}, "exclude: List should have at most 20 items"),
    ([["i1"]], "body: Input should be a valid dictionary"),
    (None, "body: Field required"),
]


@pytest.mark.parametrize(("body", "message"), BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_recommend_bodies_are_422_naming_the_field(server, body, message: str) -> None:
    client, _ = server
    answer = client.post("/recommend", content=b"" if body is None else json.dumps(body).encode(),
                         headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    error = answer.json()
    assert error["error"].startswith("invalid request: ") and message in error["error"], error
    assert error["detail"][0]["field"] == message.split(":")[0]


def test_unknown_ids_bad_json_and_oversized_bodies(server) -> None:
    client, _ = server
    answer = client.post("/recommend", json={"histories": [["i1", "nope", "x"]], "k": 3})
    assert answer.status_code == 422
    assert answer.json()["error"].startswith("unknown item id(s) 'nope', 'x': the run was not trained on them")
    empty = client.post("/recommend", json={"histories": [["i1"], []]})
    assert empty.status_code == 422 and empty.json()["error"].startswith("history 1 is empty")
    for raw in (b"{not json", b'{"histories": [["i1"]]', b"\xff\xfe\x00"):
        answer = client.post("/recommend", content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == 400 and "error" in answer.json()
    big = json.dumps({"histories": [["i1"] * 20] * 4, "exclude": ["i" + "9" * 250] * 20}).encode()
    assert len(big) > LIMITS["max_body_bytes"]
    answer = client.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "over the limit of 4096 bytes" in answer.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts what arrives
        for _ in range(10):
            yield b" " * 1000

    answer = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert client.get("/nowhere").status_code == 404 and client.put("/recommend").status_code == 405
    assert client.get("/health").status_code == 200  # the server is still fine


def test_every_post_needs_a_json_content_type(server) -> None:
    """Without Content-Type: application/json a POST is a 415 naming the header, not a 422 about the body."""
    client, _ = server
    posts = [path for path, methods in client.get("/openapi.json").json()["paths"].items()
             if "requestBody" in methods.get("post", {})]  # a reload is a POST without a body
    assert posts == ["/recommend", "/sessions/{session_id}/events", "/models/sasrec/recommend",
                     "/models/sasrec/sessions/{session_id}/events"]
    bodies = {"/recommend": b'{"histories": [["i1"]]}', "/sessions/{session_id}/events": b'{"items": ["i1"]}'}
    for path in posts:
        url, body = path.replace("{session_id}", "ctype"), bodies[path.removeprefix("/models/sasrec")]
        for headers in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"},
                        {"content-type": "application/jsonx"}):
            answer = client.post(url, content=body, headers=headers)
            assert answer.status_code == 415, (url, headers, answer.text)
            assert "Content-Type: application/json" in answer.json()["error"]
        for good in ("application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.api+json"):
            assert client.post(url, content=body, headers={"content-type": good}).status_code == 200, good
    spec = client.get("/openapi.json").json()["paths"]
    assert all("415" in spec[path]["post"]["responses"] for path in posts)


def test_an_unreadable_body_is_a_400_saying_why(server) -> None:
    client, _ = server
    for raw in (b"\xff\xfe\x00", b'{"histories": [["\xff"]]}', b"[" * 3000):  # under the 4096-byte limit
        answer = client.post("/recommend", content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == 400
        assert answer.json()["error"] == ("the body cannot be read as JSON (it is not UTF-8 text, or it is nested too "
                                          "deeply); send a JSON object")


def test_exclusions_over_http_follow_the_unknown_rule(server, rec: Recommender) -> None:
    client, _ = server
    for histories in ([["i4", "i5"]], [["i4"], ["i5"]]):  # the merged single-history path and the direct one
        refused = client.post("/recommend", json={"histories": histories, "exclude": ["i6", "nope"]})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error.startswith("unknown item id(s) in \"exclude\" 'nope'") and 'pass "unknown": "drop"' in error
        kept = client.post("/recommend", json={"histories": histories, "exclude": ["i6", "nope"], "unknown": "drop"})
        assert kept.status_code == 200
        for got, expected in zip(kept.json()["recommendations"], rec.recommend(histories, 10, exclude=["i6"])):
            assert same(got, plain(expected))
    string = client.post("/recommend", json={"histories": [["i1"]], "exclude": "i1"})
    assert string.status_code == 422 and string.json()["detail"][0]["field"] == "exclude"
    assert client.post("/sessions/ex/events", json={"items": ["i3"]}).status_code == 200
    refused = client.get("/sessions/ex/recommendations", params={"exclude": ["i6", "nope"]})
    assert refused.status_code == 422 and "'nope'" in refused.json()["error"]
    assert "pass unknown=drop" in refused.json()["error"]
    kept = client.get("/sessions/ex/recommendations", params={"exclude": ["i6", "nope"], "unknown": "drop"})
    local = rec.session()
    local.add("i3")
    assert kept.status_code == 200 and same(kept.json()["recommendations"], plain(local.recommend(exclude=["i6"])))


# --- sessions --------------------------------------------------------------------------------------
def test_sessions_end_to_end(server, rec: Recommender) -> None:
    client, _ = server
    answer = client.post("/sessions/user-1/events", json={"items": ["i3", "i4"]})
    assert answer.status_code == 200 and answer.json() == {"session": "user-1", "length": 2, "added": 2,
                                                           "dropped": []}
    assert client.post("/sessions/user-1/events", json={"items": ["i5"]}).json()["length"] == 3
    refused = client.post("/sessions/user-1/events", json={"items": ["i6", "nope"]})
    assert refused.status_code == 422 and "unknown item id(s) 'nope'" in refused.json()["error"]
    dropped = client.post("/sessions/user-1/events", json={"items": ["i6", "nope"], "unknown": "drop"}).json()
    assert dropped == {"session": "user-1", "length": 4, "added": 1, "dropped": ["nope"]}  # i6 added once
    local = rec.session()
    for item in ("i3", "i4", "i5", "i6"):
        local.add(item)
    got = client.get("/sessions/user-1/recommendations", params={"k": 5, "exclude_seen": "true",
                                                                 "exclude": ["i7", "i8"]})
    assert got.status_code == 200 and got.json()["length"] == 4
    assert same(got.json()["recommendations"], plain(local.recommend(5, exclude_seen=True, exclude=["i7", "i8"])))
    assert len(client.get("/sessions/user-1/recommendations").json()["recommendations"]) == 10
    for params, field in (({"k": 0}, "k"), ({"k": 21}, "k"), ({"k": "many"}, "k"), ({"exclude_seen": "perhaps"},
                                                                                    "exclude_seen")):
        bad = client.get("/sessions/user-1/recommendations", params=params)
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == field
    for body, field in (({"items": []}, "items"), ({"items": "i1"}, "items"), ({"items": [["i1"]]}, "items[0]"),
                        ({"items": ["i1"], "when": 5}, "when"), ({}, "items"), ({"items": ["i1"] * 21}, "items")):
        bad = client.post("/sessions/user-1/events", json=body)
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == field, bad.text
    assert client.post("/sessions/bad%20id!/events", json={"items": ["i1"]}).json()["detail"][0]["field"] == \
        "session_id"
    empty = client.post("/sessions/empty/events", json={"items": ["zz"], "unknown": "drop"}).json()
    assert empty["length"] == 0 and empty["dropped"] == ["zz"]
    assert "no events yet" in client.get("/sessions/empty/recommendations").json()["error"]
    popular = client.get("/sessions/empty/recommendations", params={"k": 3, "fallback": "popular"}).json()
    assert popular["recommendations"] == plain(rec.popular(3))
    assert client.delete("/sessions/user-1").json() == {"session": "user-1", "deleted": True}
    for gone in (client.delete("/sessions/user-1"), client.get("/sessions/user-1/recommendations"),
                 client.get("/sessions/never/recommendations")):
        assert gone.status_code == 404 and "no session" in gone.json()["error"]


def test_sessions_beyond_the_cap_drop_the_least_recently_used(server) -> None:
    client, _ = server
    for sid in ("a", "b", "c"):
        assert client.post(f"/sessions/{sid}/events", json={"items": ["i1"]}).status_code == 200
    assert client.get("/sessions/a/recommendations").status_code == 200  # a is now the most recent
    assert client.post("/sessions/d/events", json={"items": ["i2"]}).status_code == 200  # drops b
    assert client.get("/sessions/b/recommendations").status_code == 404
    assert all(client.get(f"/sessions/{sid}/recommendations").status_code == 200 for sid in ("a", "c", "d"))
    text = client.get("/metrics").text
    assert metric(text, "mlsa4rec_sessions") == 3 and metric(text, "mlsa4rec_sessions_dropped_total", reason="lru") >= 1


def test_streaming_sessions_and_idle_expiry(streaming) -> None:
    client, rec = streaming
    local = rec.session()
    for item in ("i9", "i10", "i11"):
        local.add(item)
    client.post("/sessions/s1/events", json={"items": ["i9"]})
    client.post("/sessions/s1/events", json={"items": ["i10", "i11"]})
    got = client.get("/sessions/s1/recommendations", params={"k": 4}).json()
    assert same(got["recommendations"], plain(local.recommend(4)))
    # single histories with batching off answer as the recommender does
    one = client.post("/recommend", json={"histories": [["i9", "i10", "i11"]], "k": 4}).json()
    assert same(one["recommendations"][0], plain(rec.recommend([["i9", "i10", "i11"]], 4)[0]))
    time.sleep(2.3)  # past the 2 s ttl: expired when touched
    assert client.get("/sessions/s1/recommendations").status_code == 404
    for sid in ("s2", "s3"):
        client.post(f"/sessions/{sid}/events", json={"items": ["i1"]})
    assert client.get("/health").json()["sessions"] == 2
    deadline = time.monotonic() + 5  # untouched: the periodic sweep drops them
    while client.get("/health").json()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/health").json()["sessions"] == 0
    text = client.get("/metrics").text
    assert metric(text, "mlsa4rec_sessions") == 0 and metric(text, "mlsa4rec_sessions_dropped_total",
                                                             reason="idle") == 3
    assert client.post("/sessions/s2/events", json={"items": ["i2"]}).json()["length"] == 1  # starts afresh


# --- metrics, failures, fuzz -----------------------------------------------------------------------
def test_metrics_count_requests_latency_and_sessions(server) -> None:
    client, _ = server
    before = client.get("/metrics").text
    client.post("/recommend", json={"histories": [["i1"]], "k": 2})
    client.post("/recommend", json={"histories": [["i1"]], "k": 0})
    client.get("/sessions/missing/recommendations")
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    for labels, added in (({"endpoint": "/recommend", "method": "POST", "status": "200"}, 1),
                          ({"endpoint": "/recommend", "method": "POST", "status": "422"}, 1),
                          ({"endpoint": "/sessions/{session_id}/recommendations", "method": "GET", "status": "404"},
                           1)):
        assert metric(text, "mlsa4rec_http_requests_total", **labels) - \
            metric(before, "mlsa4rec_http_requests_total", **labels) == added
    assert metric(text, "mlsa4rec_http_request_duration_seconds_count", endpoint="/recommend") >= 2
    assert 'mlsa4rec_http_request_duration_seconds_bucket{endpoint="/recommend",le="0.005"}' in text
    assert re.search(r"^mlsa4rec_sessions \d", text, re.M) and "# TYPE mlsa4rec_sessions gauge" in text
    assert metric(text, "mlsa4rec_http_requests_total", endpoint="/recommend", method="POST", status="413") >= 1


def test_an_internal_failure_is_a_500_without_a_traceback(rec: Recommender) -> None:
    class Broken(Recommender):
        def users(self, histories):
            raise RuntimeError("the model broke")

    broken = Broken(rec.model, rec.config, rec.items, rec.device, rec.run_dir)
    with serving(create_app(broken, batch_window_ms=1)) as url:
        for body in ({"histories": [["i1"]]}, {"histories": [["i1"], ["i2"]]}):
            answer = httpx.post(url + "/recommend", json=body, timeout=10)
            assert answer.status_code == 500 and answer.json() == {"error": INTERNAL}
        text = httpx.get(url + "/metrics").text
        assert metric(text, "mlsa4rec_http_requests_total", endpoint="/recommend", method="POST", status="500") == 2


def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] * 2 if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 3, 30, 31, 2**31, -(2**63), 10**30, rng.randint(-100, 100)])
    if kind == "float":
        return rng.choice([0.0, 2.5, -1e308, float("nan"), float("inf"), rng.random()])
    if kind == "str":
        return rng.choice(["", "i1", "i30", "zz", "popular", "drop", "error", "\u00e9\u4e2d\U0001f600", "\x00",
                           "x" * rng.randint(0, 400), "true", "10"])
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    keys = ["histories", "k", "exclude_seen", "exclude", "unknown", "fallback", "items", "other", ""]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def _fuzz_body(rng: random.Random, endpoint: str) -> bytes:
    choice = rng.random()
    if choice < 0.1:  # not JSON at all
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    if choice < 0.45:
        body = _random_json(rng)
    else:  # a valid body with one field replaced or added
        body = ({"histories": [["i1", "i2"]], "k": 3} if endpoint == "recommend" else {"items": ["i1"]})
        body[rng.choice(list(body) + ["exclude", "exclude_seen", "unknown", "fallback", "extra"])] = _random_json(rng)
    return json.dumps(body).encode()


def test_fuzzed_requests_never_fail_with_5xx(server) -> None:
    client, _ = server
    rng = random.Random(1234)
    statuses: dict[int, int] = {}
    for _ in range(120):
        endpoint = rng.choice(["recommend", "events", "query"])
        sid = rng.choice(["f1", "f2", "a.b", "%00", "x" * 200, "\u00e9", "..", "-"])
        if endpoint == "query":
            params = {rng.choice(["k", "exclude_seen", "exclude", "fallback", "other"]): str(_random_json(rng))
                      for _ in range(rng.randint(0, 3))}
            answer = client.get(f"/sessions/{sid}/recommendations", params=params)
        else:
            url = "/recommend" if endpoint == "recommend" else f"/sessions/{sid}/events"
            answer = client.post(url, content=_fuzz_body(rng, endpoint),
                                 headers={"content-type": rng.choice(["application/json", "text/plain", ""])})
        statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
        assert answer.status_code < 500, (answer.status_code, answer.text)
        assert "Traceback" not in answer.text
        assert answer.status_code == 200 or set(answer.json()) <= {"error", "detail"}, answer.text
    assert client.get("/health").status_code == 200
    assert len(statuses) >= 3, statuses  # the fuzz reached more than one kind of answer


# --- configuration and the CLI ------------------------------------------------------------------------
def test_create_app_refuses_bad_limits(rec: Recommender) -> None:
    for bad in ({"max_k": 0}, {"max_histories": 2.5}, {"session_ttl_s": -1}, {"batch_window_ms": -1},
                {"max_batch": True}, {"max_sessions": float("inf")}):
        with pytest.raises(MLSA4RecError, match=next(iter(bad))):
            create_app(rec, **bad)


def test_cli_serve(capsys, monkeypatch, runs: dict[str, Path], tmp_path: Path) -> None:
    code = main(["serve", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "is not a run directory" in err and err.count("\n") == 1
    served = {}

    def fake_run(self, sockets=None):  # stands in for serving forever
        served["app"], served["port"] = self.config.app, sockets[0].getsockname()[1]
        served["grace"] = self.config.timeout_graceful_shutdown

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    code = main(["serve", "--run-dir", str(runs["sasrec"]), "--port", "0", "--max-k", "7", "--session-ttl", "60",
                 "--batch-window-ms", "0"])
    out = capsys.readouterr().out
    assert code == 0 and f"http://127.0.0.1:{served['port']}" in out
    assert served["app"].state.limits == {**DEFAULTS, "max_k": 7, "session_ttl_s": 60.0, "batch_window_ms": 0.0}
    # SIGTERM waits a bounded time for the requests in flight
    assert served["grace"] == getattr(serving_http, "SHUTDOWN_GRACE_S", None) == 10.0
    with socket.create_server(("127.0.0.1", 0)) as taken:
        code = main(["serve", "--run-dir", str(runs["sasrec"]), "--port", str(taken.getsockname()[1])])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: cannot listen on 127.0.0.1:")
    assert main(["serve", "--run-dir", str(runs["sasrec"]), "--max-k", "0"]) == 2
    assert "error: --max-k must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--run-dir", str(runs["sasrec"]), "--session-ttl", "0"]) == 2
    assert "error: --session-ttl must be at least" in capsys.readouterr().err


def test_sigterm_answers_the_requests_in_flight_then_exits_0(runs: dict[str, Path], tmp_path: Path) -> None:
    """``mlsa4rec serve`` under load gets SIGTERM: new connections are refused, the requests in flight
    (bodies half sent when the signal came) are answered with 200, one that never finishes is cut off
    after the grace period, and the process exits 0 within that bound."""
    grace = 3.0
    code = ("import sys; from mlsa4rec.serving import http; http.SHUTDOWN_GRACE_S = float(sys.argv[1]); "
            "from mlsa4rec.cli import main; sys.exit(main(sys.argv[2:]))")
    err = (tmp_path / "serve.err").open("w")
    proc = subprocess.Popen([sys.executable, "-c", code, str(grace), "serve", "--run-dir", str(runs["sasrec"]),
                             "--port", "0", "--no-access-log", "--batch-window-ms", "1"],
                            stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", proc.stdout.readline()).group(1))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        body = json.dumps({"histories": [["i1", "i2"]], "k": 3}).encode()
        head = (f"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        in_flight = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(4)]
        stuck = socket.create_connection(("127.0.0.1", port), timeout=20)
        for sock in [*in_flight, stuck]:
            sock.sendall(head + body[:10])
        statuses: list[int | str] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=url, timeout=20) as client:
                while not stop.is_set():
                    try:
                        statuses.append(client.post("/recommend", json={"histories": [["i3"]], "k": 2}).status_code)
                    except httpx.TransportError:  # closed or refused once the server is shutting down
                        statuses.append("closed")
                        time.sleep(0.01)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        refused_by = time.monotonic() + 10  # no longer accepting, soon (polled: CI machines are slow)
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except OSError:
                break
            assert time.monotonic() < refused_by, "the server still accepts connections after SIGTERM"
            time.sleep(0.05)
        for sock in in_flight:  # the rest of each body, then its answer
            sock.sendall(body[10:])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            sock.close()
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            assert len(json.loads(answer.split(b"\r\n\r\n", 1)[1])["recommendations"][0]) == 3
        stop.set()
        for worker in workers:
            worker.join(20)
        code = proc.wait(timeout=grace + 20)
        took = time.monotonic() - signalled
        cut_off = stuck.recv(65536)
        stuck.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        err.close()
    log = (tmp_path / "serve.err").read_text()
    assert code == 0, log
    assert took < grace + 10, took  # the stuck request is cut off after the grace period (+ interpreter exit)...
    assert cut_off.startswith(b"HTTP/1.1 503 ") and b"shutting down" in cut_off, cut_off  # ...with a 503
    assert statuses.count(200) >= 4 and set(statuses) <= {200, "closed"}, statuses
    assert "Traceback" not in log and "POST /recommend was cut off by the shutdown" in log, log


def test_cli_help_shows_the_defaults() -> None:
    from mlsa4rec.cli import SERVE_LIMITS, build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    helps = {a.dest: a.help for a in serve._actions}
    for flag, name in SERVE_LIMITS.items():
        value = DEFAULTS[name]
        shown = str(int(value)) if float(value).is_integer() else str(value)
        assert f"(default {shown}" in helps[flag], (flag, helps[flag])


def test_a_model_that_scores_nan_is_a_500_naming_it_not_a_422(runs: dict[str, Path], monkeypatch) -> None:
    """Broken numbers are the run's fault, not the request's: 500 with one line, and the log says so."""
    import torch

    broken = Recommender.from_run(runs["sasrec"])
    real = broken.users  # the representations every ranking starts from
    monkeypatch.setattr(broken, "users", lambda histories: torch.full_like(real(histories), float("nan")))
    with serving(create_app(broken, batch_window_ms=0)) as url, httpx.Client(base_url=url, timeout=10) as client:
        answer = client.post("/recommend", json={"histories": [["i1", "i2"]], "k": 3})
    assert answer.status_code == 500 and "NaN or infinite" in answer.json()["error"], answer.text


def test_a_limit_too_large_for_the_request_schema_is_one_error_line(runs: dict[str, Path], capsys) -> None:
    """Found by the fuzz module at scale 10: --max-history-length 1000000000000 failed inside
    pydantic while building the schema (a traceback)."""
    for flag in ("--max-history-length", "--max-histories", "--max-k", "--max-body-bytes"):
        assert main(["serve", "--run-dir", str(runs["sasrec"]), flag, "1000000000000"]) == 2
        err = capsys.readouterr().err
        assert f"error: {flag} must be at most 2,147,483,647" in err and "Traceback" not in err, err
