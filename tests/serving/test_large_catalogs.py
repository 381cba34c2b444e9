"""Serving large catalogs: the exact top k found chunk by chunk (ops.ranking.top_items) equals the
full-row path serving used before (B x (n_items + 1) scores, masked, sorted), for batch histories,
sessions, JSON-lines batches and the HTTP endpoints; broken numbers are caught in every chunk; and
the approximate index (serving.ann, usearch) as an option."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import tiny_run

from mlsa4rec.cli import main
from mlsa4rec.errors import BrokenModelError, MLSA4RecError
from mlsa4rec.ops.ranking import top_items, top_scores
from mlsa4rec.serving import Recommender
from mlsa4rec.serving.batch import recommend_lines

MODELS = ["sasrec", "gru4rec", "mamba4rec", "mlsa4rec", "mlsa4rec-causal", "bert4rec", "lrurec"]
STREAMING = ["gru4rec", "mamba4rec", "mlsa4rec-causal", "lrurec"]
CHUNKS = [None, 1, 7, 29, 30]  # None: the default (one chunk here); 30 = n_items: one chunk too

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_top_k(rec: Recommender, scores: torch.Tensor, k: int, seen=None, exclude=()) -> list[list[tuple]]:
    """Serving's full-row path as it was: copy the B x (n_items + 1) scores, refuse broken numbers,
    mask the exclusions, sort the whole row (stable, so the lower id wins a tie: the documented rule;
    torch.topk, used before, leaves the order of tied items unspecified), drop what is -inf."""
    if not bool(torch.isfinite(scores[:, 1:]).all()):
        raise BrokenModelError("NaN or infinite values")
    scores = scores.clone()
    banned = rec.exclude_ids(exclude)
    if banned:
        scores[:, banned] = float("-inf")
    for row, ids in enumerate(seen or []):
        if list(ids):
            scores[row, list(ids)] = float("-inf")
    values, index = torch.sort(scores, dim=1, descending=True, stable=True)
    k = min(k, scores.shape[1] - 1)
    return [[(rec.items.token(int(i)), float(v)) for v, i in zip(vs[:k], ix[:k]) if v > float("-inf")]
            for vs, ix in zip(values.tolist(), index.tolist())]


def pairs(answer) -> list[tuple]:
    return [(r.item, r.score) for r in answer]


def assert_same(got: list[tuple], want: list[tuple], exact: bool) -> None:
    """Same items in the same order; the same scores bit for bit (one chunk: the very product) or to
    float32 rounding (several chunks: products of their own shapes)."""
    assert [item for item, _ in got] == [item for item, _ in want]
    if exact:
        assert [score for _, score in got] == [score for _, score in want]
    else:
        assert np.allclose([s for _, s in got], [s for _, s in want], rtol=1e-6, atol=1e-6)


def histories(rec: Recommender, seed: int, count: int = 6) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    lengths = [1, 3, 8, 12, 5, 2][:count]
    return [[rec.items.token(int(i)) for i in rng.integers(1, rec.items.n_items + 1, n)] for n in lengths]


def recommender(model: str, chunk: int | None, **options) -> Recommender:
    return Recommender.from_run(tiny_run(model), **({} if chunk is None else {"score_chunk": chunk}), **options)


# --- the exact chunked top k against the full row -------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_recommend_equals_the_full_row_path(model: str) -> None:
    """Every model, several chunk sizes, k (up to the whole catalog), exclude_seen and exclude."""
    for chunk in CHUNKS:
        rec = recommender(model, chunk)
        exact = chunk is None or chunk >= rec.items.n_items
        given = histories(rec, seed=len(model))
        ids = [rec.to_ids(h) for h in given]
        full = rec.scores(ids)
        for k in (1, 5, 10, rec.items.n_items):
            for exclude_seen in (False, True):
                for exclude in ([], [given[0][0], rec.items.token(3)]):
                    got = rec.recommend(given, k, exclude_seen=exclude_seen, exclude=exclude)
                    want = reference_top_k(rec, full, k, ids if exclude_seen else None, exclude)
                    for g, w in zip(got, want):
                        assert_same(pairs(g), w, exact)


@pytest.mark.parametrize("model", STREAMING + ["sasrec"])
def test_a_sessions_recommendations_equal_the_full_row_path(model: str) -> None:
    for chunk in (None, 4):
        rec = recommender(model, chunk)
        session = rec.session()
        for step, item in enumerate(histories(rec, seed=3)[3]):
            session.add(item)
            for k, exclude_seen, exclude in ((5, False, []), (rec.items.n_items, True, [rec.items.token(1)])):
                got = session.recommend(k, exclude_seen=exclude_seen, exclude=exclude)
                want = reference_top_k(rec, session.scores(), k, [session.seen] if exclude_seen else None, exclude)[0]
                assert_same(pairs(got), want, chunk is None), (step, k)


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_json_lines_and_http_answers_equal_the_full_row_path() -> None:
    """The batch file path and the HTTP endpoints (the micro-batcher, /recommend with several
    histories, a session) rank through the chunks, each request with its own k and exclusions."""
    from fastapi.testclient import TestClient

    from mlsa4rec.serving.http import create_app

    rec = recommender("sasrec", 7)
    given = histories(rec, seed=11)
    lines = [json.dumps({"history": h, "k": 2 + i, "exclude_seen": i % 2 == 1, "exclude": [rec.items.token(i + 1)]})
             for i, h in enumerate(given)]
    out = io.StringIO()
    assert recommend_lines(rec, lines, out, 10) == (0, len(lines))
    answers = [json.loads(line)["recommendations"] for line in out.getvalue().splitlines()]

    def want(i: int, history: list[str], k: int, exclude_seen: bool, exclude: list[str]) -> list[tuple]:
        ids = rec.to_ids(history)
        return reference_top_k(rec, rec.scores([ids]), k, [ids] if exclude_seen else None, exclude)[0]

    for i, (history, answer) in enumerate(zip(given, answers)):
        assert_same([(r["item"], r["score"]) for r in answer], want(i, history, 2 + i, i % 2 == 1,
                                                                     [rec.items.token(i + 1)]), exact=False)
    with TestClient(create_app(rec, batch_window_ms=1)) as client:
        for i, history in enumerate(given):  # one history: through the micro-batcher
            body = {"histories": [history], "k": 3 + i, "exclude_seen": True, "exclude": [rec.items.token(2)]}
            got = client.post("/recommend", json=body).json()["recommendations"][0]
            assert_same([(r["item"], r["score"]) for r in got], want(i, history, 3 + i, True, [rec.items.token(2)]),
                        exact=False)
        got = client.post("/recommend", json={"histories": given, "k": 4}).json()["recommendations"]
        for i, (history, answer) in enumerate(zip(given, got)):
            assert_same([(r["item"], r["score"]) for r in answer], want(i, history, 4, False, []), exact=False)
        client.post("/sessions/u1/events", json={"items": given[2]})
        got = client.get("/sessions/u1/recommendations", params={"k": 6, "exclude_seen": True}).json()
        assert_same([(r["item"], r["score"]) for r in got["recommendations"]],
                    want(0, given[2], 6, True, []), exact=False)


def _tied(rec: Recommender) -> torch.Tensor:
    """Give the model an item table of small integers with many equal rows, and return integer user
    vectors: every score is exact whatever the product's shape, and most of them tie."""
    with torch.no_grad():
        weight = rec.model.item_embedding.weight
        values = torch.randint(-1, 2, (4, weight.shape[1]), generator=torch.Generator().manual_seed(0)).float()
        weight[1:] = values[torch.arange(weight.shape[0] - 1) % 4]
    return torch.randint(-2, 3, (5, weight.shape[1]), generator=torch.Generator().manual_seed(1)).float()


