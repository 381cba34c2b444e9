"""Numerical kernels behind one function each; nothing here knows about models or data."""

from mlsa4rec.ops.scan import (
    IMPLEMENTATIONS,
    resolve_impl,
    selective_scan,
    selective_scan_reference,
    use_implementation,
)

__all__ = ["IMPLEMENTATIONS", "resolve_impl", "selective_scan", "selective_scan_reference", "use_implementation"]
