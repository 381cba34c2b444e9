"""Serving a trained run: raw ids in and out, equal to the evaluation path, sessions, the CLI."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import tiny_run
from torch.utils import _pytree as pytree

from mlsa4rec.cli import main
from mlsa4rec.data.sampling import eval_batches
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.runs.loading import load_run
from mlsa4rec.serving import Recommender
from mlsa4rec.serving.batch import recommend_lines

MODELS = ["sasrec", "gru4rec", "mamba4rec", "mlsa4rec"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs() -> dict[str, Path]:
    return {name: tiny_run(name) for name in MODELS}


def test_items_json_maps_model_ids_to_the_file_tokens(runs: dict[str, Path]) -> None:
    rec = Recommender.from_run(runs["sasrec"])
    loaded = load_run(runs["sasrec"])
    assert rec.items.tokens == loaded.data.item_tokens[1:].tolist()
    assert all(t.startswith("i") for t in rec.items.tokens)
    counts = np.bincount(loaded.data.items, minlength=loaded.data.n_items + 1)[1:]
    held_out = len(loaded.data.eval_targets("valid")) + len(loaded.data.eval_targets("test"))
    assert rec.items.counts.sum() == counts.sum() - held_out


@pytest.mark.parametrize("model", list(MODELS))
def test_recommend_equals_the_evaluation_path(runs: dict[str, Path], model: str) -> None:
    """The test users' histories, given as raw ids, get the scores evaluation gives them."""
    loaded = load_run(runs[model])
    rec = Recommender.from_run(runs[model])
    data, length = loaded.data, loaded.config["MAX_ITEM_LIST_LENGTH"]
    batch = next(eval_batches(data, "test", length, 64, trim=loaded.model.padding_invariant))
    with torch.inference_mode():
        expected = loaded.model.full_sort_scores(batch.item_seq, batch.lengths).float()
    histories = [[data.item_tokens[i] for i in row[:n]] for row, n in zip(batch.item_seq.tolist(),
                                                                              batch.lengths.tolist())]
    ids = [rec.to_ids(h) for h in histories]
    assert torch.allclose(rec.scores(ids), expected, atol=1e-5, rtol=1e-5)
    answers = rec.recommend(histories, k=5)
    top = torch.topk(expected, 5, dim=1).indices.tolist()
    for answer, best in zip(answers, top):
        assert [r.item for r in answer] == [data.item_tokens[i] for i in best]
        assert all(a.score >= b.score for a, b in zip(answer, answer[1:]))
    if model == "mlsa4rec":  # the faithful model's output depends on padding: always padded to L
        assert rec.batch([[1, 2]])[0].shape[1] == length


def test_long_history_uses_the_last_L_items(runs: dict[str, Path]) -> None:
    rec = Recommender.from_run(runs["sasrec"])
    long = [f"i{(k % 30) + 1}" for k in range(40)]
    assert rec.recommend([long], k=7) == rec.recommend([long[-rec.max_seq_length:]], k=7)


def test_unknown_ids_empty_histories_and_exclusions(runs: dict[str, Path], caplog) -> None:
    rec = Recommender.from_run(runs["sasrec"])
    with pytest.raises(MLSA4RecError, match=r"unknown item id\(s\) 'nope', 'x'"):
        rec.recommend([["i1", "nope", "x"]])
    with caplog.at_level("WARNING", logger="mlsa4rec"):
        dropped = rec.recommend([["i1", "nope"]], unknown="drop")
    assert dropped == rec.recommend([["i1"]]) and "dropped unknown item id(s) 'nope'" in caplog.text
    with pytest.raises(MLSA4RecError, match="history 0 is empty"):
        rec.recommend([[]])
    popular = rec.recommend([[], ["i3"]], k=4, fallback="popular")[0]
    order = np.argsort(-rec.items.counts, kind="stable")[:4]
    assert [r.item for r in popular] == [rec.items.tokens[i] for i in order]
    assert [r.score for r in popular] == [float(rec.items.counts[i]) for i in order]
    seen = ["i3", "i4", "i5"]
    kept = rec.recommend([seen], k=rec.items.n_items, exclude_seen=True, exclude=["i9"])[0]
    assert {r.item for r in kept}.isdisjoint(seen + ["i9"]) and len(kept) == rec.items.n_items - 4
    for bad in (0, -1, rec.items.n_items + 1, 2.5, True):
        with pytest.raises(MLSA4RecError, match="k must be a whole number"):
            rec.recommend([seen], k=bad)
    with pytest.raises(MLSA4RecError, match="list of lists"):
        rec.recommend(["i1 i2"])


