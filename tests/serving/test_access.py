"""Access control, CORS and the offline docs of the HTTP service, against real uvicorn servers on
127.0.0.1: bearer tokens on every endpoint but the open ones, CORS preflights and CORS headers on
errors, /docs and /redoc without a CDN, hostile Authorization headers, and `mlsa4rec serve`'s
--token-file, $MLSA4REC_TOKENS, --private-metrics, --public-docs and --cors-origin."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[dev]')")
pytest.importorskip("fastapi_offline", reason="the serve extra is not installed (pip install -e '.[dev]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[dev]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")

from test_http import metric, serving  # noqa: E402
from tiny_runs import tiny_run  # noqa: E402

from mlsa4rec.cli import build_parser, main  # noqa: E402
from mlsa4rec.errors import MLSA4RecError  # noqa: E402
from mlsa4rec.serving import Recommender  # noqa: E402
from mlsa4rec.serving import http as serving_http  # noqa: E402
from mlsa4rec.serving.http import DOCS_STATIC, create_app  # noqa: E402
from mlsa4rec.serving.middleware import BearerAuth, BodyLimit, Cors, JsonSpelling, Metrics  # noqa: E402

TOKEN = "tok-A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6"
OTHER = "second_token.0123456789~+/="
ORIGIN = "https://shop.example.com"
NO_TOKEN = "this server needs a token: send the header Authorization: Bearer TOKEN"
BAD_TOKEN = "the token is not valid"
BODY = {"histories": [["i1", "i2", "i3"]], "k": 3}


@pytest.fixture(scope="module")
def rec() -> Recommender:
    return Recommender.from_run(tiny_run("sasrec"))


def _client(app) -> Iterator[httpx.Client]:
    """``app`` served by uvicorn, and a client of it sending no token unless told."""
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def guarded(rec: Recommender) -> Iterator[httpx.Client]:
    """Two tokens, /metrics open, docs closed, CORS for ORIGIN, a 4 KiB body limit."""
    yield from _client(create_app(rec, tokens=[TOKEN, OTHER], cors_origins=[ORIGIN], max_body_bytes=4096,
                                  batch_window_ms=0))


@pytest.fixture(scope="module")
def private(rec: Recommender) -> Iterator[httpx.Client]:
    """One token, /metrics closed, docs open, no CORS."""
    yield from _client(create_app(rec, tokens=[TOKEN], metrics_public=False, docs_public=True, batch_window_ms=0))


@pytest.fixture(scope="module")
def open_server(rec: Recommender) -> Iterator[httpx.Client]:
    """No tokens, no CORS: today's behaviour."""
    yield from _client(create_app(rec, batch_window_ms=0))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_of(answer: httpx.Response) -> str:
    """The one-line JSON error of ``answer``."""
    assert answer.headers["content-type"] == "application/json", answer.headers
    assert "\n" not in answer.text.strip() and "Traceback" not in answer.text
    return answer.json()["error"]


# (method, path, JSON body) of every guarded endpoint, in an order that works with a token
GUARDED = [("POST", "/recommend", BODY), ("POST", "/sessions/s1/events", {"items": ["i1", "i2"]}),
           ("GET", "/sessions/s1/recommendations", None), ("DELETE", "/sessions/s1", None),
           ("GET", "/openapi.json", None), ("GET", "/docs", None), ("GET", "/redoc", None),
           ("GET", "/docs/oauth2-redirect", None), ("GET", f"{DOCS_STATIC}/swagger-ui.css", None)]


# --- tokens ------------------------------------------------------------------------------------------
def test_every_endpoint_needs_a_valid_token(guarded: httpx.Client) -> None:
    for i, (method, path, body) in enumerate(GUARDED):
        missing = guarded.request(method, path, json=body)
        assert missing.status_code == 401 and error_of(missing) == NO_TOKEN, (path, missing.text)
        assert missing.headers["www-authenticate"] == "Bearer"
        for header in ("Basic dXNlcjpwYXNz", f"Token {TOKEN}", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x",
                       "Bearer wrong", f"Bearer {TOKEN} {OTHER}", TOKEN):
            refused = guarded.request(method, path, json=body, headers={"Authorization": header})
            assert refused.status_code == 401 and error_of(refused) == BAD_TOKEN, (path, header, refused.text)
            assert refused.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        allowed = guarded.request(method, path, json=body, headers=bearer(TOKEN if i % 2 else OTHER))
        assert allowed.status_code == 200, (path, allowed.text)