@pytest.mark.parametrize("chunk", CHUNKS)
def test_ties_go_to_the_lower_id_in_every_chunking(chunk: int | None) -> None:
    rec = recommender("sasrec", chunk)
    users = _tied(rec)
    scores = (users @ rec.item_table.t()).float()
    scores[:, 0] = float("-inf")
    seen = [[1, 5], [], [2, 3, 4, 30], [7], []]
    for k in (1, 4, 9, 30):
        got = rec.rank(users, k, seen, exclude=[rec.items.token(6)])
        want = reference_top_k(rec, scores, k, seen, [rec.items.token(6)])
        assert [pairs(g) for g in got] == want
        # the full-row top_k (public, on scores already made) follows the same rule
        assert [pairs(g) for g in rec.top_k(scores, k, seen, [rec.items.token(6)])] == want
        for row in want:  # the rule itself: best first, the lower id first among equal scores
            ids = [rec.items.ids([item])[0][0] for item, _ in row]
            assert all(a[1] > b[1] or (a[1] == b[1] and i < j) for a, b, i, j in zip(row, row[1:], ids, ids[1:]))


def test_rank_takes_one_k_and_exclusions_per_row() -> None:
    rec = recommender("gru4rec", 4)
    users = rec.users([rec.to_ids(h) for h in histories(rec, seed=2, count=3)])
    scores = (users @ rec.item_table.t()).float()
    scores[:, 0] = float("-inf")
    got = rec.rank_ids(users, [1, 30, 4], [[], list(range(1, 26)), [3]])
    assert [len(g) for g in got] == [1, 5, 4]  # 25 of 30 excluded: 5 left
    for row, (k, excluded) in enumerate(((1, []), (30, list(range(1, 26))), (4, [3]))):
        want = reference_top_k(rec, scores[row:row + 1], k, [excluded])[0]
        assert_same(pairs(got[row]), want, exact=False)
    with pytest.raises(MLSA4RecError, match="one k per row"):
        rec.rank_ids(users, [1, 2])


