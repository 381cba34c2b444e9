"""Batch recommendation over JSON lines: one request per line in, one answer per line out.

    {"history": ["1193", "661"], "k": 5, "id": "user-7"}   ->   {"id": "user-7", "recommendations": [...]}

A line may set ``k``, ``exclude_seen`` and ``exclude`` for itself and carry an ``id``, echoed
back. A bad line gets ``{"line": N, "error": "..."}`` as its answer (blank lines are skipped) and
the others are still answered, so one typo never costs a whole file. Lines are scored ``chunk``
at a time in one model call.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TextIO

from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.serving.recommender import Recommender


def _request(line: str, default_k: int, default_exclude_seen: bool) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MLSA4RecError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise MLSA4RecError('each line must be a JSON object like {"history": [...], "k": 10}')
    unknown_keys = sorted(set(obj) - {"history", "k", "exclude_seen", "exclude", "id"})
    if unknown_keys:
        raise MLSA4RecError(f"unknown field(s) {', '.join(unknown_keys)}; a line takes history, k, exclude_seen, "
                            "exclude and id")
    history = obj.get("history")
    if not isinstance(history, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                                for x in history):
        raise MLSA4RecError('"history" must be a list of item ids (strings or integers)')
    exclude = obj.get("exclude", [])
    if not isinstance(exclude, list):
        raise MLSA4RecError('"exclude" must be a list of item ids')
    exclude_seen = obj.get("exclude_seen", default_exclude_seen)
    if not isinstance(exclude_seen, bool):
        raise MLSA4RecError('"exclude_seen" must be true or false')
    return {"history": history, "k": obj.get("k", default_k), "exclude_seen": exclude_seen, "exclude": exclude,
            "id": obj.get("id")}


def recommend_lines(rec: Recommender, lines: Iterable[str], out: TextIO, k: int = 10, exclude_seen: bool = False,
                    unknown: str = "error", fallback: str | None = None, chunk: int = 256) -> tuple[int, int]:
    """Answer every non-blank line of ``lines`` on ``out``; returns (failed lines, answered lines)."""
    failed = total = 0
    pending: list[tuple[int, str]] = []

    def flush() -> None:
        nonlocal failed, total
        for answer in _answer_chunk(rec, pending, k, exclude_seen, unknown, fallback):
            failed += "error" in answer
            total += 1
            out.write(json.dumps(answer) + "\n")
        out.flush()
        pending.clear()

    for number, line in enumerate(lines, 1):
        if line.strip():
            pending.append((number, line))
            if len(pending) == chunk:
                flush()
    if pending:
        flush()
    return failed, total


def _answer_chunk(rec: Recommender, lines: list[tuple[int, str]], k: int, exclude_seen: bool, unknown: str,
                  fallback: str | None) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = []
    requests: list[dict[str, Any] | None] = []
    for number, line in lines:
        try:
            req = _request(line, k, exclude_seen)
            rec.check_k(req["k"])
            req["ids"] = rec.to_ids(req["history"], unknown)
            if not req["ids"] and fallback != "popular":
                raise MLSA4RecError("the history is empty; give at least one item, or use --fallback popular")
            requests.append(req)
            answers.append({} if req["id"] is None else {"id": req["id"]})
        except MLSA4RecError as exc:  # the line number matches an answer to its line (blank lines are skipped)
            requests.append(None)
            answers.append({"line": number, "error": str(exc)})
    scored = {i: row for row, i in enumerate(i for i, r in enumerate(requests) if r is not None and r["ids"])}
    scores = rec.scores([requests[i]["ids"] for i in scored]) if scored else None
    for i, req in enumerate(requests):
        if req is None:
            continue
        if req["ids"]:
            row = scored[i]
            recs = rec.top_k(scores[row:row + 1], req["k"], [req["ids"]] if req["exclude_seen"] else None,
                             req["exclude"])[0]
        else:
            recs = rec.popular(req["k"], exclude=req["exclude"])
        answers[i]["recommendations"] = [r._asdict() for r in recs]
    return answers