def test_a_request_without_a_token_is_refused_before_its_body_is_read(guarded: httpx.Client) -> None:
    big = json.dumps({"histories": [["i1"] * 2000]})  # over the 4 KiB limit
    assert guarded.post("/recommend", content=big, headers={"Content-Type": "application/json"}).status_code == 401
    answer = guarded.post("/recommend", content=big, headers={"Content-Type": "application/json", **bearer(TOKEN)})
    assert answer.status_code == 413
    for content, kind in ((b"\xff{not json", "application/json"), (b"k=3", "text/plain")):  # 400 and 415 with one
        assert guarded.post("/recommend", content=content, headers={"Content-Type": kind}).status_code == 401


def test_health_is_open_and_metrics_open_unless_private(guarded: httpx.Client, private: httpx.Client) -> None:
    for client in (guarded, private):
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert "limits" in health.json() and TOKEN not in health.text
    assert guarded.get("/metrics").status_code == 200
    closed = private.get("/metrics")
    assert closed.status_code == 401 and error_of(closed) == NO_TOKEN
    assert private.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    answer = private.get("/metrics", headers=bearer(TOKEN))
    assert answer.status_code == 200 and "mlsa4rec_http_requests_total" in answer.text


def test_docs_are_closed_with_tokens_unless_public(private: httpx.Client) -> None:
    for _, path, _ in GUARDED[4:]:  # the docs' pages, schema and scripts need no token with docs_public
        assert private.get(path).status_code == 200, path
    assert private.post("/recommend", json=BODY).status_code == 401  # the API still does
    assert private.get(f"{DOCS_STATIC}/missing.js").status_code == 404
    # the schema says which operations need the token, so the docs' Authorize button sends it
    spec = private.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, method in (("/recommend", "post"), ("/sessions/{session_id}", "delete"), ("/metrics", "get")):
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"bearer": []}] and "401" in operation["responses"], path
    assert "security" not in spec["paths"]["/health"]["get"]


def test_the_schema_of_an_open_server_names_no_token(open_server: httpx.Client, guarded: httpx.Client) -> None:
    spec = open_server.get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {}) and "security" not in json.dumps(spec["paths"])
    spec = guarded.get("/openapi.json", headers=bearer(TOKEN)).json()
    assert "security" not in spec["paths"]["/metrics"]["get"]  # metrics_public


def test_without_tokens_everything_stays_open(rec: Recommender, open_server: httpx.Client) -> None:
    for method, path, body in GUARDED:
        assert open_server.request(method, path, json=body).status_code == 200, path
    assert open_server.get("/metrics").status_code == 200
    for tokens in (None, [], ()):
        app = create_app(rec, tokens=tokens)
        assert [m.cls for m in app.user_middleware] == [Metrics, BodyLimit, JsonSpelling]
        assert app.state.access == {"tokens": 0, "metrics_public": True, "docs_public": False, "cors_origins": []}


def test_the_middlewares_run_in_the_right_order(rec: Recommender) -> None:
    """Metrics counts everything; CORS answers preflights and dresses errors; tokens before bodies."""
    app = create_app(rec, tokens=[TOKEN, TOKEN], cors_origins=["*"])
    assert [m.cls for m in app.user_middleware] == [Metrics, Cors, BearerAuth, BodyLimit, JsonSpelling]
    assert app.state.access == {"tokens": 1, "metrics_public": True, "docs_public": False, "cors_origins": ["*"]}


