"""The weight converter's first home, kept so that ``from mlsa4rec.convert import from_recbole`` works.

The converter lives in ``mlsa4rec.interop.recbole``, beside RecBole's atomic data export and
import; its docstring has the table of released names and ours.
"""

from __future__ import annotations

from mlsa4rec.interop.recbole import RELEASED_MLSA4REC_SETTINGS, ConversionError, from_recbole

__all__ = ["RELEASED_MLSA4REC_SETTINGS", "ConversionError", "from_recbole"]