def test_a_session_that_re_encodes_equals_recommend(runs: dict[str, Path]) -> None:
    rec = Recommender.from_run(runs["sasrec"])
    assert not rec.streams
    session = rec.session()
    history = [f"i{k}" for k in (3, 4, 5, 6, 7, 8, 9, 10, 11, 12)]
    for item in history:
        session.add(item)
    assert session.recommend(k=5) == rec.recommend([history], k=5)[0]
    restored = rec.session()
    restored.load_state_dict(session.state_dict())
    # against the batch path on the whole history (not against the session it came from): every
    # remaining item, so a seen item (i3, i4 are older than the last L = 8) kept or lost shows
    everything = rec.items.n_items - len(history)
    assert restored.recommend(k=everything, exclude_seen=True) == rec.recommend([history], k=everything,
                                                                               exclude_seen=True)[0]
    assert restored.length == 10 and restored.recent == rec.to_ids(history[-8:])
    restored.add("i13")  # and it goes on as the history with one more event
    assert restored.recommend(k=everything - 1, exclude_seen=True) == rec.recommend(
        [history + ["i13"]], k=everything - 1, exclude_seen=True)[0]
    assert not rec.session().add("nope", unknown="drop")
    assert rec.session().recommend(k=3, fallback="popular") == rec.recommend([[]], k=3, fallback="popular")[0]


def test_batch_lines_answer_every_line(runs: dict[str, Path]) -> None:
    rec = Recommender.from_run(runs["gru4rec"])
    lines = ['{"history": ["i1", "i2"], "k": 3, "id": "a"}', "", "not json", '{"history": ["i2", "zz"]}',
             '{"history": [], "k": 2}', '{"history": ["i5"], "exclude_seen": true, "exclude": ["i6"], "k": 2}',
             '{"history": "i5"}', '{"history": ["i5"], "k": 0}', '{"history": ["i5"], "colour": 1}']
    out = io.StringIO()
    failed, total = recommend_lines(rec, lines, out, k=4, fallback="popular")
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (failed, total, len(answers)) == (5, 8, 8)
    assert answers[0]["id"] == "a" and [r["item"] for r in answers[0]["recommendations"]] == \
        [r.item for r in rec.recommend([["i1", "i2"]], k=3)[0]]
    assert "not JSON" in answers[1]["error"] and "unknown item id(s) 'zz'" in answers[2]["error"]
    assert [a.get("line") for a in answers[1:3]] == [3, 4]  # input line numbers (the blank line 2 is skipped)
    assert len(answers[3]["recommendations"]) == 2  # the popular fallback
    assert {r["item"] for r in answers[4]["recommendations"]}.isdisjoint({"i5", "i6"})
    assert "list of item ids" in answers[5]["error"] and '"k" must be' in answers[6]["error"]
    assert "unknown field(s) colour" in answers[7]["error"]


