"""Serving a trained run: raw ids in and out, equal to the evaluation path, sessions, the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import tiny_run

from mlsa4rec.cli import main
from mlsa4rec.data.sampling import eval_batches
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation.runs import load_run
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
    assert rec.recommend([long], k=7) == rec.recommend([long[-rec.max_length:]], k=7)


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
    assert restored.recommend(k=5, exclude_seen=True) == session.recommend(k=5, exclude_seen=True)
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
    assert "list of item ids" in answers[5]["error"] and "k must be" in answers[6]["error"]
    assert "unknown field(s) colour" in answers[7]["error"]


def test_cli_recommend(capsys, runs: dict[str, Path], tmp_path: Path) -> None:
    code = main(["recommend", "--run-dir", str(runs["sasrec"]), "--history", "i1 i2 i3", "-k", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
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
    buffer = io.BytesIO()
    torch.save(session.state_dict(), buffer)
    restored = rec.session()
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for item in ("i3", "i4"):
        session.add(item)
        restored.add(item)
    assert torch.equal(restored.scores(), session.scores()) and restored.length == session.length == 10
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
    assert rec.streams and rec.model.stream_limit == rec.max_length == 8
    session = rec.session()
    history = [f"i{(k % 30) + 1}" for k in range(12)]
    for n, item in enumerate(history, 1):
        session.add(item)
        assert (session.state is not None) == (n <= 8)
        assert torch.allclose(session.scores(), rec.scores([rec.to_ids(history[:n])]), atol=1e-5, rtol=1e-5), n
    restored = rec.session()
    restored.load_state_dict(session.state_dict())
    assert torch.equal(restored.scores(), session.scores())


def test_a_nan_score_is_never_recommended(runs: dict[str, Path]) -> None:
    rec = Recommender.from_run(runs["sasrec"])
    scores = rec.scores([rec.to_ids(["i1", "i2"])]).clone()  # out of inference mode, to be edited
    scores[0, 5] = float("nan")
    top = rec.top_k(scores, rec.items.n_items)[0]
    assert len(top) == rec.items.n_items - 1 and rec.items.token(5) not in [r.item for r in top]