# --- broken numbers, per chunk ------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 4])
def test_nan_or_infinite_scores_are_caught_in_every_chunk(chunk: int | None) -> None:
    """A broken item in any chunk, a broken user vector, and an item broken but excluded (checked
    before the exclusions, as the full row was): a BrokenModelError naming the history."""
    for item in (2, 17, 30):  # the first, a middle and the last chunk
        for bad in (float("nan"), float("inf"), float("-inf")):
            rec = recommender("sasrec", chunk)
            with torch.no_grad():
                rec.model.item_embedding.weight[item] = bad
            given = histories(rec, seed=1, count=2)
            with pytest.raises(BrokenModelError, match="history 0 with NaN or infinite values"):
                rec.recommend(given, 5, exclude=[rec.items.token(item)])
    rec = recommender("gru4rec", chunk)
    session = rec.session()
    session.add("i1")
    session.representation = torch.full_like(session.representation, float("nan"))  # a broken stream
    with pytest.raises(BrokenModelError, match="history 0 with NaN or infinite values"):
        session.recommend(3)


def test_top_items_and_top_scores_directly() -> None:
    """The ops helper against a stable sort of the whole matrix, integer data (exact at any chunk)."""
    g = torch.Generator().manual_seed(0)
    user = torch.randint(-2, 3, (9, 4), generator=g).float()
    table = torch.randint(-2, 3, (41, 4), generator=g).float()
    rows, items = torch.randint(0, 9, (30,), generator=g), torch.randint(1, 41, (30,), generator=g)
    full = (user @ table.t()).float()
    full[:, 0] = float("-inf")
    masked = full.clone()
    masked[rows, items] = float("-inf")
    values, index = torch.sort(masked[:, 1:], dim=1, descending=True, stable=True)
    for chunk in (1, 3, 40, 1000):
        for k in (1, 7, 40, 99):
            ids, scores = top_items(user, table, k, chunk, (rows, items))
            assert torch.equal(ids, index[:, :min(k, 40)] + 1) and torch.equal(scores, values[:, :min(k, 40)])
    ids, scores = top_scores(masked[:, 1:], 7, 1)
    assert torch.equal(ids, index[:, :7] + 1) and torch.equal(scores, values[:, :7])
    candidates = torch.arange(40, 0, -1).expand(9, 40)  # ids given per column, in any order
    ids, scores = top_scores(masked[:, 1:].flip(1), 7, candidates)
    assert torch.equal(ids, index[:, :7] + 1) and torch.equal(scores, values[:, :7])
    table[11, 2] = float("nan")
    with pytest.raises(MLSA4RecError, match="NaN"):
        top_items(user, table, 3, 7)
    with pytest.raises(ValueError, match="row 0"):
        top_items(user, table, 3, 7, broken=lambda row: ValueError(f"row {row}"))
    for bad in ({"chunk": 0}, {"k": 0}, {"exclude": (torch.tensor([9]), torch.tensor([1]))}):
        with pytest.raises(MLSA4RecError):
            top_items(**{"user": user, "table": table, "k": 3, "chunk": 7, **bad})