def test_cli_recommend(capsys, runs: dict[str, Path], tmp_path: Path) -> None:
    code = main(["recommend", "--run-dir", str(runs["sasrec"]), "--history", "i1 i2 i3", "-k", "3", "--json"])
    out = json.loads(capsys.readouterr().out)["recommendations"]
    assert code == 0 and [r["item"] for r in out] == [r.item for r in
                                                      Recommender.from_run(runs["sasrec"]).recommend([["i1", "i2",
                                                                                                        "i3"]], 3)[0]]
    code = main(["recommend", "--run-dir", str(runs["sasrec"]), "--history", "i1 nope"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: unknown item id(s) 'nope'") and err.count("\n") == 1
    requests = tmp_path / "in.jsonl"
    requests.write_text('{"history": ["i1"], "k": 2}\n{"history": ["nope"]}\n')
    code = main(["recommend", "--run-dir", str(runs["sasrec"]), "--input", str(requests)])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 2 and len(lines[0]["recommendations"]) == 2 and "error" in lines[1]
    assert "1 of 2 input lines failed" in captured.err
    code = main(["recommend", "--run-dir", str(runs["sasrec"]), "--input", str(tmp_path / "missing.jsonl")])
    assert code == 2 and "cannot read --input" in capsys.readouterr().err


def test_a_damaged_items_file_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs["sasrec"], copy)
    items = json.loads((copy / "items.json").read_text())
    items["tokens"][0], items["tokens"][1] = items["tokens"][1], items["tokens"][0]
    (copy / "items.json").write_text(json.dumps(items))
    with pytest.raises(MLSA4RecError, match="items.json' does not match the checksum"):
        Recommender.from_run(copy)


@pytest.mark.parametrize("model", ["gru4rec", "mamba4rec"])
def test_a_streaming_session_equals_the_batch_path_and_survives_a_restart(runs: dict[str, Path], model: str) -> None:
    rec = Recommender.from_run(runs[model])
    assert rec.streams
    session = rec.session()
    history = [f"i{k}" for k in (5, 6, 7, 9, 10, 11, 12, 2)]  # up to L = 8 events: the batch path sees them all
    for n, item in enumerate(history, 1):
        session.add(item)
        expected = rec.scores([rec.to_ids(history[:n])])
        assert torch.allclose(session.scores(), expected, atol=1e-5, rtol=1e-5), n
    assert [r.item for r in session.recommend(k=5)] == [r.item for r in rec.recommend([history], k=5)[0]]

    def whole(events: list[str]) -> torch.Tensor:
        """The model on every event (the state covers them all; the batch path reads the last L)."""
        ids = torch.tensor([rec.to_ids(events)])
        with torch.inference_mode():
            return rec.model.full_sort_scores(ids, torch.tensor([ids.shape[1]])).float()

    history += ["i3", "i4"]  # 10 events, past L = 8
    for item in history[-2:]:
        session.add(item)
    assert torch.allclose(session.scores(), whole(history), atol=1e-5, rtol=1e-5)
    if model == "gru4rec":  # it remembers the events before the last L (the tiny Mamba4Rec has forgotten them:
        # 1e-7), so a restored session that re-encoded instead would show in the scores
        assert not torch.allclose(session.scores(), rec.scores([rec.to_ids(history)]), atol=1e-3, rtol=1e-3)
    buffer = io.BytesIO()
    torch.save(session.state_dict(), buffer)
    restored = rec.session()
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert restored.length == 10 and restored.seen == set(rec.to_ids(history))
    assert torch.equal(restored.representation, session.representation)
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(restored.state), pytree.tree_leaves(session.state),
                                                 strict=True))
    # the restored session scores from the saved state, all 10 events (re-encoding would see 8)
    assert torch.allclose(restored.scores(), whole(history), atol=1e-5, rtol=1e-5)
    for item in ("i13", "i14"):  # and goes on from it
        restored.add(item)
        history.append(item)
        assert torch.allclose(restored.scores(), whole(history), atol=1e-5, rtol=1e-5), len(history)
    assert restored.length == 12
    other = Recommender.from_run(runs["sasrec"]).session()
    with pytest.raises(MLSA4RecError, match="saved by a"):
        other.load_state_dict(session.state_dict())


def test_a_compiled_step_gives_the_eager_numbers(runs: dict[str, Path], request) -> None:
    """``compile_step`` (torch.compile) is checked against the eager step before it is used."""
    eager, compiled = Recommender.from_run(runs["mamba4rec"]), Recommender.from_run(runs["mamba4rec"])
    if not compiled.compile_step():
        pytest.skip("torch.compile does not work here (no C++ compiler?); the eager step stays, as designed")
    request.addfinalizer(torch._dynamo.reset)
    a, b = eager.session(), compiled.session()
    for item in ("i5", "i6", "i7"):
        a.add(item)
        b.add(item)
    assert torch.allclose(a.scores(), b.scores(), atol=1e-5, rtol=1e-5)
    assert not Recommender.from_run(runs["sasrec"]).compile_step()  # nothing to compile: it re-encodes


def test_a_session_past_the_stream_limit_re_encodes_the_last_L_events() -> None:
    """LinRec's learned positions end at L: its session streams the first L events, then re-encodes
    the last L, and at every length it equals the batch path (which also reads the last L)."""
    rec = Recommender.from_run(tiny_run("linrec"))
    assert rec.streams and rec.model.stream_limit == rec.max_seq_length == 8
    session = rec.session()
    history = [f"i{(k % 30) + 1}" for k in range(12)]
    for n, item in enumerate(history, 1):
        session.add(item)
        assert (session.state is not None) == (n <= 8)
        assert torch.allclose(session.scores(), rec.scores([rec.to_ids(history[:n])]), atol=1e-5, rtol=1e-5), n
    # restored past the limit (re-encoding) and before it (streaming), each goes on as the batch path
    saved = {12: session.state_dict()}
    early = rec.session()
    for item in history[:5]:
        early.add(item)
    saved[5] = early.state_dict()
    more = history + [f"i{k}" for k in (20, 21, 22)]
    for n, state in saved.items():
        restored = rec.session()
        restored.load_state_dict(state)
        assert restored.length == n and (restored.state is not None) == (n <= 8)
        for m in range(n, len(more) + 1):
            if m > n:
                restored.add(more[m - 1])
            expected = rec.scores([rec.to_ids(more[:m])])
            assert torch.allclose(restored.scores(), expected, atol=1e-5, rtol=1e-5), (n, m)