def test_create_app_refuses_bad_access_settings_without_showing_a_token(rec: Recommender) -> None:
    for bad, words in (({"tokens": TOKEN}, "not a str"), ({"tokens": ["has a space"]}, "tokens[0] is not a token"),
                       ({"tokens": [TOKEN, ""]}, "tokens[1]"), ({"tokens": [TOKEN, 5]}, "tokens[1]"),
                       ({"tokens": ["caf\u00e9-token"]}, "visible ASCII"),
                       ({"metrics_public": "no"}, "metrics_public must be True or False"),
                       ({"docs_public": 1}, "docs_public"), ({"cors_origins": ORIGIN}, "not a str"),
                       ({"cors_origins": [ORIGIN + "/"]}, f"write {ORIGIN} rather"),
                       ({"cors_origins": ["shop.example.com"]}, "scheme://host[:port]"),
                       ({"cors_origins": [""]}, "an origin is a string")):
        with pytest.raises(MLSA4RecError, match=re.escape(words)) as caught:
            create_app(rec, **bad)
        assert TOKEN not in str(caught.value) and "has a space" not in str(caught.value)
    app = create_app(rec, cors_origins=["HTTPS://Shop.Example.com:8443", "http://[::1]:3000", "http://10.0.0.2"])
    assert app.state.access["cors_origins"] == ["https://shop.example.com:8443", "http://[::1]:3000",
                                               "http://10.0.0.2"]


