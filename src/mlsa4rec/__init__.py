"""mlsa4rec: MLSA4Rec and sequential-recommendation baselines in pure PyTorch.

Data flows file -> ``data`` -> samplers -> ``models`` -> ``training`` / ``evaluation``; see
``docs/architecture.md``.
"""

__version__ = "0.2.0"