def test_nan_or_infinite_scores_are_an_error_never_a_short_list(runs: dict[str, Path]) -> None:
    """A broken model (or state) used to give an empty or shortened list with no error."""
    rec = Recommender.from_run(runs["sasrec"])
    clean = rec.scores([rec.to_ids(["i1", "i2"]), rec.to_ids(["i3"])]).clone()  # out of inference mode
    assert len(rec.top_k(clean, rec.items.n_items)[1]) == rec.items.n_items
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in ((1, 5), (1, slice(1, None))):
            scores = clean.clone()
            scores[where] = bad
            with pytest.raises(MLSA4RecError, match="history 1 with NaN or infinite values"):
                rec.top_k(scores, 10)


# --- session states, exclusions, hostile input (issue 23) ------------------------------------------
def _edited(base: dict, **changes) -> dict:
    return {**base, **changes}


def test_a_session_state_is_checked_before_it_is_loaded(runs: dict[str, Path]) -> None:
    """A NaN, a wrong shape or dtype, a missing key, another model or another run: one MLSA4RecError,
    never an empty recommendation list or a raw exception, and the session is left as it was."""
    rec = Recommender.from_run(runs["gru4rec"])
    session = rec.session()
    for item in ("i3", "i4", "i5"):
        session.add(item)
    saved = session.state_dict()
    rep, leaves = saved["representation"], saved["state"]
    bad = {
        "NaN representation": (_edited(saved, representation=torch.full_like(rep, float("nan"))), "NaN"),
        "infinite representation": (_edited(saved, representation=torch.full_like(rep, float("inf"))), "infinite"),
        "NaN state": (_edited(saved, state=[torch.full_like(t, float("nan")) for t in leaves]), "NaN"),
        "state shape": (_edited(saved, state=[t[..., :3] for t in leaves]), "state tensor 0 is"),
        "state dtype": (_edited(saved, state=[t.double() for t in leaves]), "torch.float64"),
        "state count": (_edited(saved, state=leaves * 2), "2 tensors"),
        "state type": (_edited(saved, state=[[0.0]]), "list of tensors"),
        "representation shape": (_edited(saved, representation=rep[:, :3]), "representation is (1, 3)"),
        "representation type": (_edited(saved, representation=rep.tolist()), "a tensor or None"),
        "no representation": (_edited(saved, representation=None), "representation is None"),
        "length": (_edited(saved, length="3"), "'length' must be a whole number"),
        "negative length": (_edited(saved, length=-1), "'length' must be a whole number"),
        "length disagrees": (_edited(saved, length=1), "do not agree"),  # fewer events than recent items
        "recent as a string": (_edited(saved, recent="i5"), "not one string"),
        "unknown recent id": (_edited(saved, recent=["i3", "i4", "zz"]), "names item id(s) 'zz'"),
        "missing key": ({k: v for k, v in saved.items() if k != "seen"}, "lacks seen"),
        "format": (_edited(saved, format=7), "format is 7"),
        "another model": (_edited(saved, model="sasrec"), "saved by a 'sasrec' model"),
        "another run": (_edited(saved, run="0" * 64), "saved by another run"),
        "not a dict": ([saved], "it is a list, not a dict"),
    }
    target = rec.session()
    target.add("i9")
    before = (target.length, list(target.recent), torch.clone(target.representation))
    for name, (state, message) in bad.items():
        with pytest.raises(MLSA4RecError, match=re.escape(message)):
            target.load_state_dict(state)
        assert (target.length, target.recent) == before[:2] and torch.equal(target.representation, before[2]), name
    target.load_state_dict(saved)  # the real one still loads, and continues the session
    assert torch.equal(target.scores(), session.scores())


