"""The one rule for the precision of running sums and recurrent states.

Under float16/bfloat16 a state that accumulates over events (Mamba's SSM state, the LSA's pooled
sums, linear attention's prefix sums, the LRU's complex state) loses the small updates of late
events, so it is kept in float32, as mamba-ssm does; float64 (the tests' precision) stays float64.
"""

from __future__ import annotations

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a state or running sum of ``dtype`` values is kept in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in ``state_dtype`` (itself when it already is)."""
    return t.to(state_dtype(t.dtype))