# --- hostile Authorization headers (sent byte for byte: httpx refuses some of them) --------------------
def raw_post(url: str, authorization: bytes | None) -> tuple[int, dict[str, str], bytes]:
    """POST /recommend with exactly this Authorization value (None: no header)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(BODY).encode()
    request = (b"POST /recommend HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\n"
               + (b"Authorization: " + authorization + b"\r\n" if authorization is not None else b"")
               + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, content = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, content


def test_hostile_authorization_headers_get_a_401_never_a_500(guarded: httpx.Client) -> None:
    url, token = str(guarded.base_url).rstrip("/"), TOKEN.encode()
    cases = [(None, 401), (b"", 401), (b"Bearer", 401), (b"Bearer  ", 401), (b"Bearer \t ", 401),
             (b"bearer " + token, 200), (b"BEARER  " + token, 200), (b"  Bearer " + token + b"  ", 200),
             (b"Bearer \xff\xfe\x80", 401), (b"Bearer " + token + "\u00e9".encode(), 401),
             (b"Bearer " + b"A" * 10240, 401), (b"Bearer\t" + token, 401), (token, 401),
             (b"Bearer " + token + b" " + token, 401), (b"Bearer " + token[:8], 401), (b"Bearer" + token, 401)]
    rng = random.Random(11)
    alphabet = bytes([*range(0x21, 0x7F), *range(0x80, 0x100), 0x20, 0x20, 0x20])
    for _ in range(40):
        prefix = rng.choice([b"", b"Bearer ", b"bearer ", b"Bearer", b"Basic "])
        cases.append((prefix + bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 300))), 401))
    for header, expected in cases:
        status, headers, content = raw_post(url, header)
        assert status == expected, (header[:40] if header else header, status, content[:200])
        if status == 401:
            answer = json.loads(content)
            assert set(answer) == {"error"} and answer["error"] in (NO_TOKEN, BAD_TOKEN) and b"\n" not in content
            assert headers["www-authenticate"].startswith("Bearer")
    assert guarded.get("/health").status_code == 200  # the server is still fine


# --- CORS --------------------------------------------------------------------------------------------
def preflight(client: httpx.Client, origin: str, path: str = "/recommend", method: str = "POST") -> httpx.Response:
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": "authorization, content-type"})


def test_a_preflight_from_an_allowed_origin_needs_no_token(guarded: httpx.Client) -> None:
    for path, method in (("/recommend", "POST"), ("/sessions/s9", "DELETE"), ("/sessions/s9/recommendations", "GET")):
        answer = preflight(guarded, ORIGIN, path, method)
        assert answer.status_code == 200, answer.text
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        assert method in answer.headers["access-control-allow-methods"]
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        assert int(answer.headers["access-control-max-age"]) > 0


def test_a_preflight_from_another_origin_is_refused(guarded: httpx.Client) -> None:
    answer = preflight(guarded, "https://evil.example.net")
    assert answer.status_code == 400 and "access-control-allow-origin" not in answer.headers
    assert "not allowed: origin" in error_of(answer)
    answer = preflight(guarded, ORIGIN, method="PUT")  # a method the service has no use for
    assert answer.status_code == 400 and "not allowed: method" in error_of(answer)


def test_errors_carry_the_cors_headers_for_an_allowed_origin(guarded: httpx.Client) -> None:
    """A page of an allowed origin can read why its request failed."""
    web = {"Origin": ORIGIN}
    big = json.dumps({"histories": [["i1"] * 2000]})
    answers = {
        401: guarded.post("/recommend", json=BODY, headers=web),
        413: guarded.post("/recommend", content=big, headers={**web, **bearer(TOKEN),
                                                               "Content-Type": "application/json"}),
        415: guarded.post("/recommend", content=b"k=3", headers={**web, **bearer(TOKEN), "Content-Type": "text/plain"}),
        422: guarded.post("/recommend", json={**BODY, "k": 0}, headers={**web, **bearer(TOKEN)}),
        404: guarded.get("/sessions/nobody/recommendations", headers={**web, **bearer(TOKEN)}),
        200: guarded.post("/recommend", json=BODY, headers={**web, **bearer(TOKEN)}),
    }
    for status, answer in answers.items():
        assert answer.status_code == status, (status, answer.text)
        assert answer.headers.get("access-control-allow-origin") == ORIGIN, (status, answer.headers)
    stranger = guarded.post("/recommend", json=BODY, headers={"Origin": "https://evil.example.net", **bearer(TOKEN)})
    assert stranger.status_code == 200 and "access-control-allow-origin" not in stranger.headers
    assert "access-control-allow-origin" not in guarded.post("/recommend", json=BODY, headers=bearer(TOKEN)).headers


def test_without_cors_origins_options_is_still_405(open_server: httpx.Client, private: httpx.Client) -> None:
    answer = preflight(open_server, ORIGIN)
    assert answer.status_code == 405 and "access-control-allow-origin" not in answer.headers
    assert open_server.options("/recommend").status_code == 405
    assert private.options("/recommend", headers=bearer(TOKEN)).status_code == 405
    assert preflight(private, ORIGIN).status_code == 401  # no CORS layer answers it, so it needs the token


def test_refused_requests_and_preflights_are_counted(guarded: httpx.Client) -> None:
    before = guarded.get("/metrics").text
    for _ in range(3):
        guarded.post("/recommend", json=BODY)
    guarded.get("/sessions/x/recommendations", headers={"Authorization": "Bearer wrong"})
    preflight(guarded, ORIGIN)
    after = guarded.get("/metrics").text
    for labels, added in ((("/recommend", "POST", "401"), 3), (("/sessions/{session_id}/recommendations", "GET",
                                                                 "401"), 1), (("/recommend", "OPTIONS", "200"), 1)):
        named = dict(zip(("endpoint", "method", "status"), labels))
        assert metric(after, "mlsa4rec_http_requests_total", **named) - \
            metric(before, "mlsa4rec_http_requests_total", **named) == added, labels


# --- offline docs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["open_server", "private"])
def test_docs_load_their_scripts_from_the_server_not_a_cdn(which: str, request: pytest.FixtureRequest) -> None:
    client: httpx.Client = request.getfixturevalue(which)
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        urls = re.findall(r'(?:src|href)="([^"]*)"', html.text)
        assert not [u for u in urls if re.match(r"(https?:)?//", u)], (page, urls)
        assert "cdn.jsdelivr" not in html.text and "fonts.googleapis" not in html.text
        scripts = re.findall(r'<script[^>]*\bsrc="([^"]+)"', html.text)
        styles = re.findall(r'<link[^>]*\brel="stylesheet"[^>]*\bhref="([^"]+)"', html.text)
        assert scripts and (styles or page == "/redoc"), (page, html.text)
        for url, kind in [(u, "javascript") for u in scripts] + [(u, "text/css") for u in styles]:
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url
            assert kind in asset.headers["content-type"], (url, asset.headers["content-type"])


# --- the command line ----------------------------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model fails the test: these errors must come first. $MLSA4REC_TOKENS is unset."""
    monkeypatch.delenv("MLSA4REC_TOKENS", raising=False)

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the access flags were checked")

    monkeypatch.setattr(Recommender, "from_run", loaded)


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(["serve", "--run-dir", "no-run-needed", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_bad_token_file_is_one_error_line(capsys, no_model, monkeypatch, tmp_path: Path) -> None:
    files = {"absent.txt": None, "latin1.txt": b"tok-\xe9t\xe9-0123\n", "comments.txt": b"# none yet\n\n   \n  # x\n",
             "empty.txt": b"", "spaced.txt": b"good-token-123\n  bad token here \n"}
    for name, content in files.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    monkeypatch.setenv("MLSA4REC_TOKENS", "env-token-1")  # the file is still the one used, and refused
    for name, words in (("absent.txt", "does not exist; write one token per line, e.g. with: umask 077; "),
                        ("latin1.txt", "is not UTF-8 text"), ("comments.txt", "holds no token"),
                        ("empty.txt", "holds no token"), ("spaced.txt", ", line 2: a token is one word")):
        err = refused(capsys, "--token-file", str(tmp_path / name))
        assert f"--token-file {tmp_path / name}" in err and words in err, err
        assert "bad token" not in err and "good-token" not in err  # never a token, even a broken one
    assert "is a directory" in refused(capsys, "--token-file", str(tmp_path))
    locked = tmp_path / "locked.txt"
    locked.write_text(TOKEN)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: make the read fail as it does for anyone else
        real = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "denied"))
                            if self.name == "locked.txt" else real(self))
    err = refused(capsys, "--token-file", str(locked))
    assert f"cannot read --token-file {locked}: permission denied" in err and "chmod 600" in err


