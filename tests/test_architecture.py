"""The floors as code reads them: settings reach code as typed attributes, and L has one name.

The import floors themselves are import-linter's contract (pyproject.toml, run by ``make lint``);
these are the two rules of docs/architecture.md that an import graph cannot see.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mlsa4rec"
BOUNDARY = {"config.py", "cli.py"}  # where RecBole's key names meet YAML and --set


def _code_tokens(path: Path) -> list[tokenize.TokenInfo]:
    return list(tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline))


def test_no_string_keyed_config_reads_outside_the_config_and_cli_modules() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name in BOUNDARY and path.parent == SRC:
            continue
        text = path.read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            if re.search(r"\bconfig\[\s*[\"']", line):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert offenders == [], "read settings as attributes (config.train.X, config.hyper.X):\n" + "\n".join(offenders)


def test_the_maximum_sequence_length_has_one_name_in_code() -> None:
    """``max_seq_length`` in code; ``MAX_ITEM_LIST_LENGTH`` only as a key (a string), never a name."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for tok in _code_tokens(path):
            if tok.type == tokenize.NAME and tok.string in ("MAX_ITEM_LIST_LENGTH", "max_len"):
                offenders.append(f"{path.relative_to(SRC)}:{tok.start[0]}: {tok.line.strip()}")
    assert offenders == [], "\n".join(offenders)
