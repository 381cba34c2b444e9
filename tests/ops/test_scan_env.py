"""MLSA4REC_SCAN is a person's setting: a bad value is one clear ConfigError, checked before any work."""

from __future__ import annotations

import pytest
import torch

from mlsa4rec.errors import ConfigError
from mlsa4rec.ops.scan import IMPLEMENTATIONS, check_environment, resolve_impl


@pytest.mark.parametrize(("value", "expected"), [(None, "auto"), ("", "auto"), ("  ", "auto"), ("auto", "auto"),
                                                 ("reference", "reference"), (" CPU ", "cpu"), ("torch", "torch"),
                                                 ("cuda", "cuda"), ("triton", "triton"), ("Triton\n", "triton"),
                                                 ("traceable", "traceable")])
def test_valid_settings(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: str) -> None:
    if value is None:
        monkeypatch.delenv("MLSA4REC_SCAN", raising=False)
    else:
        monkeypatch.setenv("MLSA4REC_SCAN", value)
    assert check_environment() == expected


def test_bogus_setting_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSA4REC_SCAN", "bogus")
    message = (r"^MLSA4REC_SCAN='bogus' is not a selective-scan implementation; choose one of "
               + ", ".join(IMPLEMENTATIONS) + " or unset it$")
    with pytest.raises(ConfigError, match=message):
        check_environment()
    with pytest.raises(ConfigError, match=message):  # the same error where a model first runs the scan
        resolve_impl("auto", torch.device("cpu"))
    assert resolve_impl("torch", torch.device("cpu")) == "torch"  # an explicit impl= does not read it


def test_bad_impl_argument_stays_a_programming_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLSA4REC_SCAN", raising=False)
    with pytest.raises(ValueError, match="unknown selective-scan implementation 'fast'"):
        resolve_impl("fast", torch.device("cpu"))