def test_scores_and_options_are_checked() -> None:
    rec = recommender("sasrec", None)
    assert rec.scores([[1, 2]]).shape == (1, rec.items.n_items + 1)  # the public full row is unchanged
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(MLSA4RecError, match="score_chunk must be a whole number of at least 1"):
            recommender("sasrec", bad)
    with pytest.raises(MLSA4RecError, match="ann must be None or 'hnsw'"):
        recommender("sasrec", None, ann="faiss")
    with pytest.raises(MLSA4RecError, match="ann_index needs ann='hnsw'"):
        recommender("sasrec", None, ann_index="x.usearch")


# --- the approximate index ----------------------------------------------------------------------------

def _usearch():
    return pytest.importorskip("usearch.index", reason="the ann extra is not installed (pip install 'mlsa4rec[ann]')")


@pytest.mark.parametrize("model", ["sasrec", "gru4rec", "bert4rec"])
def test_the_index_finds_the_exact_answer_on_a_small_catalog(model: str, tmp_path: Path) -> None:
    """30 items, a search breadth above them: the graph search is exhaustive, so the answers equal
    the exact ones, exclusions applied (over-fetched, then filtered)."""
    _usearch()
    exact = recommender(model, None)
    approx = recommender(model, None, ann="hnsw", ann_index=tmp_path / "items.usearch")
    assert approx.index is not None and (tmp_path / "items.usearch").is_file()
    assert (tmp_path / "items.usearch.json").is_file()
    given = histories(exact, seed=5)
    for k in (1, 10, 30):
        for exclude_seen in (False, True):
            got = approx.recommend(given, k, exclude_seen=exclude_seen, exclude=[given[1][0]])
            want = exact.recommend(given, k, exclude_seen=exclude_seen, exclude=[given[1][0]])
            for g, w in zip(got, want):
                assert_same(pairs(g), pairs(w), exact=False)
                assert given[1][0] not in [r.item for r in g]
    session, alone = approx.session(), exact.session()
    for item in given[3]:
        session.add(item)
        alone.add(item)
    assert_same(pairs(session.recommend(5, exclude_seen=True)), pairs(alone.recommend(5, exclude_seen=True)),
                exact=False)


