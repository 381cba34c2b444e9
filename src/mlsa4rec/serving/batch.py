"""Batch recommendation over JSON lines: one request per line in, one answer per line out.

    {"history": ["1193", "661"], "k": 5, "id": "user-7"}   ->   {"id": "user-7", "recommendations": [...]}

A line may set ``k``, ``exclude_seen`` and ``exclude`` for itself and carry an ``id``, echoed
back. A bad line (not UTF-8, not JSON, a field that cannot be used) gets
``{"id": ..., "line": N, "error": "..."}`` as its answer (``id`` when the line had one; blank lines
are skipped) and the others are still answered, so one typo never costs a whole file. Lines are
scored ``chunk`` at a time in one model call. Lines may be ``str`` or ``bytes`` (read as UTF-8, so a
file opened in binary mode fails line by line, never as a whole).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TextIO

from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.serving.recommender import Recommender, option

BOM = "\ufeff"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


class _NotUTF8(MLSA4RecError):
    """A line that is not UTF-8; ``id`` is its ``id`` when the rest of the line still shows it."""

    def __init__(self, message: str, line: bytes) -> None:
        super().__init__(message)
        self.id = None
        try:
            obj = json.loads(line.decode("utf-8", "replace"), parse_constant=_no_constant)
        except (ValueError, RecursionError):
            return
        if isinstance(obj, dict) and "\ufffd" not in json.dumps(obj.get("id"), ensure_ascii=False):
            self.id = obj.get("id")


def _parse(line: str | bytes, first: bool) -> Any:
    """The JSON value of one line (a UTF-8 byte string or text), or the error saying why not."""
    if isinstance(line, (bytes, bytearray)):
        try:
            line = bytes(line).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _NotUTF8(f"not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); save the "
                           "input as UTF-8", bytes(line)) from None
    if first:
        line = line.removeprefix(BOM)
    try:
        return json.loads(line, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise MLSA4RecError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:  # NaN, Infinity: Python reads them, JSON has no such values
        raise MLSA4RecError(f"not JSON ({exc})") from None
    except RecursionError:
        raise MLSA4RecError("not usable JSON: nested too deeply") from None


def _request(obj: Any, default_k: int, default_exclude_seen: bool) -> dict[str, Any]:
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
    if not isinstance(exclude, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                                for x in exclude):
        raise MLSA4RecError('"exclude" must be a list of item ids (strings or integers)')
    exclude_seen = obj.get("exclude_seen", default_exclude_seen)
    if not isinstance(exclude_seen, bool):
        raise MLSA4RecError('"exclude_seen" must be true or false')
    return {"history": history, "k": obj.get("k", default_k), "k_name": '"k"' if "k" in obj else None,
            "exclude_seen": exclude_seen, "exclude": exclude, "id": obj.get("id")}


def recommend_lines(rec: Recommender, lines: Iterable[str | bytes], out: TextIO, k: int = 10,
                    exclude_seen: bool = False, unknown: str = "error", fallback: str | None = None,
                    chunk: int = 256) -> tuple[int, int]:
    """Answer every non-blank line of ``lines`` on ``out``; returns (failed lines, answered lines)."""
    failed = total = 0
    pending: list[tuple[int, str | bytes]] = []

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


def _answer_chunk(rec: Recommender, lines: list[tuple[int, str | bytes]], k: int, exclude_seen: bool, unknown: str,
                  fallback: str | None) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = []
    requests: list[dict[str, Any] | None] = []
    for number, line in lines:
        obj = None
        try:
            obj = _parse(line, number == 1)
            req = _request(obj, k, exclude_seen)
            rec.check_k(req["k"], req["k_name"])
            req["ids"] = rec.to_ids(req["history"], unknown)
            if not req["ids"] and fallback != "popular":
                raise MLSA4RecError(f"the history is empty; give at least one item, or use "
                                    f"{option('fallback', 'popular')}")
            # checked (and an unknown id refused or dropped) once; known ids from here on
            req["exclude"] = [rec.items.token(i) for i in rec.to_ids(req["exclude"], unknown, what='"exclude"')]
            requests.append(req)
            answers.append({} if req["id"] is None else {"id": req["id"]})
        except MLSA4RecError as exc:  # the line number matches an answer to its line (blank lines are skipped)
            requests.append(None)
            given = obj.get("id") if isinstance(obj, dict) else getattr(exc, "id", None)
            answers.append({**({} if given is None else {"id": given}), "line": number, "error": str(exc)})
    scored = {i: row for row, i in enumerate(i for i, r in enumerate(requests) if r is not None and r["ids"])}
    ranked: list[list[Any]] = []
    if scored:  # one model call; each line ranked with its own k and exclusions
        asked = [requests[i] for i in scored]
        excluded = [[*rec.exclude_ids(r["exclude"]), *(r["ids"] if r["exclude_seen"] else ())] for r in asked]
        ranked = rec.rank_ids(rec.users([r["ids"] for r in asked]), [r["k"] for r in asked], excluded)
    for i, req in enumerate(requests):
        if req is None:
            continue
        if req["ids"]:
            recs = ranked[scored[i]]
        else:
            recs = rec.popular(req["k"], exclude=req["exclude"])
        answers[i]["recommendations"] = [r._asdict() for r in recs]
    return answers