def test_flags_that_need_tokens_and_bad_origins_are_refused(capsys, no_model, monkeypatch) -> None:
    for flag in ("--private-metrics", "--public-docs"):
        err = refused(capsys, flag)
        assert f"{flag} only makes sense with tokens: give --token-file PATH" in err and "MLSA4REC_TOKENS" in err
    monkeypatch.setenv("MLSA4REC_TOKENS", "")  # set but empty: no tokens either
    assert "only makes sense with tokens" in refused(capsys, "--public-docs")
    for origin, words in ((f"{ORIGIN}/", f"write {ORIGIN} rather"), ("shop.example.com", "scheme://host[:port]"),
                          ("https://", "scheme://host[:port]"), ("", "an origin is a string")):
        err = refused(capsys, "--cors-origin", ORIGIN, "--cors-origin", origin)
        assert err.startswith("error: --cors-origin: ") and words in err, err
    for value in (" , ,\n", ",,"):
        monkeypatch.setenv("MLSA4REC_TOKENS", value)
        assert "$MLSA4REC_TOKENS holds no token" in refused(capsys)
    monkeypatch.setenv("MLSA4REC_TOKENS", f"{TOKEN}, caf\u00e9-token")
    err = refused(capsys)
    assert "$MLSA4REC_TOKENS: its token 2 is not one word of visible ASCII" in err and "caf" not in err


