"""Config precedence and validation: every bad key or value fails with a message naming it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from mlsa4rec.config import build_config, load_yaml_file, parse_interval, parse_set, run_facts
from mlsa4rec.errors import ConfigError
from mlsa4rec.settings import check_value as _check_type


def test_precedence_defaults_model_file_set(tmp_path: Path) -> None:
    default = build_config("sasrec")
    assert default["learning_rate"] == 0.001 and default["hidden_size"] == 64
    assert default["hidden_dropout_prob"] == 0.5  # the model's config class
    f1 = tmp_path / "a.yaml"
    f1.write_text("learning_rate: 0.01\nhidden_size: 32\n")
    f2 = tmp_path / "b.yaml"
    f2.write_text("learning_rate: 0.02\n")
    c = build_config("sasrec", [f1, f2], parse_set(["hidden_size=16", "topk=[10, 5, 10]"]))
    assert c["learning_rate"] == 0.02 and c["hidden_size"] == 16 and c["topk"] == [5, 10]
    assert c.model_kwargs()["hidden_size"] == 16 and "learning_rate" not in c.model_kwargs()


def test_unknown_key_is_named_with_suggestion() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'.*did you mean 'learning_rate'"):
        build_config("sasrec", overrides={"learning_rat": 1})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"epochs": "many"}, "epochs: expected int"),
        ({"epochs": 1.5}, "epochs: expected int"),
        ({"learning_rate": -1.0}, "learning_rate must be > 0"),
        ({"hidden_dropout_prob": 1.0}, r"hidden_dropout_prob must be in \[0, 1\)"),
        ({"valid_metric": "auc@10"}, "valid_metric 'auc@10' is not computed"),
        ({"valid_metric": "ndcg@20"}, "valid_metric 'ndcg@20' is not computed"),
        ({"metrics": ["hit", "map"]}, "unknown metric 'map'"),
        ({"topk": [0]}, "topk must be a list of positive integers"),
        ({"train_scheme": "windows"}, "train_scheme must be one of"),
        ({"user_inter_num_interval": "5+"}, "is not an interval"),
        ({"loss_type": "BPR"}, "only CE"),
        ({"device": "gpu"}, "device must be"),
        ({"use_gpu": True}, "unknown config key 'use_gpu'"),
        ({"epochs": None}, "epochs: a value is required"),
        ({"metrics": None}, "metrics: a value is required"),
    ],
)
def test_bad_values(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config("sasrec", overrides=override)


def test_recbole_style_names_are_accepted() -> None:
    c = build_config("sasrec", overrides={"valid_metric": "NDCG@10", "metrics": ["Hit", "NDCG", "MRR"],
                                          "learning_rate": 1})
    assert c["valid_metric"] == "ndcg@10" and c["metrics"] == ["hit", "ndcg", "mrr"]
    assert c["learning_rate"] == 1.0 and isinstance(c["learning_rate"], float)


def test_bad_files_and_set_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("sasrec", [tmp_path / "none.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config("sasrec", [bad])
    for text, where in (("epochs: 3\n lr: 2\n", "at line 2, column 4: mapping values are not allowed here"),
                        ("\t- 1\n", "at line 1, column 1: found character '\\t' that cannot start any token"),
                        ("a: *x\n", "at line 1, column 4: found undefined alias 'x'"),
                        ("\x00", "unacceptable character #x0000")):
        bad.write_text(text)
        with pytest.raises(ConfigError) as info:
            build_config("sasrec", [bad])
        assert where in str(info.value) and "\n" not in str(info.value), str(info.value)  # one `error:` line
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config("sasrec", [bad])
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["epochs"])


def test_intervals() -> None:
    assert parse_interval("[5,inf)") == (5, float("inf"))
    assert parse_interval("(2,10)") == (3, 9)
    assert parse_interval("[0,3]") == (0, 3)
    assert parse_interval("(-inf,5]") == (float("-inf"), 5)
    with pytest.raises(ConfigError, match="empty"):
        parse_interval("[5,2]")


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("learning_rate", "1e-3", 0.001),
        ("learning_rate", "1E3", 1000.0),
        ("learning_rate", "1e+30", 1e30),
        ("learning_rate", "1.5e3", 1500.0),
        ("learning_rate", " 2 ", 2.0),
        ("learning_rate", "1_000", 1000.0),
        ("epochs", "1e9", 1_000_000_000),
        ("epochs", "1E3", 1000),
        ("epochs", "1_000", 1000),
        ("epochs", " 2 ", 2),
        ("epochs", "3.0", 3),
        ("epochs", "12345678901234567890", 12345678901234567890),  # int() first: no float rounding
    ],
)
def test_number_spellings(key: str, raw: str, expected: float) -> None:
    """PyYAML (YAML 1.1) reads 1e-3 as a string; every spelling float() takes must still be a number."""
    for overrides in ({key: raw}, parse_set([f"{key}={raw}"])):
        value = build_config("sasrec", overrides=overrides)[key]
        assert value == expected and type(value) is type(expected), (overrides, value)


def test_number_spellings_in_a_yaml_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 1e-3\nepochs: 1e2\nweight_decay: 1e-5\n")
    c = build_config("sasrec", [f])
    assert (c["learning_rate"], c["epochs"], c["weight_decay"]) == (0.001, 100, 1e-5)
    assert type(c["epochs"]) is int and type(c["learning_rate"]) is float


@pytest.mark.parametrize(
    ("key", "value"),
    [("epochs", "1.5"), ("epochs", "1.5e0"), ("epochs", True), ("epochs", "true"), ("epochs", "ten"),
     ("learning_rate", True), ("learning_rate", False), ("learning_rate", "fast"), ("learning_rate", "")],
)
def test_non_numbers_stay_errors(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"{key}: expected"):
        build_config("sasrec", overrides={key: value})


def test_strings_stay_strings_for_string_settings() -> None:
    assert _check_type("some_name", "1e3", "text") == "1e3"
    assert _check_type("some_name", " 2 ", "text") == " 2 "
    assert build_config("sasrec", overrides={"user_inter_num_interval": "[5,inf)"})["user_inter_num_interval"] == \
        "[5,inf)"


@pytest.mark.parametrize("key", ["learning_rate", "epochs", "weight_decay", "clip_grad_norm", "stopping_step"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf", "-inf", "nan", "infinity", " Infinity ",
                                   ".inf", "-.inf", ".nan"])
def test_numbers_must_be_finite(key: str, value: object) -> None:
    overrides = parse_set([f"{key}={value}"]) if isinstance(value, str) and value.startswith(("-.", ".")) \
        else {key: value}
    with pytest.raises(ConfigError, match=rf"^{key} must be a finite number, got -?(inf|nan)\b"):
        build_config("sasrec", overrides=overrides)


def test_numbers_beyond_float_range() -> None:
    with pytest.raises(ConfigError, match="learning_rate must be a finite number"):
        build_config("sasrec", overrides=parse_set(["learning_rate=1" + "0" * 400]))
    with pytest.raises(ConfigError, match="learning_rate must be a finite number, got inf"):
        build_config("sasrec", overrides=parse_set(["learning_rate=1e400"]))


def test_non_finite_numbers_in_a_yaml_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: .inf\n")
    with pytest.raises(ConfigError, match="learning_rate must be a finite number, got inf"):
        build_config("sasrec", [f])
    f.write_text("user_inter_num_interval: '[5,inf)'\nitem_inter_num_interval: '(-inf,inf)'\n")
    assert build_config("sasrec", [f])["item_inter_num_interval"] == "(-inf,inf)"


def test_config_file_not_utf8_directory_or_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "utf16.yaml"
    bad.write_bytes(b"\xff\xfe epochs: 3")
    with pytest.raises(ConfigError, match=r"config file '.*utf16\.yaml' is not UTF-8 text.*save it as UTF-8"):
        load_yaml_file(bad)
    with pytest.raises(ConfigError, match=r"config file '.*' is a directory"):
        build_config("sasrec", [tmp_path])
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffepochs: 3\n".encode())  # a byte-order mark some editors write is fine
    assert load_yaml_file(bom) == {"epochs": 3}

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    ok = tmp_path / "ok.yaml"
    ok.write_text("epochs: 3\n")
    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ConfigError, match=r"cannot read config file '.*ok\.yaml': Permission denied"):
        load_yaml_file(ok)


def test_model_line_must_match_the_model(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("model: gru4rec\nepochs: 3\n")
    with pytest.raises(ConfigError, match=r"config file '.*x\.yaml' sets model: gru4rec but the command trains "
                                          r"'sasrec'; remove the line or pass --model gru4rec"):
        build_config("sasrec", [f])
    with pytest.raises(ConfigError, match=r"--set model=gru4rec .*'sasrec'.*--model gru4rec"):
        build_config("sasrec", overrides={"model": "gru4rec"})
    with pytest.raises(ConfigError, match=r"^--set model='a\\nb' .*pass --model 'a\\nb'$"):  # still one line
        build_config("sasrec", overrides={"model": "a\nb"})
    assert build_config("gru4rec", [f])["model"] == "gru4rec"
    assert build_config("gru4rec", overrides={"model": "gru4rec"})["epochs"] == 300


def test_dataset_line_must_match_the_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("dataset: ml-1m\n")
    with pytest.raises(ConfigError, match=r"sets dataset: ml-1m but the command trains on 'amazon-beauty'; remove "
                                          r"the line or pass --dataset ml-1m"):
        build_config("sasrec", [f], extra={"dataset": "amazon-beauty"})
    assert build_config("sasrec", [f], extra={"dataset": "ml-1m"})["dataset"] == "ml-1m"
    assert "dataset" not in build_config("sasrec", [f])  # no dataset given: nothing to contradict
    data = tmp_path / "data.txt"
    data.write_text("1 2 3\n")
    other = tmp_path / "other.txt"
    other.write_text("1 2 3\n")
    monkeypatch.chdir(tmp_path)
    f.write_text("dataset: data.txt\n")  # a relative path naming the same file as the resolved one
    assert build_config("sasrec", [f], extra={"dataset": str(data.resolve())})["dataset"] == str(data.resolve())
    with pytest.raises(ConfigError, match="sets dataset: data.txt but the command trains on"):
        build_config("sasrec", [f], extra={"dataset": str(other.resolve())})
    with pytest.raises(ConfigError, match="--set dataset=ml-1m"):
        build_config("sasrec", overrides={"dataset": "ml-1m"}, extra={"dataset": str(data.resolve())})


def test_a_saved_config_is_reusable(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("1 2 3\n")
    first = build_config("gru4rec", overrides=parse_set(["learning_rate=1e-3", "epochs=7"]),
                         extra={"dataset": str(data.resolve())})
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(first.to_dict(), sort_keys=False))
    facts = yaml.safe_load(saved.read_text())
    again = build_config(facts["model"], [saved], extra={"dataset": facts["dataset"]})  # what load_run does
    assert again.to_dict() == first.to_dict()
    assert build_config("gru4rec", [saved], extra={"dataset": str(data.resolve())}).to_dict() == first.to_dict()


def test_run_facts(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("model: sasrec\ndataset: ml-1m\nepochs: 3\n")
    b = tmp_path / "b.yaml"
    b.write_text("model: gru4rec\n")
    assert run_facts([a]) == {"model": "sasrec", "dataset": "ml-1m"}
    assert run_facts([a, b]) == {"model": "gru4rec", "dataset": "ml-1m"}
    assert run_facts([a, b], {"dataset": "amazon-beauty"}) == {"model": "gru4rec", "dataset": "amazon-beauty"}
    assert run_facts([], {"epochs": 3}) == {} and run_facts(["mamba4rec-ml-1m"]) == {}


@pytest.mark.parametrize("seed", [-1, 2 ** 32, 10 ** 30])
def test_seed_outside_what_numpy_accepts_is_refused(seed: int) -> None:
    """Found by tests/test_fuzz.py: seed=-1 passed validation and failed in numpy mid-run."""
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*32\)"):
        build_config("sasrec", overrides={"seed": seed})
    assert build_config("sasrec", overrides={"seed": 2 ** 32 - 1})["seed"] == 2 ** 32 - 1


@pytest.mark.parametrize("model, key", [("sasrec", "n_layers"), ("mamba4rec", "num_layers"),
                                        ("mlsa4rec", "num_interaction_layers"), ("gru4rec", "num_layers")])
def test_a_layer_count_in_the_millions_is_refused_before_the_model_is_built(model: str, key: str) -> None:
    """Found by the fuzz module at scale 10: `--set n_layers=1e30` built layer after layer on the
    meta device (5 GB after 117,000) before the memory check could refuse it."""
    with pytest.raises(ConfigError, match=f"{key} must be at most 1000"):
        build_config(model, [], {key: 10 ** 30}, extra={"dataset": "x"}).model_kwargs()
    build_config(model, [], {key: 3}, extra={"dataset": "x"}).model_kwargs()  # ordinary values still pass


def test_the_config_is_typed_and_its_mapping_view_keeps_the_keys_of_config_yaml() -> None:
    from mlsa4rec.models.sasrec import SASRecConfig
    from mlsa4rec.settings import TrainConfig

    c = build_config("sasrec", overrides={"MAX_ITEM_LIST_LENGTH": 20, "hidden_size": 16}, extra={"dataset": "ml-1m"})
    assert isinstance(c.train, TrainConfig) and isinstance(c.hyper, SASRecConfig)
    assert (c.model, c.dataset, c.train.max_seq_length, c.hyper.hidden_size) == ("sasrec", "ml-1m", 20, 16)
    assert c["MAX_ITEM_LIST_LENGTH"] == 20 and "max_seq_length" not in c  # keys as YAML and --set write them
    assert list(c)[:2] == ["model", "dataset"] and c.model_kwargs()["hidden_size"] == 16
    assert c.with_train(exclude_history=True).train.exclude_history and not c.train.exclude_history
    with pytest.raises(ConfigError, match="MAX_ITEM_LIST_LENGTH must be > 0"):
        c.with_train(max_seq_length=0)


def test_with_train_checks_each_value_as_a_set_would() -> None:
    c = build_config("sasrec")
    with pytest.raises(ConfigError, match="exclude_history: expected bool"):
        c.with_train(exclude_history="yes")
    assert c.with_train(max_seq_length="20").train.max_seq_length == 20
