"""Fuzzing the command line: hostile data files, YAML config files, --set values and run directories.

Every case is drawn from a seeded generator (the same cases on every run) and bounded in number,
so the module runs in well under a minute. For each case the promise checked is the one in
docs/reliability.md: the command either succeeds (exit 0, a complete run directory) or exits 2
with exactly one ``error:`` line and no traceback, and nothing outside the tool's own paths (the
output directory it was given, the hidden staging directory beside it, the dataset cache) is
created, changed or deleted.
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
from pathlib import Path

import pytest

from mlsa4rec.cli import main
from mlsa4rec.config import known_keys

TINY = ["--set", "epochs=1", "--set", "hidden_size=8", "--set", "inner_size=8", "--set", "n_heads=1",
        "--set", "n_layers=1", "--set", "MAX_ITEM_LIST_LENGTH=6", "--set", "train_batch_size=64",
        "--set", "eval_batch_size=64"]
# MLSA4REC_FUZZ_SCALE=10 MLSA4REC_FUZZ_SEED=7 pytest tests/test_fuzz.py: a deeper search with other cases
SCALE = int(os.environ.get("MLSA4REC_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("MLSA4REC_FUZZ_SEED", "0"))
N_DATA, N_YAML, N_SET, N_RUNDIR = 60 * SCALE, 40 * SCALE, 60 * SCALE, 20 * SCALE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOSTILE_TOKENS = ["", " ", "nan", "NaN", "inf", "-inf", "1e400", "-1", "0", "1.5", "abc", "\x00", "\t", ",", "::",
                  "9" * 40, "é", "\ufeff", "None", "[1]", "{a: 1}", "'", '"', "\\", "-", "1_0", "0x1f", "\r"]
HOSTILE_VALUES = [None, "", "abc", -1, 0, 1, 2, 0.5, -0.5, 1e300, float("inf"), float("nan"), True, False, [], [0],
                  [1, 2], ["x"], {}, {"a": 1}, "1e-3", "1e+30", "[5,inf)", "(0,0)", "[a,b]", "cpu", "cuda",
                  "cuda:7", "auto", "prefix", "all_positions", "CE", "BPR", 10 ** 30, -(10 ** 30), "\x00", "é" * 50]


def sequences(rng: random.Random) -> list[list[int]]:
    """40 users over 12 items: enough for 5-core filtering to keep most, small enough to train in
    a fraction of a second."""
    return [[rng.randrange(1, 13) for _ in range(rng.randrange(6, 10))] for _ in range(40)]


def render(seqs: list[list[int]], fmt: str) -> str:
    rows = [(u + 1, item, 100 * u + t) for u, s in enumerate(seqs) for t, item in enumerate(s)]
    if fmt == "txt":
        return "".join(f"{u + 1} " + " ".join(map(str, s)) + "\n" for u, s in enumerate(seqs))
    if fmt == "inter":
        return "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows)
    if fmt == "csv":
        return "".join(f"{u},{i},{t}\n" for u, i, t in rows)
    return "".join(f"{u}::{i}::5::{t}\n" for u, i, t in rows)  # ratings.dat


def mutate(text: str, rng: random.Random) -> bytes:
    """One to three damaging edits: a field replaced by a hostile token, bytes cut or inserted,
    lines duplicated or dropped, the header broken, the file emptied or truncated."""
    lines = text.splitlines(keepends=True)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(8)
        i = rng.randrange(len(lines)) if lines else 0
        if kind == 0 and lines:  # a hostile token in a field
            sep = "\t" if "\t" in lines[i] else ("::" if "::" in lines[i] else ("," if "," in lines[i] else " "))
            fields = lines[i].rstrip("\n").split(sep)
            fields[rng.randrange(len(fields))] = rng.choice(HOSTILE_TOKENS)
            lines[i] = sep.join(fields) + "\n"
        elif kind == 1 and lines:  # a field too many or too few
            lines[i] = lines[i].rstrip("\n") + rng.choice(["\t7", ",7", "::7", " 7", ""]) + "\n"
        elif kind == 2 and lines:
            del lines[i]
        elif kind == 3 and lines:
            lines.insert(i, lines[i] * rng.randint(1, 3))
        elif kind == 4:
            lines = lines[: rng.randrange(len(lines) + 1)]
        elif kind == 5 and lines:
            lines[0] = rng.choice(["", "\n", "user\titem\n", "user_id:token\n", "\ufeffuser_id:token\titem_id:token\n",
                                   lines[0].upper()])
        elif kind == 6:
            lines = [line.replace("\n", "\r\n") for line in lines]
    raw = "".join(lines).encode("utf-8")
    if rng.random() < 0.15:  # bytes that are not UTF-8, or a cut in the middle of the file
        cut = rng.randrange(len(raw) + 1)
        raw = raw[:cut] + rng.choice([b"\xff\xfe", b"\x80", b"\x00\x00", b""]) + raw[cut + rng.randrange(3):]
    return raw


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def check_case(capsys, work: Path, argv: list[str], label: str, out: Path | None = None) -> int:
    """Run one command; assert the promise; return its exit code."""
    before = snapshot(work)
    code = main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    context = f"{label}: {argv}\n{captured.err[-2000:]}"
    assert code in (0, 2), context
    assert "Traceback" not in captured.err, context
    after = snapshot(work)
    if code == 2:
        assert len(errors) == 1, context
        assert after == before, context  # nothing created, changed or deleted
    else:
        assert not errors, context
        if out is not None:
            assert (out / "manifest.json").is_file(), context
            shutil.rmtree(out)  # the test's own clean-up, so the next case starts from the same tree
            after = snapshot(work)
        assert after == before, context
    return code


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "sasrec", "--dataset", str(data), "--output-dir", str(out), *TINY, *extra]


def test_fuzz_data_files(capsys, tmp_path: Path) -> None:
    rng = random.Random(1101 + SEED)
    work = tmp_path / "work"
    work.mkdir()
    codes = []
    for case in range(N_DATA):
        fmt = rng.choice(["txt", "inter", "csv", "dat"])
        raw = mutate(render(sequences(rng), fmt), rng)
        name = {"txt": "d.txt", "inter": "d.inter", "csv": "d.csv", "dat": "ratings.dat"}[fmt]
        if fmt == "txt" and rng.random() < 0.3:
            raw = gzip.compress(raw)[: None if rng.random() < 0.5 else rng.randrange(10, 60)]
            name += ".gz"
        folder = work / f"case{case}"
        folder.mkdir()
        data = folder / name
        data.write_bytes(raw)
        codes.append(check_case(capsys, work, train_argv(data, tmp_path / "out"), f"data case {case} ({fmt})",
                                tmp_path / "out"))
    assert codes.count(2) >= N_DATA // 2  # the generator mostly produces bad files, as intended


def test_fuzz_yaml_config_files(capsys, tmp_path: Path, successor_file: Path) -> None:
    rng = random.Random(1102 + SEED)
    work = tmp_path / "work"
    work.mkdir()
    keys = list(known_keys("sasrec")) + ["model", "dataset", "epoch", "", "MAX_ITEM_LIST_LENGTH "]
    garbage = [b"key: [unclosed", b"\t- tab indent\n", b"- a\n- b\n", b"just text", b"\xff\xfe\x00e\x00",
               b"a: &x [1]\nb: *x\n", b"!!python/object:os.system ls\n", b"{", b"epochs: 1\nepochs: 2\n", b"---\n---\n",
               b"? complex key\n: 1\n", b"\x00", b"learning_rate: !!float nan\n"]
    codes = []
    for case in range(N_YAML):
        path = work / f"c{case}.yaml"
        if rng.random() < 0.3:
            path.write_bytes(rng.choice(garbage))
        else:
            import yaml

            body = {rng.choice(keys): rng.choice(HOSTILE_VALUES) for _ in range(rng.randint(1, 3))}
            path.write_text(yaml.safe_dump(body, allow_unicode=True), encoding="utf-8")
        argv = train_argv(successor_file, tmp_path / "out", "--config", str(path))
        codes.append(check_case(capsys, work, argv, f"yaml case {case}", tmp_path / "out"))
    assert codes.count(2) >= N_YAML // 2


def test_fuzz_set_values(capsys, tmp_path: Path, successor_file: Path) -> None:
    rng = random.Random(1103 + SEED)
    work = tmp_path / "work"
    work.mkdir()
    keys = list(known_keys("sasrec")) + ["epoch", "model", "=", "a b"]
    raw_values = ["1e-3", "1e+30", "1E3", ".inf", "-.inf", ".nan", "nan", "inf", "1e400", "[", "]", "{", "[1,", "~",
                  "null", "yes", "no", "0x10", "0o7", "1_000", "-0", "1/2", "'1'", "\"x", "[5,inf)", "(2,1)", "é",
                  "!!binary AAAA", "&a 1", "*a", "- 1", "a: b", "1.5", "-3", "0", "2", "true"]
    codes = []
    for case in range(N_SET):
        sets = []
        for _ in range(rng.randint(1, 2)):
            sets += ["--set", f"{rng.choice(keys)}={rng.choice(raw_values)}"]
        if rng.random() < 0.1:
            sets += ["--set", rng.choice(["noequals", "=1", " =2", "epochs"])]
        codes.append(check_case(capsys, work, train_argv(successor_file, tmp_path / "out", *sets), f"set case {case}",
                                tmp_path / "out"))
    assert codes.count(2) >= N_SET // 2


def test_fuzz_run_directories(capsys, tmp_path: Path, successor_file: Path) -> None:
    """Damage a finished run's files one at a time: evaluate and compare must refuse every change
    to a file they read (checksums) and never trace back."""
    rng = random.Random(1104 + SEED)
    good = tmp_path / "good"
    assert main(train_argv(successor_file, good)) == 0
    base = tmp_path / "base"
    assert main(train_argv(successor_file, base, "--set", "seed=5")) == 0
    capsys.readouterr()
    work = tmp_path / "work"
    work.mkdir()
    run = work / "run"
    for case in range(N_RUNDIR):
        shutil.copytree(good, run)
        victim = run / rng.choice(["config.yaml", "results.json", "model.safetensors", "items.json", "manifest.json",
                                   "train.log"])
        raw = bytearray(victim.read_bytes())
        action = rng.randrange(4)
        if action == 0 and raw:
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        elif action == 1:
            raw = raw[: rng.randrange(len(raw) + 1)]
        elif action == 2:
            raw += rng.choice([b"\n", b"x", b"\xff", b"{}"])
        if action == 3:
            victim.unlink()
        else:
            victim.write_bytes(bytes(raw))
        argv = (["evaluate", "--run-dir", str(run)] if case % 2 else
                ["compare", str(base), str(run), "--resamples", "100"])
        code = check_case(capsys, work, argv, f"run-dir case {case} ({victim.name}, action {action})")
        changed = action == 3 or bytes(raw) != (good / victim.name).read_bytes()
        if changed and victim.name in ("config.yaml", "results.json", "model.safetensors", "items.json"):
            assert code == 2, (case, victim.name, action)  # every file a load reads is verified
        shutil.rmtree(run)