def test_no_option_takes_a_token_on_the_command_line(capsys, no_model) -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    taking = {o for a in serve._actions if type(a).__name__ != "_RefuseToken" for o in a.option_strings if "token" in o}
    assert taking == {"--token-file"}
    for argv in (["--token", "s3cret-value"], ["--token=s3cret-value"], ["--tokens", "s3cret-value"],
                 ["--tok", "s3cret-value"]):
        err = refused(capsys, *argv)
        assert "s3cret" not in err and ("--token-file" in err or "ambiguous" in err), err


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict:
    """`mlsa4rec serve` up to the server's start: what create_app got and the app it made (nothing is served)."""
    seen: dict = {}
    real = serving_http.create_app

    def recording(recommender, **kwargs):
        seen["kwargs"] = kwargs
        seen["app"] = real(recommender, **kwargs)
        return seen["app"]

    def fake_run(self, sockets=None):  # stands in for serving forever
        seen["port"] = sockets[0].getsockname()[1]

    monkeypatch.setattr(serving_http, "create_app", recording)
    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    monkeypatch.delenv("MLSA4REC_TOKENS", raising=False)
    return seen


def serve(capsys, caplog, *argv: str) -> str:
    """Run `mlsa4rec serve` on the tiny run; its access line (and no token anywhere in its output)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mlsa4rec"):
        assert main(["serve", "--run-dir", str(tiny_run("sasrec")), "--port", "0", *argv]) == 0
    captured = capsys.readouterr()
    shown = captured.out + captured.err + caplog.text
    for token in (TOKEN, OTHER, "env-token", "one-AAAA", "two-BBBB"):
        assert token not in shown, token
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("access: ")]
    assert len(lines) == 1, caplog.text
    return lines[0]


def test_cli_tokens_reach_the_app(capsys, caplog, started: dict, monkeypatch, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_bytes("\ufeff# made with secrets.token_urlsafe\r\n  tok-one-AAAA  \r\n\r\ntok-two-BBBB\r\n"
                       "# tok-old-CCCC\r\ntok-one-AAAA\r\n".encode())
    tokens.chmod(0o600)
    line = serve(capsys, caplog, "--token-file", str(tokens), "--private-metrics", "--public-docs",
                 "--cors-origin", ORIGIN, "--cors-origin", "http://localhost:3000")
    kwargs = started["kwargs"]
    assert kwargs["tokens"] == ["tok-one-AAAA", "tok-two-BBBB", "tok-one-AAAA"] and kwargs["metrics_public"] is False
    assert kwargs["docs_public"] is True and kwargs["cors_origins"] == [ORIGIN, "http://localhost:3000"]
    assert line == (f"access: 2 tokens from {tokens}; /health open, /metrics closed, docs open; "
                    f"CORS for {ORIGIN}, http://localhost:3000")
    assert [m.cls for m in started["app"].user_middleware] == [Metrics, Cors, BearerAuth, BodyLimit, JsonSpelling]

    monkeypatch.setenv("MLSA4REC_TOKENS", f"env-token-1, env-token-2\n\t{TOKEN},{TOKEN}")
    line = serve(capsys, caplog)
    assert started["kwargs"]["tokens"] == ["env-token-1", "env-token-2", TOKEN, TOKEN]
    assert line == "access: 3 tokens from MLSA4REC_TOKENS; /health open, /metrics open, docs closed"
    assert "can be read by every user" not in caplog.text
    tokens.chmod(0o644)
    serve(capsys, caplog, "--token-file", str(tokens))  # the file wins over the variable
    assert started["kwargs"]["tokens"] == ["tok-one-AAAA", "tok-two-BBBB", "tok-one-AAAA"]
    assert f"--token-file {tokens} can be read by every user of this machine; chmod 600 it" in caplog.text

    monkeypatch.setenv("MLSA4REC_TOKENS", "")
    line = serve(capsys, caplog, "--cors-origin", "*")
    assert started["kwargs"]["tokens"] == [] and started["kwargs"]["cors_origins"] == ["*"]
    assert line == (f"access: open to anyone who can reach 127.0.0.1:{started['port']} (no --token-file or "
                    "MLSA4REC_TOKENS); CORS for *")
    assert "MLSA4REC_TOKENS is set but empty" in caplog.text
    monkeypatch.delenv("MLSA4REC_TOKENS")
    assert serve(capsys, caplog).startswith("access: open to anyone who can reach 127.0.0.1:")
    assert [m.cls for m in started["app"].user_middleware] == [Metrics, BodyLimit, JsonSpelling]
