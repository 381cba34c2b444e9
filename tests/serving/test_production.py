"""The HTTP service as teams run it: several models by name, reloading a run under traffic, and
sessions in a real Redis shared by two servers, kept across a SIGKILL, and Redis going away."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[dev]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")

from test_http import same, serving  # noqa: E402
from tiny_runs import RUNS, tiny_run  # noqa: E402

from conftest import RedisServer  # noqa: E402
from mlsa4rec.cli import main  # noqa: E402
from mlsa4rec.serving import Recommender  # noqa: E402
from mlsa4rec.serving.http import create_app  # noqa: E402
from mlsa4rec.training.run import train  # noqa: E402

BODY = {"histories": [["i1", "i2", "i3"]], "k": 5}
REPO = Path(__file__).resolve().parents[2]


def plain(answer) -> list[dict]:
    return [{"item": r.item, "score": r.score} for r in answer]


def test_several_models_by_name_and_a_default(tmp_path: Path) -> None:
    recs = {"shop-a": Recommender.from_run(tiny_run("sasrec")), "shop-b": Recommender.from_run(tiny_run("gru4rec"))}
    with serving(create_app(recs, batch_window_ms=0)) as url, httpx.Client(base_url=url, timeout=10) as client:
        listed = client.get("/models").json()
        assert listed["default"] is None and [m["name"] for m in listed["models"]] == ["shop-a", "shop-b"]
        assert [m["model"] for m in listed["models"]] == ["sasrec", "gru4rec"]
        for name, rec in recs.items():
            got = client.post(f"/models/{name}/recommend", json=BODY).json()["recommendations"][0]
            assert same(got, plain(rec.recommend(BODY["histories"], 5)[0]))
        root = client.post("/recommend", json=BODY)
        assert root.status_code == 404 and "several models are served (shop-a, shop-b)" in root.json()["error"]
        # one session id, two models: two sessions
        client.post("/models/shop-a/sessions/u/events", json={"items": ["i1", "i2"]})
        client.post("/models/shop-b/sessions/u/events", json={"items": ["i5"]})
        lengths = [client.get(f"/models/{n}/sessions/u/recommendations").json()["length"] for n in recs]
        assert lengths == [2, 1]
        health = client.get("/health").json()
        assert health["models"] == ["shop-a", "shop-b"] and health["sessions"] == 2
    with serving(create_app(recs, default_model="shop-b")) as url:
        got = httpx.post(url + "/recommend", json=BODY).json()["recommendations"][0]
        assert same(got, plain(recs["shop-b"].recommend(BODY["histories"], 5)[0]))


def retrain(out: Path, seed: int) -> Path:
    model, settings = RUNS["sasrec"]
    data = tiny_run("sasrec").parent / "shop.inter"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Path(train(model, str(data), out, overrides={**settings, "seed": seed})["run_dir"])
    finally:
        torch.set_num_threads(before)


def test_a_reload_under_traffic_answers_every_request_and_re_encodes_the_old_sessions(tmp_path: Path) -> None:
    served = tmp_path / "served"
    shutil.copytree(tiny_run("sasrec"), served)
    newer = retrain(tmp_path / "newer", seed=11)
    old_rec, new_rec = Recommender.from_run(served), Recommender.from_run(newer)
    assert old_rec.fingerprint != new_rec.fingerprint
    errors: list[str] = []
    answers = 0
    stop = threading.Event()
    with serving(create_app({"shop": old_rec}, batch_window_ms=2)) as url:
        httpx.post(url + "/sessions/before/events", json={"items": ["i1", "i2"]})

        def traffic(i: int) -> None:
            nonlocal answers
            with httpx.Client(base_url=url, timeout=20) as client:
                while not stop.is_set():
                    for path, body in (("/recommend", BODY), (f"/models/shop/sessions/t{i}/events", {"items": ["i3"]})):
                        got = client.post(path, json=body)
                        if got.status_code != 200:
                            errors.append(f"{path}: {got.status_code} {got.text}")
                        answers += 1

        threads = [threading.Thread(target=traffic, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        os.rename(served, tmp_path / "old")  # a newer training published where the served run was
        os.rename(newer, served)
        reloaded = httpx.post(url + "/models/shop/reload", timeout=60)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        assert reloaded.status_code == 200, reloaded.text
        body = reloaded.json()
        assert body["previous"] == old_rec.fingerprint[:16] and body["model"]["fingerprint"] == new_rec.fingerprint[:16]
        assert not errors and answers > 20, errors[:3]
        got = httpx.post(url + "/recommend", json=BODY).json()["recommendations"][0]
        assert same(got, plain(new_rec.recommend(BODY["histories"], 5)[0]))
        # a session of the run before: its events re-encoded by the new run (the batch path on them)
        old_session = httpx.get(url + "/sessions/before/recommendations", params={"k": 5}).json()
        again = new_rec.session()
        again.add_many(["i1", "i2"])
        assert old_session["length"] == 2 and same(old_session["recommendations"],
                                                    plain(new_rec.top_k(again.scores(), 5)[0]))
        # a run that cannot be loaded: one line, 409, and the run before is still served
        (served / "model.safetensors").write_bytes(b"broken")
        failed = httpx.post(url + "/models/shop/reload", timeout=60)
        assert failed.status_code == 409 and failed.json()["error"].startswith("cannot reload 'shop': ")
        assert "still served" in failed.json()["error"]
        assert same(httpx.post(url + "/recommend", json=BODY).json()["recommendations"][0], got)


# --- Redis -----------------------------------------------------------------------------------------
def test_two_servers_share_sessions_in_redis(redis_server: RedisServer) -> None:
    rec = Recommender.from_run(tiny_run("gru4rec"))
    alone = rec.session()
    alone.add_many(["i1", "i2", "i3", "i4"])
    with serving(create_app(rec, sessions=redis_server.url)) as one, serving(
            create_app(Recommender.from_run(tiny_run("gru4rec")), sessions=redis_server.url)) as two:
        assert httpx.get(one + "/health").json()["session_store"] == redis_server.url
        assert httpx.get(one + "/health").json()["sessions"] is None
        assert httpx.post(one + "/sessions/shared/events", json={"items": ["i1", "i2"]}).json()["length"] == 2
        assert httpx.post(two + "/sessions/shared/events", json={"items": ["i3"]}).json()["length"] == 3
        assert httpx.post(one + "/sessions/shared/events", json={"items": ["i4"]}).json()["length"] == 4
        expected = plain(rec.top_k(alone.scores(), 5)[0])
        for url in (one, two):
            got = httpx.get(url + "/sessions/shared/recommendations", params={"k": 5}).json()
            assert got["length"] == 4 and same(got["recommendations"], expected)
        assert httpx.delete(two + "/sessions/shared").status_code == 200
        assert httpx.get(one + "/sessions/shared/recommendations").status_code == 404


def start_server(run: Path, redis_url: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen([sys.executable, "-m", "mlsa4rec", "serve", "--run-dir", str(run), "--port", "0",
                                "--sessions", redis_url, "--no-access-log"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    assert found, line + process.stderr.read()[-2000:]
    return process, found.group(1)


def test_a_server_killed_and_started_again_continues_its_sessions_exactly(redis_server: RedisServer) -> None:
    run = tiny_run("mlsa4rec-causal")
    rec = Recommender.from_run(run)
    alone = rec.session()
    alone.add_many(["i1", "i2", "i3", "i4", "i5"])
    process, url = start_server(run, redis_server.url)
    try:
        httpx.post(url + "/sessions/kept/events", json={"items": ["i1", "i2", "i3"]}, timeout=20)
        process.send_signal(signal.SIGKILL)
        process.wait(20)
        process, url = start_server(run, redis_server.url)
        assert httpx.post(url + "/sessions/kept/events", json={"items": ["i4", "i5"]}, timeout=20).json()["length"] == 5
        got = httpx.get(url + "/sessions/kept/recommendations", params={"k": 5}, timeout=20).json()
        assert same(got["recommendations"], plain(rec.top_k(alone.scores(), 5)[0]))
    finally:
        process.kill()
        process.wait(20)
        process.stdout.close()
        process.stderr.close()


def test_redis_down_is_a_503_for_sessions_only_and_the_service_recovers(redis_server: RedisServer) -> None:
    redis = RedisServer(redis_server.binary)
    redis.start()
    rec = Recommender.from_run(tiny_run("sasrec"))
    try:
        with serving(create_app(rec, sessions=redis.url)) as url:
            assert httpx.post(url + "/sessions/s/events", json={"items": ["i1"]}).status_code == 200
            redis.stop()
            for answer in (httpx.post(url + "/sessions/s/events", json={"items": ["i2"]}, timeout=20),
                           httpx.get(url + "/sessions/s/recommendations", timeout=20),
                           httpx.delete(url + "/sessions/s", timeout=20)):
                assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
                assert re.fullmatch(r"the session store redis://127\.0\.0\.1:\d+/0 cannot be reached \(\w+\); "
                                    r"try again shortly", answer.json()["error"]), answer.text
            assert httpx.post(url + "/recommend", json=BODY).status_code == 200  # no session: unaffected
            assert httpx.get(url + "/health").status_code == 200
            redis.start()
            assert httpx.post(url + "/sessions/s/events", json={"items": ["i2"]}, timeout=20).json()["length"] == 1
    finally:
        redis.stop()


@pytest.mark.parametrize(("argv", "message"), [
    (["--run-dir", "a=x", "--run-dir", "a=y"], "two --run-dir flags serve the name 'a'"),
    (["--run-dir", "a=", "--run-dir", "b=y"], "name the run directory after '='"),
    (["--run-dir", "x", "--default-model", "nope"], "--default-model 'nope' is not one of the models served (x)"),
    (["--run-dir", "x", "--sessions", "mongodb://h"], "--sessions takes memory or a Redis URL"),
    (["--run-dir", "x", "--workers", "2"], "--workers 2 needs --sessions redis://HOST:PORT/DB"),
    (["--run-dir", "x", "--workers", "0"], "--workers must be at least 1"),
])
def test_bad_serve_flags_are_one_line_before_anything_loads(capsys, argv: list[str], message: str) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_worker_processes_share_the_port_and_the_sessions(redis_server: RedisServer) -> None:
    run = tiny_run("gru4rec")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen([sys.executable, "-m", "mlsa4rec", "serve", "--run-dir", str(run), "--port", "0",
                                "--sessions", redis_server.url, "--w=2", "--no-access-log"],  # argparse's abbreviation
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        found = re.search(r"with 2 worker processes \(pids (\d+), (\d+)\) on (http://127\.0\.0\.1:\d+)",
                          process.stdout.readline())
        assert found, process.stderr.read()[-2000:]
        url = found.group(3)
        with httpx.Client(base_url=url, timeout=20) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            lengths = []
            for _ in range(20):  # new connections: the kernel hands them to either worker
                with httpx.Client(base_url=url, timeout=20) as fresh:
                    lengths.append(fresh.post("/sessions/both/events", json={"items": ["i2"]}).json()["length"])
            assert lengths == list(range(1, 21))
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()
        process.wait(20)
        process.stdout.close()
        process.stderr.close()
