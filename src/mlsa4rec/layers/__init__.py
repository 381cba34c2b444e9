"""Reusable building blocks of the models."""

from mlsa4rec.layers.dropout import Dropout
from mlsa4rec.layers.mamba import Mamba, MambaState
from mlsa4rec.layers.transformer import FeedForward, MultiHeadAttention, TransformerLayer

__all__ = ["Dropout", "FeedForward", "Mamba", "MambaState", "MultiHeadAttention", "TransformerLayer"]
