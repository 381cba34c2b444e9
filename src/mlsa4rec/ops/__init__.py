"""Numerical kernels behind one function each; nothing here knows about models or data."""

from mlsa4rec.ops.conv import causal_conv_silu, causal_conv_silu_reference
from mlsa4rec.ops.scan import (
    IMPLEMENTATIONS,
    resolve_impl,
    selective_scan,
    selective_scan_reference,
    use_implementation,
)

__all__ = ["IMPLEMENTATIONS", "causal_conv_silu", "causal_conv_silu_reference", "resolve_impl", "selective_scan",
           "selective_scan_reference", "use_implementation"]
