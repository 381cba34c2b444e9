"""The allocator tuning is optional and never fails."""

from __future__ import annotations

import sys

import pytest

from mlsa4rec.runtime import tune_allocator


def test_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSA4REC_DEFAULT_MALLOC", "1")
    assert tune_allocator() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_applies_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLSA4REC_DEFAULT_MALLOC", raising=False)
    assert isinstance(tune_allocator(), bool)