def test_a_session_state_of_another_run_of_the_same_model_is_refused(runs: dict[str, Path], caplog) -> None:
    rec = Recommender.from_run(runs["gru4rec"])
    again = Recommender.from_run(runs["gru4rec"]).fingerprint
    assert rec.session().state_dict()["run"] == rec.fingerprint == again  # the same run, loaded twice
    retrained = Recommender.from_run(runs["gru4rec"])
    with torch.no_grad():
        next(retrained.model.parameters()).add_(0.01)  # the same model and items, other weights
    assert retrained.fingerprint != rec.fingerprint
    session = retrained.session()
    session.add("i3")
    with pytest.raises(MLSA4RecError, match="saved by another run"):
        rec.session().load_state_dict(session.state_dict())
    old = {k: v for k, v in rec.session().state_dict().items() if k != "run"} | {"format": 1}  # mlsa4rec 0.2.0
    with caplog.at_level("WARNING", logger="mlsa4rec"):
        rec.session().load_state_dict(old)
    assert "without its run's fingerprint" in caplog.text
    plain = Recommender.from_run(runs["sasrec"])  # re-encodes: no model state may come with it
    saved = plain.session().state_dict()
    with pytest.raises(MLSA4RecError, match="holds a model state"):
        plain.session().load_state_dict(_edited(saved, state=[torch.zeros(1)]))


def test_exclusions_follow_the_unknown_rule_and_refuse_a_string(runs: dict[str, Path], caplog) -> None:
    rec = Recommender.from_run(runs["sasrec"])
    best = rec.recommend([["i1"]], k=1)[0][0].item
    assert len(best) > 1  # a string is not read one character at a time
    one_string = r"exclude must be a list of item ids, not one string.*" + re.escape(f"[{best!r}]")
    with pytest.raises(MLSA4RecError, match=one_string):
        rec.recommend([["i1"]], k=3, exclude=best)
    with pytest.raises(MLSA4RecError, match=r"unknown item id\(s\) in exclude 'zz'.*unknown='drop'"):
        rec.recommend([["i1"]], k=3, exclude=["zz", best])
    with pytest.raises(MLSA4RecError, match="unknown item id"):
        rec.recommend([[]], k=3, exclude=["zz"], fallback="popular")
    with pytest.raises(MLSA4RecError, match="exclude holds None"):
        rec.recommend([["i1"]], k=3, exclude=[None])
    with caplog.at_level("WARNING", logger="mlsa4rec"):
        kept = rec.recommend([["i1"]], k=3, exclude=["zz", best], unknown="drop")[0]
    assert best not in [r.item for r in kept] and "dropped unknown item id(s) in exclude 'zz'" in caplog.text
    session = rec.session()
    session.add("i1")
    with pytest.raises(MLSA4RecError, match="unknown item id"):
        session.recommend(k=3, exclude=["zz"])
    with pytest.raises(MLSA4RecError, match="not one string"):
        session.recommend(k=3, exclude=best)
    assert session.recommend(k=3, exclude=["zz", best], unknown="drop") == kept
    with pytest.raises(MLSA4RecError, match="unknown item id"):
        rec.session().recommend(k=3, exclude=["zz"], fallback="popular")


def test_session_add_with_a_list_names_add_many(runs: dict[str, Path]) -> None:
    session = Recommender.from_run(runs["sasrec"]).session()
    with pytest.raises(MLSA4RecError, match=r"takes one item id.*use Session\.add_many\(items\)"):
        session.add(["i1", "i2"])
    with pytest.raises(MLSA4RecError, match="takes one item id"):
        session.add(None)
    assert session.add_many(["i1", "i2", "zz"], unknown="drop") == 2 and session.length == 2
    with pytest.raises(MLSA4RecError, match="unknown item id"):
        session.add_many(["i3", "zz"])
    assert session.length == 2  # nothing added


