"""Reusable building blocks of the models."""

from mlsa4rec.layers.dropout import Dropout
from mlsa4rec.layers.mamba import Mamba, MambaResidual, MambaState
from mlsa4rec.layers.transformer import FeedForward, MultiHeadAttention, TransformerLayer

__all__ = ["Dropout", "FeedForward", "Mamba", "MambaResidual", "MambaState", "MultiHeadAttention", "TransformerLayer"]