def test_a_saved_index_is_loaded_and_refused_for_another_table(tmp_path: Path, monkeypatch) -> None:
    _usearch()
    from mlsa4rec.serving import ann

    path = tmp_path / "items.usearch"
    recommender("sasrec", None, ann="hnsw", ann_index=path)
    info = json.loads((tmp_path / "items.usearch.json").read_text())
    assert info["n_items"] == 30 and info["metric"] == "ip" and info["library"] == "usearch"

    def no_build(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(ann.ItemIndex, "build", no_build)
    again = recommender("sasrec", None, ann="hnsw", ann_index=path, ann_ef=40)
    assert again.index.expansion_search == 40 and again.recommend([["i1"]], 3)
    with pytest.raises(MLSA4RecError, match="was built from another item table"):
        recommender("gru4rec", None, ann="hnsw", ann_index=path)
    (tmp_path / "items.usearch.json").unlink()
    with pytest.raises(MLSA4RecError, match="has no items.usearch.json beside it"):
        recommender("sasrec", None, ann="hnsw", ann_index=path)


def test_the_index_over_a_larger_random_catalog_recalls_most_of_the_top_10() -> None:
    """5,000 random items: the index's top 10 (scored exactly) against the exact top 10; answers
    best first with exact scores, exclusions honoured, and a row excluding nearly everything exact."""
    _usearch()
    from mlsa4rec.serving.ann import ItemIndex

    rec = recommender("sasrec", None)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(5001, 16, generator=g)
    rec.__dict__["item_table"] = table  # the cached table (a served run's weights do not change)
    rec.items = type(rec.items)([f"x{i}" for i in range(1, 5001)], np.ones(5000, dtype=np.int64))
    rec.index = ItemIndex.build(table, threads=1)
    users = torch.randn(50, 16, generator=g)
    excluded = [list(range(1, 40))] * 49 + [list(range(1, 4998))]
    got = rec.rank_ids(users, 10, excluded)
    want_ids, want_scores = top_items(users, table, 10, 1000, (torch.arange(50).repeat_interleave(
        torch.tensor([len(e) for e in excluded])), torch.tensor([i for e in excluded for i in e])))
    found = [len({r.item for r in g} & {f"x{i}" for i in w}) for g, w in zip(got, want_ids.tolist())]
    assert sum(found) / (10 * 50) >= 0.9, found
    assert [r.item for r in got[49]] == [f"x{i}" for i in want_ids[49].tolist() if i > 4997]  # 3 left: exact
    for answer in got:
        assert all(a.score >= b.score for a, b in zip(answer, answer[1:]))
        assert not {r.item for r in answer} & {f"x{i}" for i in range(1, 40)}
    for answer, ids, scores in zip(got, want_ids.tolist(), want_scores.tolist()):  # the scores are exact
        exact = dict(zip(ids, scores))
        for r in answer:
            if int(r.item[1:]) in exact:
                assert abs(r.score - exact[int(r.item[1:])]) < 1e-5


def test_a_missing_usearch_is_one_error_line_naming_the_extra(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "usearch", None)
    monkeypatch.setitem(sys.modules, "usearch.index", None)
    with pytest.raises(MLSA4RecError, match=r"ann='hnsw' needs the usearch package, which is not installed: "
                                            r"pip install 'mlsa4rec\[ann\]'$"):
        recommender("sasrec", None, ann="hnsw")
    run = str(tiny_run("sasrec"))
    assert main(["recommend", "--run-dir", run, "--history", "i1 i2", "--ann", "hnsw"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --ann hnsw needs the usearch package, which is not installed: pip install 'mlsa4rec[ann]'\n"
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    assert main(["serve", "--run-dir", run, "--ann", "hnsw", "--port", "0"]) == 2
    assert capsys.readouterr().err == err


def test_cli_options(capsys, tmp_path: Path) -> None:
    run = str(tiny_run("sasrec"))
    assert main(["recommend", "--run-dir", run, "--history", "i1 i2", "--json", "--score-chunk", "4"]) == 0
    chunked = json.loads(capsys.readouterr().out)
    assert main(["recommend", "--run-dir", run, "--history", "i1 i2", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert [r["item"] for r in chunked["recommendations"]] == [r["item"] for r in whole["recommendations"]]
    assert main(["recommend", "--run-dir", run, "--history", "i1", "--score-chunk", "0"]) == 2
    assert "error: --score-chunk must be a whole number of at least 1, got 0" in capsys.readouterr().err
    assert main(["recommend", "--run-dir", run, "--history", "i1", "--ann-ef", "8"]) == 2
    assert "error: --ann-ef needs --ann hnsw" in capsys.readouterr().err
    _usearch()
    index = tmp_path / "items.usearch"
    assert main(["recommend", "--run-dir", run, "--history", "i1 i2", "--json", "--ann", "hnsw",
                 "--ann-index", str(index)]) == 0
    approximate = json.loads(capsys.readouterr().out)["recommendations"]  # 30 items: every one found
    assert_same([(r["item"], r["score"]) for r in approximate], [(r["item"], r["score"]) for r in
                                                                  whole["recommendations"]], exact=False)
    assert index.is_file()


def test_an_index_exported_beside_the_onnx_graphs_is_served(tmp_path: Path, monkeypatch) -> None:
    """``export --ann hnsw`` writes item_index.usearch (listed in export.json), which ``--ann-index``
    then loads without building."""
    _usearch()
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason="the onnx extra is not installed (pip install 'mlsa4rec[onnx]')")
    from mlsa4rec.fileio import sha256_file
    from mlsa4rec.serving import ann
    from mlsa4rec.serving.export import export_run

    run = tiny_run("sasrec")
    out = tmp_path / "export"
    assert main(["export", "--run-dir", str(run), "--output", str(out), "--ann", "hnsw", "-q"]) == 0
    meta = json.loads((out / "export.json").read_text())
    for name in ("item_index.usearch", "item_index.usearch.json"):
        assert meta["files"][name]["sha256"] == sha256_file(out / name)
    assert meta["item_index"]["file"] == "item_index.usearch" and meta["item_index"]["metric"] == "ip"
    monkeypatch.setattr(ann.ItemIndex, "build", lambda *args, **kwargs: pytest.fail("built again"))
    rec = Recommender.from_run(run, ann="hnsw", ann_index=out / "item_index.usearch")
    exact = Recommender.from_run(run)
    assert_same(pairs(rec.recommend([["i1", "i2"]], 5)[0]), pairs(exact.recommend([["i1", "i2"]], 5)[0]), exact=False)
    with pytest.raises(MLSA4RecError, match=r"ann must be None or 'hnsw' \(--ann hnsw\), got 'ivf'"):
        export_run(run, tmp_path / "other", ann="ivf")