def test_batch_lines_keep_ids_and_fail_alone(runs: dict[str, Path]) -> None:
    """Bad bytes, deep nesting, NaN, unknown exclusions: an error answer for that line, with its id."""
    rec = Recommender.from_run(runs["sasrec"])
    lines = [b'\xef\xbb\xbf{"history": ["i1"], "k": 2, "id": "bom"}', b'{"history": ["\xff\xfe"], "id": "b"}',
             b'{"history": ["zz"], "id": "c"}', b"[" * 100_000 + b"]" * 100_000, b'{"history": ["i1"], "id": NaN}',
             b'{"history": ["i1"], "exclude": ["zz"], "id": 4}', b'{"history": ["i1"], "exclude": [null], "id": 5}',
             b'{"history": ["i1"], "k": -3, "id": [1]}', '{"history": ["i2"], "k": 2, "id": "text"}']
    out = io.StringIO()
    failed, total = recommend_lines(rec, lines, out, k=3)
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (failed, total) == (7, 9)
    assert answers[0]["id"] == "bom" and len(answers[0]["recommendations"]) == 2
    assert answers[1] == {"id": "b", "line": 2, "error": "not UTF-8 text (byte 0xff at column 15); save the input as "
                                                         "UTF-8"}
    assert answers[2]["id"] == "c" and "unknown item id(s) 'zz'" in answers[2]["error"]
    assert "nested too deeply" in answers[3]["error"] and "NaN is not a JSON value" in answers[4]["error"]
    assert answers[5]["id"] == 4 and "unknown item id(s) in \"exclude\" 'zz'" in answers[5]["error"]
    assert answers[6]["id"] == 5 and '"exclude" must be a list of item ids' in answers[6]["error"]
    assert answers[7]["id"] == [1] and answers[7]["error"].startswith('"k" must be a whole number')
    assert answers[8]["id"] == "text" and len(answers[8]["recommendations"]) == 2
    out = io.StringIO()
    assert recommend_lines(rec, ['{"history": ["i1"], "exclude": ["zz", "i2"]}'], out, unknown="drop") == (0, 1)
    assert "i2" not in [r["item"] for r in json.loads(out.getvalue())["recommendations"]]


def test_cli_recommend_bad_bytes_json_shape_and_flag_names(capsys, caplog, runs: dict[str, Path], tmp_path: Path,
                                                          monkeypatch) -> None:
    run = str(runs["sasrec"])
    requests = tmp_path / "in.jsonl"
    requests.write_bytes(b'{"history": ["i1"], "k": 2, "id": "a"}\n{"history": ["\xff"], "id": "b"}\n'
                         b'{"history": ["i1"], "k": 2}\n')
    code = main(["recommend", "--run-dir", run, "--input", str(requests)])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 2 and "Traceback" not in captured.err and captured.err.count("\n") == 1
    assert lines[0]["id"] == "a" and lines[1]["id"] == "b" and "not UTF-8" in lines[1]["error"]
    assert "1 of 3 input lines failed" in captured.err
    # --history --json prints what an --input line gets
    assert main(["recommend", "--run-dir", run, "--history", "i1", "-k", "2", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    # the same items; the scores up to float rounding (a batch of two rows and one row take different
    # matrix-product paths, which may differ in the last bit)
    assert [r["item"] for r in alone["recommendations"]] == [r["item"] for r in lines[2]["recommendations"]]
    assert [r["score"] for r in alone["recommendations"]] == pytest.approx(
        [r["score"] for r in lines[2]["recommendations"]], rel=1e-6)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'{"history": ["\xff"]}\n{"history": ["i1"]}\n')))
    assert main(["recommend", "--run-dir", run, "--input", "-", "-k", "2"]) == 2
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "not UTF-8" in out[0]["error"] and len(out[1]["recommendations"]) == 2
    for argv, message in ((["--history", "i1 zz"], "pass --unknown drop to ignore them"),
                          (["--history", "i1", "-k", "-3"], "error: -k must be a whole number from 1 to 30"),
                          (["--history", ""], "error: --history is empty; give at least one item id"),
                          (["--history", "zz", "--unknown", "drop"], "or use --fallback popular")):
        assert main(["recommend", "--run-dir", run, *argv]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0] and "='" not in err and "Traceback" not in err, err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with caplog.at_level("WARNING", logger="mlsa4rec"):
        assert main(["recommend", "--run-dir", run, "--input", str(empty)]) == 0
    assert "holds no requests" in caplog.text


def test_max_length_is_a_deprecated_name_of_max_seq_length(runs: dict[str, Path]) -> None:
    rec = Recommender.from_run(runs["sasrec"])
    with pytest.warns(DeprecationWarning, match="max_seq_length"):
        assert rec.max_length == rec.max_seq_length


def test_loading_a_run_leaves_the_caller_s_random_generators_alone(runs: dict[str, Path]) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Recommender.from_run(runs["sasrec"])
    assert torch.equal(torch.rand(3), expected)


def test_a_damaged_run_is_named_before_a_device_this_machine_lacks(runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["sasrec"], run)
    (run / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(MLSA4RecError, match="model.safetensors"):
        Recommender.from_run(run, device="cuda:7")
