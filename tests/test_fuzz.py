"""Fuzzing every entry point: hostile data files, YAML config files, study files, --set values, run directories, a
hostile machine (unreadable files, devices, long names, broken output streams), the dataset cache,
`recommend --input` files, session states and `serve` flags.

Every case is drawn from a seeded generator (the same cases on every run) and bounded in number,
so the module runs in well under a minute. For each case the promise checked is the one in
docs/reliability.md: the command either succeeds (exit 0, a complete run directory) or exits 2
with exactly one ``error:`` line and no traceback, and nothing outside the tool's own paths (the
output directory it was given, the hidden staging directory beside it, the dataset cache) is
created, changed or deleted.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
import uvicorn

from conftest import BrokenStream

sys.path.insert(0, str(Path(__file__).parent / "serving"))  # the serving tests' tiny trained runs
from tiny_runs import tiny_run  # noqa: E402

from mlsa4rec.cli import main
from mlsa4rec.config import known_keys
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.serving import Recommender

TINY = ["--set", "epochs=1", "--set", "hidden_size=8", "--set", "inner_size=8", "--set", "n_heads=1",
        "--set", "n_layers=1", "--set", "MAX_ITEM_LIST_LENGTH=6", "--set", "train_batch_size=64",
        "--set", "eval_batch_size=64"]
# MLSA4REC_FUZZ_SCALE=10 MLSA4REC_FUZZ_SEED=7 pytest tests/test_fuzz.py: a deeper search with other cases
SCALE = int(os.environ.get("MLSA4REC_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("MLSA4REC_FUZZ_SEED", "0"))
N_DATA, N_YAML, N_SET, N_RUNDIR = 60 * SCALE, 40 * SCALE, 60 * SCALE, 20 * SCALE
N_CACHE = 12 * SCALE

# a numpy warning raised in mlsa4rec's own code (an invalid cast, an overflow) means a value went
# silently wrong: an error here, so the fuzz cases find it
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("error::RuntimeWarning:mlsa4rec")]

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


def check_case(capsys, work: Path, argv: list[str], label: str, out: Path | None = None,
               around: Callable[[], AbstractContextManager] = nullcontext, created: Path | None = None) -> int:
    """Run one command (inside ``around()``: a hostile machine); assert the promise; return its exit
    code. ``created``: the outermost directory a successful run made or replaced (default ``out``),
    removed after."""
    before = snapshot(work)
    with around():
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
            shutil.rmtree(created or out)  # the test's own clean-up, so the next case starts from the same tree
            after = snapshot(work)
            if created is not None:  # it may have held a run that --overwrite replaced
                gone = str(created.relative_to(work))
                before = {k: v for k, v in before.items() if k != gone and not k.startswith(gone + os.sep)}
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


def _mutate(rng: random.Random, spec: dict) -> None:
    """Replace, drop or add one key somewhere in a nested study file."""
    node = spec
    while True:
        key = rng.choice(list(node))
        if isinstance(node[key], dict) and node[key] and rng.random() < 0.6:
            node = node[key]
            continue
        roll = rng.random()
        if roll < 0.6:
            node[key] = rng.choice(HOSTILE_VALUES)
        elif roll < 0.8:
            del node[key]
        else:
            node[rng.choice(["colour", "models", "percent", "reason", key + "s"])] = rng.choice(HOSTILE_VALUES)
        return


def test_fuzz_study_files(tmp_path: Path, successor_file: Path) -> None:
    """A mutated study file (claim, notes, not_run, groups, per-dataset recipes) is read or refused
    with mlsa4rec's own error, never another exception, before anything is trained."""
    import copy

    import yaml

    from mlsa4rec.experiments.study import load_study

    rng = random.Random(1108 + SEED)
    other = tmp_path / "other.txt"
    other.write_text(successor_file.read_text())
    valid = {"study": "s", "datasets": [str(successor_file), str(other)], "seeds": [1, 2], "baseline": "sasrec",
             "focus": ["gru4rec"],
             "claim": {"source": "a paper", "models": ["gru4rec"], "percent": {"hit@10": [4.5, 10.8]}},
             "notes": ["a caveat"],
             "not_run": [{"models": ["narm"], "datasets": ["succ"], "reason": "slow"}],
             "models": {"sasrec": {"set": {"epochs": 1}, "by_dataset": {"other.txt": {"set": {"epochs": 2}}}},
                        "gru4rec": {"seeds": [1]}, "narm": {"model": "gru4rec", "datasets": ["other.txt"]}},
             "groups": {"long": {"models": ["sasrec"], "set": {"MAX_ITEM_LIST_LENGTH": 16}}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(valid))
    assert load_study(path).claim is not None  # the unmutated file is valid
    refused = 0
    for case in range(N_YAML):
        spec = copy.deepcopy(valid)
        for _ in range(rng.randint(1, 3)):
            _mutate(rng, spec)
        path.write_text(yaml.safe_dump(spec, allow_unicode=True))
        try:
            load_study(path)
        except MLSA4RecError as exc:
            refused += 1
            assert "\n" not in str(exc) and str(exc), f"study case {case}: {exc!r}"
        except Exception as exc:  # noqa: BLE001 - the point: no other exception may escape
            pytest.fail(f"study case {case} raised {type(exc).__name__}: {exc}\n{yaml.safe_dump(spec)}")
    assert refused >= N_YAML // 2


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


# --- a hostile machine: unreadable files, missing devices, long names, odd CSVs, broken output -------

N_PERM, N_DEVICE, N_NAMES, N_CSV, N_STREAM = 24 * SCALE, 30 * SCALE, 12 * SCALE, 30 * SCALE, 24 * SCALE


def finished_run(capsys, data: Path, out: Path, *extra: str) -> Path:
    assert main(train_argv(data, out, *extra)) == 0
    capsys.readouterr()
    return out


def test_fuzz_unreadable_files(capsys, tmp_path: Path, successor_file: Path) -> None:
    """A file the user may not read (``open`` refuses it, as it does for root too): every command that
    reads it ends in one error line, every other command is unaffected."""
    from test_environment_errors import deny_reading

    rng = random.Random(1105 + SEED)
    work = tmp_path / "work"
    work.mkdir()
    data = work / "succ.txt"
    shutil.copy(successor_file, data)
    run = finished_run(capsys, data, work / "run")
    config = work / "c.yaml"
    config.write_text("epochs: 1\n")
    victims = [data, config, *[run / name for name in ("config.yaml", "results.json", "model.safetensors",
                                                       "items.json", "manifest.json", "train.log")]]
    commands = [["data", "stats", str(data)], train_argv(data, tmp_path / "out", "--config", str(config)),
                ["evaluate", "--run-dir", str(run)], ["recommend", "--run-dir", str(run), "--history", "1 2"],
                ["compare", str(run), str(run), "--resamples", "100"]]

    for case in range(N_PERM):
        chosen = rng.sample(victims, rng.randint(1, 2))
        argv = rng.choice(commands)

        @contextmanager
        def refused(chosen=chosen):
            with pytest.MonkeyPatch.context() as mp:
                deny_reading(mp, chosen)
                yield

        code = check_case(capsys, work, argv, f"unreadable case {case} ({[p.name for p in chosen]})",
                          tmp_path / "out" if argv[0] == "train" else None, around=refused)
        reads = {"data": {data}, "train": {data, config}, "evaluate": {data, *victims[2:7]},
                 "recommend": set(victims[2:7]), "compare": {data, *victims[2:7]}}[argv[0]]
        if reads & set(chosen):
            assert code == 2, (case, argv, chosen)


def test_fuzz_devices(capsys, tmp_path: Path, successor_file: Path) -> None:
    """Every --device / --set device= a person might type: refused in one line before any work unless
    this machine has it."""
    import torch
    import yaml

    from mlsa4rec.runtime import available_devices

    rng = random.Random(1106 + SEED)
    work = tmp_path / "work"
    work.mkdir()
    run = finished_run(capsys, successor_file, tmp_path / "run")
    usable = {"auto", *available_devices()}
    pool = ["mps", "tpu", "meta", "CPU", "Cpu", "", " ", "cuda", "cuda:0", "cuda:7", "cuda:-1", "cuda:1e3", "gpu",
            "cpu:0", "cpu ", " cpu", "xla", "vulkan", "auto", "AUTO", "cpu", "cuda:", ":0", "\x00", "é", "cuda:99999"]
    for case in range(N_DEVICE):
        device = rng.choice(pool) if rng.random() < 0.8 else "cuda:" + str(rng.randrange(-2, 10 ** rng.randint(1, 30)))
        command = rng.choice(["train", "recommend", "serve"]) if device not in usable else rng.choice(
            ["train", "recommend"])  # a usable device would start serving
        if command == "serve" and device.strip() in usable:
            command = "recommend"
        if command == "train":
            argv = train_argv(successor_file, tmp_path / "out", "--set", f"device={device}")
        elif command == "recommend":
            argv = ["recommend", "--run-dir", str(run), "--history", "1 2", "--device", device]
        else:
            argv = ["serve", "--run-dir", str(run), "--device", device, "--port", "0"]
        code = check_case(capsys, work, argv, f"device case {case} ({device!r})",
                          tmp_path / "out" if command == "train" else None)
        given = device
        if command == "train":  # --set values are read as YAML: "cpu " is cpu
            try:
                given = yaml.safe_load(device)
                given = given if isinstance(given, str) else None
            except yaml.YAMLError:
                given = None
        assert code == (0 if given in usable else 2), (device, command)
        if given not in usable and not torch.cuda.is_available():
            assert not (tmp_path / "out").exists()


def test_fuzz_output_directory_names(capsys, tmp_path: Path, successor_file: Path, monkeypatch) -> None:
    """Output names near the file system's limits (in bytes: multi-byte characters count more), deep
    paths, --overwrite of an existing run: a run that cannot be published is refused before training."""
    rng = random.Random(1107 + SEED)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    source = finished_run(capsys, successor_file, tmp_path / "source")
    name_max = os.pathconf(work, "PC_NAME_MAX")
    codes = []
    for case in range(N_NAMES):
        size = rng.randint(name_max - 40, name_max + 3)
        alphabet = rng.choice(["a", "aé", "日x", "a b", "a.b-"])
        name = ""
        while len((name + alphabet[0]).encode()) <= size:
            name += rng.choice(alphabet)
        parents = [rng.choice("pq") * rng.randint(1, 250) for _ in range(rng.choice([0, 0, 1, 3, 17]))]
        out = Path(*parents, name) if parents else Path(name)
        extra = []
        if rng.random() < 0.3:
            extra = ["--overwrite"]
            try:
                shutil.copytree(source, out)  # an existing run of that name, which --overwrite replaces
            except OSError:
                pass  # the name cannot exist on this file system: there is nothing to replace
        before_created = Path(parents[0]) if parents else out
        codes.append(check_case(capsys, work, train_argv(successor_file, out, *extra), f"name case {case} "
                                f"({len(str(out).encode())} bytes)", work / out, created=work / before_created))
        shutil.rmtree(work / before_created, ignore_errors=True)
        assert sorted(work.iterdir()) == [], case
    assert 0 in codes and 2 in codes  # names on both sides of the limit


def csv_text(rng: random.Random, seqs: list[list[int]]) -> tuple[str, bool]:
    """A CSV of ``seqs`` in one of the spellings people's tools write; the flag says it is valid."""
    rows = [(u + 1, item, 100 * u + t) for u, s in enumerate(seqs) for t, item in enumerate(s)]
    quote = rng.choice(["", '"', "'"])
    names = [rng.choice(["user", "user_id", "userID", "User"]), rng.choice(["item", "item_id", "ItemID", "ITEM"]),
             rng.choice(["timestamp", "time", "Timestamp"])]
    sep = rng.choice([",", ", ", " ,"])
    header = sep.join(f"{quote}{n}{quote}" for n in names) if rng.random() < 0.8 else None
    value_quote = rng.choice(["", '"'])
    body = [sep.join(f"{value_quote}{v}{value_quote}" for v in row) for row in rows]
    lines = ([header] if header is not None else []) + body
    newline = rng.choice(["\n", "\r\n"])
    text = rng.choice(["", "\ufeff"]) + newline.join(lines) + rng.choice(["", newline, newline * 2])
    valid = True
    if rng.random() < 0.35:  # hostile: an absurd id, a quote left open, an empty line inside, a cut line
        i = rng.randrange(len(lines))
        kind = rng.randrange(4)
        if kind == 0:
            lines[i] = lines[i].replace(str(rows[max(i - 1, 0)][1]), "x" * rng.choice([256, 257, 5000, 10 ** 5]), 1)
        elif kind == 1:
            lines[i] = '"' + lines[i]
        elif kind == 2:
            lines.insert(i, "")
        else:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        text = newline.join(lines) + newline
        valid = False
    return text, valid


def test_fuzz_csv_spellings(capsys, tmp_path: Path) -> None:
    """Byte-order marks, quoted and differently spelled headers, quoted values, CRLF: read as the same
    data; damaged ones are one error line."""
    rng = random.Random(1108 + SEED)
    work = tmp_path / "work"
    work.mkdir()
    def stats(path: Path) -> dict:
        assert main(["data", "stats", str(path), "--json"]) == 0
        return {k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "dataset"}

    for case in range(N_CSV):
        seqs = sequences(rng)
        text, valid = csv_text(rng, seqs)
        data = work / f"case{case}.csv"
        data.write_bytes(text.encode("utf-8"))
        argv = ["data", "stats", str(data), "--json"] if rng.random() < 0.7 else train_argv(data, tmp_path / "out")
        code = check_case(capsys, work, argv, f"csv case {case}: {text[:80]!r}",
                          tmp_path / "out" if argv[0] == "train" else None)
        if valid:
            assert code == 0, (case, text[:200])
            plain = tmp_path / "plain.csv"  # the same events in the plainest spelling: the same data
            plain.write_text("user,item,timestamp\n" + render(seqs, "csv"))
            assert stats(data) == stats(plain), (case, text[:200])



def test_fuzz_broken_output_streams(capsys, tmp_path: Path, successor_file: Path) -> None:
    """Output into a closed pipe ends quietly (exit 0, like `| head`); into a full or failing disk it is
    one error line (exit 2); never a traceback."""
    rng = random.Random(1109 + SEED)
    work = tmp_path / "work"
    work.mkdir()
    run = finished_run(capsys, successor_file, work / "run")
    commands = [["models"], ["data", "stats", str(successor_file)], ["data", "stats", str(successor_file), "--json"],
                ["evaluate", "--run-dir", str(run)], ["evaluate", "--run-dir", str(run), "--json"],
                ["recommend", "--run-dir", str(run), "--history", "1 2 3"],
                ["recommend", "--run-dir", str(run), "--history", "1 2", "--json"],
                ["compare", str(run), str(run), "--resamples", "100"], ["models", "--config", "sasrec"]]
    failures = [BrokenPipeError(errno.EPIPE, "Broken pipe"), OSError(errno.EIO, "Input/output error"),
                OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded")]
    for case in range(N_STREAM):
        exc = rng.choice(failures)
        argv = rng.choice(commands)
        after = rng.choice([0, 1, 10, 100, 1000])

        @contextmanager
        def broken(exc=exc, after=after):
            real = sys.stdout
            sys.stdout = BrokenStream(exc, after)
            try:
                yield
            finally:
                sys.stdout = real

        code = check_case(capsys, work, argv, f"stream case {case} ({exc})", around=broken)
        assert code in ((0,) if isinstance(exc, BrokenPipeError) else (0, 2)), (case, argv, exc)


def test_fuzz_dataset_cache(capsys, tmp_path: Path, successor_file: Path) -> None:
    """Damage the processed-dataset cache behind a finished run, validly or not: `evaluate` and
    `data stats` must print the clean numbers every time (the cache is verified and rebuilt)."""
    import numpy as np

    from mlsa4rec.data.dataset import cache_dir

    rng = random.Random(1105 + SEED)
    shutil.rmtree(cache_dir() / "processed", ignore_errors=True)  # only this test's two caches: no guessing
    run = tmp_path / "run"
    assert main(train_argv(successor_file, run)) == 0
    other = tmp_path / "other.txt"
    other.write_text(render([[(i * 7 + k) % 12 + 1 for k in range(8)] for i in range(40)], "txt"))
    capsys.readouterr()
    assert main(["data", "stats", str(other)]) == 0 and main(["data", "stats", str(successor_file), "--json"]) == 0
    stats_clean = capsys.readouterr().out.split("{", 1)[1]
    assert main(["evaluate", "--run-dir", str(run)]) == 0
    eval_clean = capsys.readouterr().out
    caches = {p.name.split("-", 1)[0]: p for p in (cache_dir() / "processed").glob("*.npz")}
    assert sorted(caches) == ["other", "succ"] and len(list((cache_dir() / "processed").glob("*.npz"))) == 2
    mine, theirs = caches[successor_file.name.split(".")[0]], caches["other"]
    pristine = mine.read_bytes()
    for case in range(N_CACHE):
        with np.load(mine, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        action = rng.randrange(6)
        name = rng.choice(["items", "offsets", "item_tokens", "user_tokens"])
        if action == 0:  # one value changed, saved validly
            a = arrays[name].copy()
            a.flat[rng.randrange(a.size)] = a.flat[rng.randrange(a.size)] if a.size > 1 else 0
            if np.array_equal(a, arrays[name]):
                a = a[::-1].copy()
            arrays[name] = a
        elif action == 1:  # an array cut short or dropped
            arrays[name] = arrays[name][: rng.randrange(arrays[name].size)]
        elif action == 2:
            del arrays[rng.choice(list(arrays))]
        elif action == 3:  # another dataset's cache under this name
            mine.write_bytes(theirs.read_bytes())
        if action in (0, 1, 2):
            with open(mine, "wb") as fh:
                np.savez(fh, **arrays)
        elif action == 4:  # bytes cut or flipped
            raw = bytearray(pristine)
            if rng.random() < 0.5:
                raw = raw[: rng.randrange(len(raw))]
            else:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            mine.write_bytes(bytes(raw))
        else:
            mine.write_bytes(rng.choice([b"", b"PK", b"not a cache"]))
        argv = ["evaluate", "--run-dir", str(run)] if case % 2 else ["data", "stats", str(successor_file), "--json"]
        code = main(argv)
        captured = capsys.readouterr()
        context = f"cache case {case} (action {action}, {name}): {argv}\n{captured.err[-2000:]}"
        assert code == 0 and "Traceback" not in captured.err, context
        if case % 2:
            assert captured.out == eval_clean, context
        else:
            assert captured.out.split("{", 1)[1] == stats_clean, context
        mine.write_bytes(pristine)


# --- serving entry points: recommend files, session states, serve arguments --------------------------
N_REQUEST_FILES, N_STATES, N_SERVE = 10 * SCALE, 60 * SCALE, 30 * SCALE
HOSTILE_JSON = [None, True, 0, -1, 1.5, 10 ** 30, "", "i1", "zz", "9480", [], ["i1"], ["i1", "zz"], [["i1"]], {},
                {"a": 1}, [None], [1.5], ["i1"] * 2000, "é" * 300]


def hostile_request_line(rng: random.Random) -> bytes:
    """One line of a `recommend --input` file: a valid request, one with a hostile field, or bytes
    that are not a request at all."""
    request = {"history": rng.choice([["i1", "i2"], ["i3"], ["i5", "i6", "i7"]]), "k": rng.choice([1, 5, 10]),
               "id": rng.choice(["a", 7, "x" * 20])}
    kind = rng.randrange(5)
    if kind == 1:
        request[rng.choice(["history", "k", "exclude", "exclude_seen", "unknown", "fallback", "id", "extra"])] = \
            rng.choice(HOSTILE_JSON)
    elif kind == 2:
        del request[rng.choice(list(request))]
    line = json.dumps(request).encode()
    if kind == 3:
        line = rng.choice([b"[" * 5000 + b"]" * 5000, b'{"history": ["i1"], "id": NaN}', b"\xff\xfe{}", b"{",
                           b'"just a string"', b"null", b'{"history": ["i1\x00"]}', line[: rng.randrange(len(line))],
                           b"\xef\xbb\xbf" + line, line + b" trailing"])
    return line


def test_fuzz_recommend_input_files(capsys, tmp_path: Path) -> None:
    """`recommend --input`: every line is answered (its answer or its error, with its id), bad lines
    fail alone, and the command exits 0 or 2 with one error line, never a traceback."""
    rng = random.Random(1106 + SEED)
    run = tiny_run("sasrec")
    work = tmp_path / "work"
    work.mkdir()
    for case in range(N_REQUEST_FILES):
        lines = [hostile_request_line(rng) for _ in range(rng.randint(1, 12))]
        path = work / f"r{case}.jsonl"
        path.write_bytes(b"\n".join(lines) + rng.choice([b"", b"\n", b"\r\n"]))
        argv = ["recommend", "--run-dir", str(run), "--input", str(path), "-k", str(rng.choice([1, 3, 10]))]
        code = main(argv)
        captured = capsys.readouterr()
        context = f"request file {case}: {lines}\n{captured.err[-2000:]}"
        assert code in (0, 2) and "Traceback" not in captured.err, context
        answers = [json.loads(a) for a in captured.out.splitlines()]
        assert len(answers) == len([line for line in lines if line.strip()]), context
        assert all(("recommendations" in a) != ("error" in a) for a in answers), context
        errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
        assert (code == 2) == any("error" in a for a in answers) and len(errors) == (code == 2), context


def test_fuzz_session_states(tmp_path: Path) -> None:
    """`Session.load_state_dict` with damaged states: either the state loads and the session goes on,
    or one MLSA4RecError, and the session is left exactly as it was."""
    rng = random.Random(1107 + SEED)
    recs = {name: Recommender.from_run(tiny_run(name)) for name in ("mamba4rec", "sasrec")}
    for case in range(N_STATES):
        rec = recs[rng.choice(list(recs))]
        source = rec.session()
        source.add_many(["i1", "i2", "i3"][: rng.randint(1, 3)])
        state = source.state_dict()
        key = rng.choice(list(state))
        action = rng.randrange(5)
        if action == 0:
            del state[key]
        elif action == 1:
            state[key] = rng.choice(HOSTILE_JSON + [torch.zeros(3), torch.full((1, 2), float("nan"))])
        elif action == 2 and state["state"]:
            i = rng.randrange(len(state["state"]))
            t = state["state"][i]
            state["state"][i] = rng.choice([t.double(), t[..., :1], t * float("nan"), t.unsqueeze(0),
                                            t.to(torch.int64)])
        elif action == 3 and state["representation"] is not None:
            r = state["representation"]
            state["representation"] = rng.choice([r * float("inf"), r[..., :-1], r.half(), r.tolist()])
        elif action == 4:
            state = rng.choice([None, [], "state", {"format": 2}, {**state, "format": 99}])
        target = rec.session()
        target.add("i4")
        before = target.state_dict()
        expected = target.recommend(k=5)
        try:
            target.load_state_dict(state)
        except MLSA4RecError:
            after = target.state_dict()
            assert after.keys() == before.keys() and after["recent"] == before["recent"], case
            assert target.recommend(k=5) == expected, case  # refused: nothing changed
        except Exception as exc:  # anything else is a bug
            raise AssertionError(f"state case {case} (action {action}, {key}): {type(exc).__name__}: {exc}") from None
        else:
            assert [r.item for r in target.recommend(k=5)] == [r.item for r in source.recommend(k=5)], case


def test_fuzz_serve_arguments(capsys, tmp_path: Path, monkeypatch) -> None:
    """`serve` with hostile flags: one error line and exit 2 before anything listens, or a server
    that would start (its run loop is replaced here, so the case returns at once)."""
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    rng = random.Random(1108 + SEED)
    run = tiny_run("gru4rec")
    work = tmp_path / "work"
    work.mkdir()
    flags = ["--port", "--host", "--device", "--max-body-bytes", "--max-histories", "--max-history-length",
             "--max-k", "--max-sessions", "--session-ttl", "--batch-window-ms", "--max-batch"]
    values = ["0", "-1", "65536", "99999999999999999999", "1.5", "nan", "inf", "-inf", "", "abc", "1e3", "0x10",
              "cpu", "cuda", "mps", "256.0.0.1", "localhost", "::1", "é", "1000000000000", "-0"]
    codes = []
    for case in range(N_SERVE):
        argv = ["serve", "--run-dir", str(run), "--port", "0"]
        for _ in range(rng.randint(1, 3)):
            argv += [rng.choice(flags), rng.choice(values)]
        codes.append(check_case(capsys, work, argv, f"serve case {case}"))
    assert codes.count(2) >= N_SERVE // 2
